"""Pre-copy live migration: rounds, total time, downtime and bytes sent, analytically and by simulation.

Analytic model, in the form of Liu et al. (2011): memory V_mem is sent at bandwidth R while the guest
dirties memory at rate D. Round 0 sends all of memory; every later round sends what was dirtied while
the previous one ran:

    lambda = D / R,     T_i = V_i / R,     V_0 = V_mem,     V_i = D T_(i-1) = V_mem lambda^i

Pre-copy stops after n rounds, when what is left fits the downtime limit, V_n <= V_thd = R t_limit:

    n = max(1, ceil(log(V_thd / V_mem) / log(lambda)))      (0 < lambda < 1; n = 1 if lambda = 0)

and the guest is paused to send V_n (stop and copy), so

    V_mig = sum_{i=0..n} V_i = V_mem (1 - lambda^(n+1)) / (1 - lambda)
    T_mig = V_mig / R + T_resume,     T_down = V_n / R + T_resume

`rounds` is n, the rounds run while the guest runs (round 0 included), as a migration reports its
pre-copy rounds before the stop-and-copy. The series converges only if D < R: with D >= R every round
leaves at least as much as it sent (the model caps V_i at V_mem, as no more than all of memory can be
dirty), so pre-copy runs to `max_rounds` and stops anyway with V_n unchanged (not converged), unless
all of memory already fits the downtime limit.

The analytic model treats every dirtied byte as new. Real guests rewrite a writable working set (WWS,
Clark et al. 2005): the simulator keeps a page bitmap, sends each round the pages written during the
previous one, and draws writes (D / page size per second) uniformly from `wws_bytes` of hot pages
(a share `hot_fraction` of them) or from the rest of memory. Rewrites of a page already dirty cost
nothing, so the dirty set saturates near the WWS and pre-copy can end even when D >= R.

Sources: H. Liu, C.-Z. Xu, H. Jin, J. Gong, X. Liao, "Performance and Energy Modeling for Live
Migration of Virtual Machines", HPDC 2011 (the pre-copy model: V_mem, R, D, ratio lambda, threshold
V_thd, rounds n, V_mig, T_mig, T_down = T_n + T_resume; its refined model adds the WWS, which this
simulator replaces by a page-level simulation). C. Clark, K. Fraser, S. Hand, J. G. Hansen, E. Jul,
C. Limpach, I. Pratt, A. Warfield, "Live Migration of Virtual Machines", NSDI 2005 (iterative
pre-copy; the writable working set). The default bandwidth (1 Gbit/s) is an assumption; the default
memory, working set and dirty rates are those of `benchmarks/migration.py` (1 GiB, 256 MiB, 0-200 MB/s).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pyrovisor.arch.x86_64.layout import parse_size
from pyrovisor.errors import ConfigError
from pyrovisor.lab.model import LabResult, Table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MB = 1_000_000
MiB = 1 << 20


@dataclass(frozen=True)
class PrecopyPrediction:
    """The analytic model's answer (`round_bytes`: V_0 .. V_n, the last one sent during the pause)."""

    rounds: int
    total_time_s: float
    downtime_s: float
    bytes_sent: int
    converged: bool
    dirty_ratio: float  # lambda = D / R
    threshold_bytes: float  # V_thd = R * downtime limit
    round_bytes: tuple[float, ...]
    page_size: int = 4096

    @property
    def pages_sent(self) -> int:
        return math.ceil(self.bytes_sent / self.page_size)


@dataclass(frozen=True)
class PrecopySimulation:
    """The simulator's answer (`round_pages`: pages sent in each pre-copy round, then in the pause)."""

    rounds: int
    total_time_s: float
    downtime_s: float
    bytes_sent: int
    converged: bool
    round_pages: tuple[int, ...]
    wws_pages: int
    page_size: int = 4096


def _check(memory_bytes: int, bandwidth_bytes_per_s: float, dirty_bytes_per_s: float, downtime_limit_s: float,
           max_rounds: int, page_size: int) -> None:
    if memory_bytes <= 0 or page_size <= 0:
        raise ConfigError("memory", memory_bytes, "memory and page size must be positive")
    if bandwidth_bytes_per_s <= 0:
        raise ConfigError("--bandwidth", bandwidth_bytes_per_s, "the link must move some bytes")
    if dirty_bytes_per_s < 0 or downtime_limit_s < 0:
        raise ConfigError("--dirty-rates/--downtime-limit", (dirty_bytes_per_s, downtime_limit_s),
                          "rates and limits are not negative")
    if max_rounds < 1:
        raise ConfigError("--max-rounds", max_rounds, "at least one pre-copy round")


def precopy_rounds(memory_bytes: float, ratio: float, threshold_bytes: float, max_rounds: int) -> int:
    """n: the first round i >= 1 whose V_i fits the threshold, from the closed form, at most `max_rounds`."""
    if memory_bytes <= threshold_bytes or ratio == 0.0:
        return 1
    if ratio >= 1.0:
        return max_rounds
    if threshold_bytes <= 0:
        return max_rounds
    n = max(1, math.ceil((math.log(threshold_bytes) - math.log(memory_bytes)) / math.log(ratio)))
    n = min(n, max_rounds + 1)
    while n > 1 and memory_bytes * ratio ** (n - 1) <= threshold_bytes:  # guard the float logarithms
        n -= 1
    while n < max_rounds and memory_bytes * ratio**n > threshold_bytes:
        n += 1
    return min(n, max_rounds)


def predict(memory_bytes: int, bandwidth_bytes_per_s: float, dirty_bytes_per_s: float,
            downtime_limit_s: float = 0.3, max_rounds: int = 30, page_size: int = 4096,
            resume_time_s: float = 0.0) -> PrecopyPrediction:
    """The analytic pre-copy model (Liu et al. 2011 form) for one guest and link."""
    _check(memory_bytes, bandwidth_bytes_per_s, dirty_bytes_per_s, downtime_limit_s, max_rounds, page_size)
    memory = float(math.ceil(memory_bytes / page_size) * page_size)
    ratio = dirty_bytes_per_s / bandwidth_bytes_per_s
    threshold = bandwidth_bytes_per_s * downtime_limit_s
    n = precopy_rounds(memory, ratio, threshold, max_rounds)
    volumes = tuple(memory * min(1.0, ratio**i) if i else memory for i in range(n + 1))
    if ratio < 1.0:
        sent = memory * (1.0 - ratio ** (n + 1)) / (1.0 - ratio)
    else:
        sent = memory + n * memory * min(1.0, ratio)
    return PrecopyPrediction(
        rounds=n, total_time_s=sent / bandwidth_bytes_per_s + resume_time_s,
        downtime_s=volumes[n] / bandwidth_bytes_per_s + resume_time_s, bytes_sent=round(sent),
        converged=volumes[n] <= threshold, dirty_ratio=ratio, threshold_bytes=threshold, round_bytes=volumes,
        page_size=page_size,
    )


def simulate(memory_bytes: int, bandwidth_bytes_per_s: float, dirty_bytes_per_s: float, wws_bytes: int,
             downtime_limit_s: float = 0.3, max_rounds: int = 30, page_size: int = 4096, hot_fraction: float = 1.0,
             seed: int = 0, resume_time_s: float = 0.0) -> PrecopySimulation:
    """Pre-copy over a page bitmap, the guest writing mostly into a writable working set of `wws_bytes`."""
    _check(memory_bytes, bandwidth_bytes_per_s, dirty_bytes_per_s, downtime_limit_s, max_rounds, page_size)
    if not 0.0 <= hot_fraction <= 1.0 or not 0 <= wws_bytes <= memory_bytes:
        raise ConfigError("--wws/--hot-fraction", (wws_bytes, hot_fraction),
                          "the working set lies inside memory and the hot share is in [0, 1]")
    rng = np.random.default_rng(seed)
    pages = math.ceil(memory_bytes / page_size)
    hot_pages = min(pages, math.ceil(wws_bytes / page_size))
    page_time = page_size / bandwidth_bytes_per_s
    writes_per_s = dirty_bytes_per_s / page_size
    sent_per_round = [pages]
    elapsed = 0.0
    while True:
        duration = sent_per_round[-1] * page_time
        elapsed += duration
        dirty = _pages_written(rng, round(writes_per_s * duration), pages, hot_pages, hot_fraction)
        if dirty * page_time <= downtime_limit_s or len(sent_per_round) >= max_rounds:
            break
        sent_per_round.append(dirty)
    downtime = dirty * page_time + resume_time_s
    total_pages = sum(sent_per_round) + dirty
    return PrecopySimulation(
        rounds=len(sent_per_round), total_time_s=elapsed + downtime, downtime_s=downtime,
        bytes_sent=total_pages * page_size, converged=dirty * page_time <= downtime_limit_s,
        round_pages=(*sent_per_round, dirty), wws_pages=hot_pages, page_size=page_size,
    )


def _pages_written(rng: np.random.Generator, writes: int, pages: int, hot_pages: int, hot_fraction: float) -> int:
    """Distinct pages hit by `writes` page writes: a share `hot_fraction` in the hot pages, the rest elsewhere."""
    if writes <= 0:
        return 0
    cold_pages = pages - hot_pages
    hot_writes = writes if cold_pages == 0 else (0 if hot_pages == 0 else round(writes * hot_fraction))
    hot = rng.integers(0, hot_pages, hot_writes) if hot_writes else np.zeros(0, dtype=np.int64)
    cold = hot_pages + rng.integers(0, cold_pages, writes - hot_writes) if writes > hot_writes else np.zeros(0, np.int64)
    return len(np.unique(np.concatenate([hot, cold])))


class PrecopyModel:
    name = "precopy"
    summary = "Pre-copy live migration: rounds, total time, downtime, bytes (Liu et al. model + WWS simulator)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--memory", default="1G", help="guest memory (default: %(default)s)")
        parser.add_argument("--bandwidth", type=float, default=125.0,
                            help="link bandwidth in MB/s (default: %(default)s, one gigabit per second)")
        parser.add_argument("--dirty-rates", default="0,10,50,100,200",
                            help="dirty rates in MB/s, comma-separated (default: %(default)s)")
        parser.add_argument("--wws", default="256M", help="writable working set for the simulator (default: %(default)s)")
        parser.add_argument("--hot-fraction", type=float, default=1.0,
                            help="share of writes inside the working set (default: %(default)s)")
        parser.add_argument("--downtime-limit", type=float, default=0.3, help="seconds (default: %(default)s)")
        parser.add_argument("--max-rounds", type=int, default=30, help="pre-copy rounds at most (default: %(default)s)")
        parser.add_argument("--page-size", type=int, default=4096)
        parser.add_argument("--resume-time", type=float, default=0.0, help="T_resume in seconds (default: %(default)s)")
        parser.add_argument("--seed", type=int, default=0)

    def run(self, args: argparse.Namespace) -> LabResult:
        memory = parse_size(args.memory)
        wws = parse_size(args.wws)
        bandwidth = args.bandwidth * MB
        try:
            rates = [float(rate) * MB for rate in args.dirty_rates.split(",")]
        except ValueError as exc:
            raise ConfigError("--dirty-rates", args.dirty_rates, "give MB/s values separated by commas") from exc
        predictions = [predict(memory, bandwidth, rate, args.downtime_limit, args.max_rounds, args.page_size,
                               args.resume_time) for rate in rates]
        simulations = [simulate(memory, bandwidth, rate, wws, args.downtime_limit, args.max_rounds, args.page_size,
                                args.hot_fraction, args.seed, args.resume_time) for rate in rates]
        table = Table(
            title=f"Pre-copy of {memory / MiB:.0f} MiB over {args.bandwidth:g} MB/s, downtime limit "
                  f"{args.downtime_limit * 1e3:g} ms: model (Liu et al. 2011) and simulation (WWS {wws / MiB:.0f} MiB)",
            columns=("dirty MB/s", "lambda", "rounds", "total s", "downtime ms", "MiB sent", "converged",
                     "sim rounds", "sim total s", "sim downtime ms", "sim MiB sent", "sim converged"),
            rows=tuple((f"{rate / MB:g}", round(p.dirty_ratio, 3), p.rounds, round(p.total_time_s, 2),
                        round(p.downtime_s * 1e3, 1), round(p.bytes_sent / MiB), "yes" if p.converged else "no",
                        s.rounds, round(s.total_time_s, 2), round(s.downtime_s * 1e3, 1), round(s.bytes_sent / MiB),
                        "yes" if s.converged else "no") for rate, p, s in zip(rates, predictions, simulations, strict=True)),
            notes=("lambda = D / R; rounds: pre-copy rounds while the guest runs (round 0 sends all memory), then "
                   "one stop-and-copy; converged: what was left fitted the downtime limit.",
                   f"simulation: {args.hot_fraction:.0%} of writes land in the working set; a rewrite of a page "
                   "that is already dirty costs nothing, so the dirty set saturates near the working set."),
        )
        return LabResult(tables=(table,), plot=lambda figure: plot(figure, rates, bandwidth, predictions, simulations),
                         summary=_summary(rates, bandwidth, predictions, simulations))


def _summary(rates: list[float], bandwidth: float, predictions: list[PrecopyPrediction],
             simulations: list[PrecopySimulation]) -> tuple[str, ...]:
    lines = []
    for rate, p, s in zip(rates, predictions, simulations, strict=True):
        if rate >= bandwidth and not p.converged:
            lines.append(f"at {rate / MB:g} MB/s the model does not converge (D >= R): it stops after {p.rounds} rounds "
                         f"with {p.downtime_s:.2f} s of downtime; with the working set the simulator "
                         f"{'converges' if s.converged else 'does not either'} ({s.downtime_s * 1e3:.0f} ms)")
    return tuple(lines)


def plot(figure: Figure, rates: list[float], bandwidth: float, predictions: list[PrecopyPrediction],
         simulations: list[PrecopySimulation]) -> None:
    left, right = figure.subplots(1, 2)
    for k, (rate, p, s) in enumerate(zip(rates, predictions, simulations, strict=True)):
        color = f"C{k}"
        left.plot(range(len(p.round_bytes)), [v / MiB for v in p.round_bytes], "-", color=color,
                  label=f"{rate / MB:g} MB/s")
        left.plot(range(len(s.round_pages)), [q * s.page_size / MiB for q in s.round_pages], "x", color=color)
    left.set_yscale("symlog", linthresh=1.0)
    left.set_xlabel("round (last: stop and copy)")
    left.set_ylabel("MiB sent in the round")
    left.set_title("Per round: model (lines), simulation (x)")
    left.legend(fontsize="small", title="dirty rate")
    x = [rate / MB for rate in rates]
    right.plot(x, [p.total_time_s for p in predictions], "o-", label="total, model")
    right.plot(x, [s.total_time_s for s in simulations], "o--", label="total, simulation")
    right.plot(x, [p.downtime_s for p in predictions], "s-", label="downtime, model")
    right.plot(x, [s.downtime_s for s in simulations], "s--", label="downtime, simulation")
    right.axvline(bandwidth / MB, color="grey", linestyle=":", label="dirty rate = bandwidth")
    right.set_yscale("symlog", linthresh=0.01)
    right.set_xlabel("dirty rate (MB/s)")
    right.set_ylabel("seconds")
    right.set_title("Total migration time and downtime")
    right.legend(fontsize="small")


MODEL = PrecopyModel()
