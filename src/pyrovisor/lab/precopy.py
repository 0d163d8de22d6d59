"""Pre-copy live migration: rounds, total time, downtime and bytes sent, analytically and by simulation.

Analytic model, in the form of Liu et al. (2011): memory V_mem is sent at bandwidth R while the guest
dirties memory at rate D. Round 0 sends all of memory; every later round sends what was dirtied while
the previous one ran:

    lambda = D / R,     T_i = V_i / R,     V_0 = V_mem,     V_i = D T_(i-1) = V_mem lambda^i

V_i is capped at V_mem (no more than all of memory can be dirty), which matters when D >= R. After each
live round i a stop rule looks at what was just sent (V_i), what is left (V_(i+1)) and what has been sent
so far, and either runs round i + 1 or pauses the guest to send V_(i+1) (stop and copy). With n live
rounds (round 0 included; `rounds` below):

    V_mig = sum_{i=0..n} V_i = V_mem (1 - lambda^(n+1)) / (1 - lambda)      (lambda < 1)
    T_mig = V_mig / R + T_resume,     T_down = V_n / R + T_resume

Stop rules (`--policy`), applied after every live round:

- pyrovisor: switch over once what is left fits the downtime limit, V_(i+1) <= V_thd = R t_limit, so
  n = max(1, ceil(log(V_thd / V_mem) / log(lambda))) for 0 < lambda < 1; or after `max_rounds` = 30
  live rounds anyway, not converged. The 30 is pyrovisor's own choice (`PrecopyPolicy.max_rounds` in
  src/pyrovisor/migration/policy.py), not a figure from a paper. (pyrovisor's default policy also keeps
  iterating while rounds at least halve what is left; the model does not follow that refinement.)
- xen: the live loop of Xen's classic save code (tools/libxc/xc_domain_save.c, DEF_MAX_ITERS and
  DEF_MAX_FACTOR): start the last iteration once 29 live iterations have run, or once more than 3x the
  guest's memory has been sent (round i included), or once round i sent fewer than 50 pages. There is
  no downtime target. By hand: the 50-page rule fires after the first round with V_i < 50 pages; the 3x
  rule needs lambda > 2/3 (the series sums to V_mem / (1 - lambda)) and fires at once when D >= R: rounds
  of V_mem each have sent 4 V_mem > 3 V_mem after the fourth.
- qemu: switch over once the remaining dirty data can be sent within the downtime limit (QEMU compares
  it with bandwidth x downtime-limit; default limit 300 ms), as for pyrovisor but with no round cap:
  QEMU keeps iterating for as long as it takes. A guest that dirties memory faster than the link never
  finishes (QEMU's auto-converge, which throttles the vCPUs, is off by default and not modelled). The
  model follows QEMU for at most `qemu_cutoff` rounds: if it has not converged by then, it reports the
  migration as not converged, stopped at a *model cutoff*, with the figures of a forced switch-over there.

The analytic model treats every dirtied byte as new. Real guests rewrite a writable working set (WWS,
Clark et al. 2005): the simulator keeps a page bitmap, sends each round the pages written during the
previous one, and draws writes (D / page size per second) uniformly from `wws_bytes` of hot pages
(a share `hot_fraction` of them) or from the rest of memory. Rewrites of a page already dirty cost
nothing, so the dirty set saturates near the WWS and pre-copy can end even when D >= R. The same stop
rules apply to it, in pages.

Sources: H. Liu, C.-Z. Xu, H. Jin, J. Gong, X. Liao, "Performance and Energy Modeling for Live
Migration of Virtual Machines", HPDC 2011 (the pre-copy model: V_mem, R, D, ratio lambda, threshold
V_thd, rounds n, V_mig, T_mig, T_down = T_n + T_resume; its refined model adds the WWS, which this
simulator replaces by a page-level simulation). C. Clark, K. Fraser, S. Hand, J. G. Hansen, E. Jul,
C. Limpach, I. Pratt, A. Warfield, "Live Migration of Virtual Machines", NSDI 2005 (iterative
pre-copy; the writable working set; downtimes of 210 ms for SPECweb and 60 ms for Quake 3). Xen's
tools/libxc/xc_domain_save.c (the 29 / 3x / 50-page rules). QEMU's migration/options.c
(DEFAULT_MIGRATE_SET_DOWNTIME, 300 ms) and migration/migration.c (threshold_size = bandwidth x
downtime limit). The default bandwidth (1 Gbit/s) is an assumption; the default memory, working set and
dirty rates are those of `benchmarks/migration.py` (1 GiB, 256 MiB, 0-200 MB/s).
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

from pyrovisor.errors import ConfigError
from pyrovisor.lab.model import Assumption, LabResult, Table
from pyrovisor.lab.stats import Estimate, add_seed_arguments, estimate, seeds_of

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MB = 1_000_000
MiB = 1 << 20

POLICIES = ("pyrovisor", "xen", "qemu")
QEMU_DOWNTIME_LIMIT_S = 0.3  # QEMU migration/options.c: DEFAULT_MIGRATE_SET_DOWNTIME, 300 ms
PYROVISOR_MAX_ROUNDS = 30  # pyrovisor's own cap (PrecopyPolicy.max_rounds), from no paper
XEN_MAX_ITERS = 29  # Xen xc_domain_save.c: DEF_MAX_ITERS, "limit us to 30 times round loop"
XEN_MAX_FACTOR = 3.0  # Xen xc_domain_save.c: DEF_MAX_FACTOR, "never send more than 3x p2m_size"
XEN_FEW_PAGES = 50  # Xen xc_domain_save.c: last iteration once a round sent fewer than 50 pages
QEMU_MODEL_CUTOFF = 30  # the model's, not QEMU's: QEMU has no round cap
CLARK_DOWNTIMES_MS = (("SPECweb", 210.0), ("Quake 3", 60.0))  # Clark et al., NSDI 2005, measured


class StopReason(Enum):
    """Why pre-copy stopped iterating. The first two are convergence; the others force the switch."""

    FITS_LIMIT = "fits the downtime limit"
    FEW_PAGES = "few pages left"
    SENT_FACTOR = "sent-memory factor reached"
    ROUND_CAP = "round cap"
    MODEL_CUTOFF = "model cutoff"

    @property
    def converged(self) -> bool:
        return self in (StopReason.FITS_LIMIT, StopReason.FEW_PAGES)


@dataclass(frozen=True)
class StopRule:
    """When one hypervisor stops pre-copying. Built by `pyrovisor_rule`, `xen_rule` or `qemu_rule`.

    `max_rounds` live rounds at most; for QEMU (`cutoff`) that bound is the model's, QEMU itself goes on."""

    policy: str
    max_rounds: int
    downtime_limit_s: float | None = None  # switch once what is left can be sent within this
    few_pages: int | None = None  # switch once a round sent fewer pages than this (Xen)
    max_sent_factor: float | None = None  # switch once more than this many times memory was sent (Xen)
    cutoff: bool = False

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError("--policy", self.policy, f"one of {', '.join(POLICIES)}")
        if self.max_rounds < 1:
            raise ConfigError("--max-rounds", self.max_rounds, "at least one pre-copy round")
        if self.downtime_limit_s is not None and self.downtime_limit_s < 0:
            raise ConfigError("--downtime-limit", self.downtime_limit_s, "limits are not negative")
        if self.max_sent_factor is not None and self.max_sent_factor <= 0:
            raise ConfigError("--xen-max-factor", self.max_sent_factor, "a positive multiple of memory")
        if self.few_pages is not None and self.few_pages < 0:
            raise ConfigError("--xen-few-pages", self.few_pages, "a page count is not negative")

    def check(self, rounds: int, last_sent: float, left: float, sent: float, memory: float, bandwidth: float,
              page_size: int) -> StopReason | None:
        """After `rounds` live rounds, the last of which sent `last_sent` bytes while `left` bytes were dirtied
        and `sent` bytes went out in all: None to run another round, or why to stop and copy `left`."""
        if self.downtime_limit_s is not None and left <= bandwidth * self.downtime_limit_s:
            return StopReason.FITS_LIMIT
        if self.few_pages is not None and last_sent < self.few_pages * page_size:
            return StopReason.FEW_PAGES
        if self.max_sent_factor is not None and sent > self.max_sent_factor * memory:
            return StopReason.SENT_FACTOR
        if rounds >= self.max_rounds:
            return StopReason.MODEL_CUTOFF if self.cutoff else StopReason.ROUND_CAP
        return None

    def describe(self, reason: StopReason) -> str:
        """A short label for a table cell."""
        if reason is StopReason.FITS_LIMIT:
            return f"fits {(self.downtime_limit_s or 0.0) * 1e3:g} ms"
        if reason is StopReason.FEW_PAGES:
            return f"< {self.few_pages} pages"
        if reason is StopReason.SENT_FACTOR:
            return f"> {self.max_sent_factor:g}x memory sent"
        if reason is StopReason.ROUND_CAP:
            return f"cap: {self.max_rounds} rounds"
        return f"model cutoff at {self.max_rounds} (QEMU iterates on)"


def pyrovisor_rule(downtime_limit_s: float = QEMU_DOWNTIME_LIMIT_S,
                   max_rounds: int = PYROVISOR_MAX_ROUNDS) -> StopRule:
    """Switch once the rest fits the downtime limit, or after pyrovisor's own cap of `max_rounds` rounds."""
    return StopRule("pyrovisor", max_rounds, downtime_limit_s=downtime_limit_s)


def xen_rule(max_iters: int = XEN_MAX_ITERS, max_factor: float = XEN_MAX_FACTOR,
             few_pages: int = XEN_FEW_PAGES) -> StopRule:
    """Xen's xc_domain_save: 29 live iterations, more than 3x memory sent, or a round of fewer than 50 pages."""
    return StopRule("xen", max_iters, few_pages=few_pages, max_sent_factor=max_factor)


def qemu_rule(downtime_limit_s: float = QEMU_DOWNTIME_LIMIT_S, cutoff_rounds: int = QEMU_MODEL_CUTOFF) -> StopRule:
    """QEMU: switch once the rest fits the downtime limit; the model gives up after `cutoff_rounds`, QEMU never."""
    return StopRule("qemu", cutoff_rounds, downtime_limit_s=downtime_limit_s, cutoff=True)


@dataclass(frozen=True)
class PrecopyPrediction:
    """The analytic model's answer (`round_bytes`: V_0 .. V_n, the last one sent during the pause)."""

    rounds: int
    total_time_s: float
    downtime_s: float
    bytes_sent: int
    converged: bool
    dirty_ratio: float  # lambda = D / R
    threshold_bytes: float  # V_thd = R * downtime limit (0 for a rule without one)
    round_bytes: tuple[float, ...]
    stop: StopReason
    policy: str = "pyrovisor"
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
    stop: StopReason
    policy: str = "pyrovisor"
    page_size: int = 4096


def _check(memory_bytes: int, bandwidth_bytes_per_s: float, dirty_bytes_per_s: float, downtime_limit_s: float,
           page_size: int) -> None:
    if memory_bytes <= 0 or page_size <= 0:
        raise ConfigError("memory", memory_bytes, "memory and page size must be positive")
    if bandwidth_bytes_per_s <= 0:
        raise ConfigError("--bandwidth", bandwidth_bytes_per_s, "the link must move some bytes")
    if dirty_bytes_per_s < 0 or downtime_limit_s < 0:
        raise ConfigError("--dirty-rates/--downtime-limit", (dirty_bytes_per_s, downtime_limit_s),
                          "rates and limits are not negative")


def precopy_rounds(memory_bytes: float, ratio: float, threshold_bytes: float, max_rounds: int) -> int:
    """n under the downtime-limit rule, from the closed form: the first i >= 1 whose V_i fits the threshold,
    at most `max_rounds`. `predict` iterates the recurrence instead; the tests check that the two agree."""
    if memory_bytes <= threshold_bytes or ratio == 0.0:
        return 1
    if ratio >= 1.0 or threshold_bytes <= 0:
        return max_rounds
    n = max(1, math.ceil((math.log(threshold_bytes) - math.log(memory_bytes)) / math.log(ratio)))
    n = min(n, max_rounds + 1)
    while n > 1 and memory_bytes * ratio ** (n - 1) <= threshold_bytes:  # guard the float logarithms
        n -= 1
    while n < max_rounds and memory_bytes * ratio**n > threshold_bytes:
        n += 1
    return min(n, max_rounds)


def _dirtied(memory: float, ratio: float, i: int) -> float:
    """V_i = V_mem lambda^i, at most all of memory."""
    return memory if ratio >= 1.0 else memory * ratio**i


def predict(memory_bytes: int, bandwidth_bytes_per_s: float, dirty_bytes_per_s: float,
            downtime_limit_s: float = QEMU_DOWNTIME_LIMIT_S, max_rounds: int = PYROVISOR_MAX_ROUNDS,
            page_size: int = 4096, resume_time_s: float = 0.0, rule: StopRule | None = None) -> PrecopyPrediction:
    """The analytic pre-copy model (Liu et al. 2011 form) for one guest and link, under one stop rule
    (default: pyrovisor's, with `downtime_limit_s` and `max_rounds`)."""
    rule = rule or pyrovisor_rule(downtime_limit_s, max_rounds)
    _check(memory_bytes, bandwidth_bytes_per_s, dirty_bytes_per_s, rule.downtime_limit_s or 0.0, page_size)
    memory = float(math.ceil(memory_bytes / page_size) * page_size)
    ratio = dirty_bytes_per_s / bandwidth_bytes_per_s
    volumes = [memory]
    sent = memory
    while True:
        left = _dirtied(memory, ratio, len(volumes))
        reason = rule.check(len(volumes), volumes[-1], left, sent, memory, bandwidth_bytes_per_s, page_size)
        if reason is not None:
            break
        volumes.append(left)
        sent += left
    rounds = len(volumes)
    volumes.append(left)
    # V_mig in closed form (the running sum above only feeds Xen's 3x rule)
    sent = memory * (1.0 - ratio ** (rounds + 1)) / (1.0 - ratio) if ratio < 1.0 else memory * (rounds + 1)
    return PrecopyPrediction(
        rounds=rounds, total_time_s=sent / bandwidth_bytes_per_s + resume_time_s,
        downtime_s=left / bandwidth_bytes_per_s + resume_time_s, bytes_sent=round(sent),
        converged=reason.converged, dirty_ratio=ratio,
        threshold_bytes=bandwidth_bytes_per_s * (rule.downtime_limit_s or 0.0), round_bytes=tuple(volumes),
        stop=reason, policy=rule.policy, page_size=page_size,
    )


def simulate(memory_bytes: int, bandwidth_bytes_per_s: float, dirty_bytes_per_s: float, wws_bytes: int,
             downtime_limit_s: float = QEMU_DOWNTIME_LIMIT_S, max_rounds: int = PYROVISOR_MAX_ROUNDS,
             page_size: int = 4096, hot_fraction: float = 1.0, seed: int = 0, resume_time_s: float = 0.0,
             rule: StopRule | None = None) -> PrecopySimulation:
    """Pre-copy over a page bitmap, the guest writing mostly into a writable working set of `wws_bytes`,
    under one stop rule (default: pyrovisor's, with `downtime_limit_s` and `max_rounds`)."""
    rule = rule or pyrovisor_rule(downtime_limit_s, max_rounds)
    _check(memory_bytes, bandwidth_bytes_per_s, dirty_bytes_per_s, rule.downtime_limit_s or 0.0, page_size)
    if not 0.0 <= hot_fraction <= 1.0 or not 0 <= wws_bytes <= memory_bytes:
        raise ConfigError("--wws-mib/--hot-fraction", (wws_bytes, hot_fraction),
                          "the working set lies inside memory and the hot share is in [0, 1]")
    rng = np.random.default_rng(seed)
    pages = math.ceil(memory_bytes / page_size)
    hot_pages = min(pages, math.ceil(wws_bytes / page_size))
    page_time = page_size / bandwidth_bytes_per_s
    writes_per_s = dirty_bytes_per_s / page_size
    sent_per_round = [pages]
    sent = pages
    elapsed = 0.0
    while True:
        duration = sent_per_round[-1] * page_time
        elapsed += duration
        dirty = _pages_written(rng, round(writes_per_s * duration), pages, hot_pages, hot_fraction)
        reason = rule.check(len(sent_per_round), sent_per_round[-1] * page_size, dirty * page_size,
                            sent * page_size, pages * page_size, bandwidth_bytes_per_s, page_size)
        if reason is not None:
            break
        sent_per_round.append(dirty)
        sent += dirty
    downtime = dirty * page_time + resume_time_s
    return PrecopySimulation(
        rounds=len(sent_per_round), total_time_s=elapsed + downtime, downtime_s=downtime,
        bytes_sent=(sent + dirty) * page_size, converged=reason.converged,
        round_pages=(*sent_per_round, dirty), wws_pages=hot_pages, stop=reason, policy=rule.policy,
        page_size=page_size,
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


# --- The lab model ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SimulatedFigures:
    """One policy and dirty rate simulated over several seeds: each figure as a mean and 95 % interval."""

    runs: tuple[PrecopySimulation, ...]

    def _over(self, values: Sequence[float], digits: int) -> Estimate:
        return estimate(values).rounded(digits)

    @property
    def rounds(self) -> Estimate:
        return self._over([s.rounds for s in self.runs], 2)

    @property
    def total_s(self) -> Estimate:
        return self._over([s.total_time_s for s in self.runs], 2)

    @property
    def downtime_ms(self) -> Estimate:
        return self._over([s.downtime_s * 1e3 for s in self.runs], 1)

    @property
    def mib_sent(self) -> Estimate:
        return self._over([s.bytes_sent / MiB for s in self.runs], 0)

    @property
    def converged(self) -> str:
        return f"{sum(s.converged for s in self.runs)}/{len(self.runs)}"


@dataclass(frozen=True)
class PolicyRun:
    """Everything computed for one stop rule: the model and the simulations, one entry per dirty rate."""

    rule: StopRule
    predictions: tuple[PrecopyPrediction, ...]
    simulations: tuple[SimulatedFigures, ...]

    def stops(self, figures: SimulatedFigures) -> str:
        counts = Counter(s.stop for s in figures.runs)
        if len(counts) == 1:
            return self.rule.describe(next(iter(counts)))
        return ", ".join(f"{self.rule.describe(reason)} ({count}/{len(figures.runs)})"
                         for reason, count in counts.most_common())


def rules_of(args: argparse.Namespace) -> list[StopRule]:
    """The stop rules `--policy` selects, with their constants from the options."""
    made = {"pyrovisor": lambda: pyrovisor_rule(args.downtime_limit, args.max_rounds),
            "xen": lambda: xen_rule(args.xen_max_iters, args.xen_max_factor, args.xen_few_pages),
            "qemu": lambda: qemu_rule(args.downtime_limit, args.qemu_cutoff)}
    names = POLICIES if args.policy == "all" else (args.policy,)
    return [made[name]() for name in names]


def _rates_of(args: argparse.Namespace) -> list[float]:
    try:
        rates = {float(rate) for rate in args.dirty_rates.split(",")} | {args.dirty_rate}
    except ValueError as exc:
        raise ConfigError("--dirty-rates", args.dirty_rates, "give MB/s values separated by commas") from exc
    return [rate * MB for rate in sorted(rates)]


class PrecopyModel:
    name = "precopy"
    summary = "Pre-copy live migration: rounds, total time, downtime, bytes (Liu et al. model + WWS simulator)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--policy", choices=(*POLICIES, "all"), default="pyrovisor",
                            help="stop rule: pyrovisor (fits the limit, or its own cap of --max-rounds), xen "
                                 "(29 iterations, 3x memory sent or < 50 pages), qemu (fits the limit, never gives "
                                 "up; the model stops at --qemu-cutoff), or all to compare (default: %(default)s)")
        parser.add_argument("--memory-mib", type=float, default=1024.0, help="guest memory (default: %(default)s)")
        parser.add_argument("--bandwidth", type=float, default=125.0,
                            help="link bandwidth in MB/s (assumed; default: %(default)s, one gigabit per second)")
        parser.add_argument("--dirty-rates", default="0,10,50,100,200",
                            help="dirty rates in MB/s for the tables, comma-separated (default: %(default)s)")
        parser.add_argument("--dirty-rate", type=float, default=100.0,
                            help="dirty rate in MB/s of the headline figures, added to the tables' "
                                 "(default: %(default)s)")
        parser.add_argument("--wws-mib", type=float, default=256.0,
                            help="writable working set for the simulator (default: %(default)s)")
        parser.add_argument("--hot-fraction", type=float, default=1.0,
                            help="share of writes inside the working set (default: %(default)s)")
        parser.add_argument("--downtime-limit", type=float, default=QEMU_DOWNTIME_LIMIT_S,
                            help="seconds, for pyrovisor and qemu (default: %(default)s, QEMU's 300 ms)")
        parser.add_argument("--max-rounds", type=int, default=PYROVISOR_MAX_ROUNDS,
                            help="pyrovisor's cap on live rounds, its own choice (default: %(default)s)")
        parser.add_argument("--qemu-cutoff", type=int, default=QEMU_MODEL_CUTOFF,
                            help="rounds after which the model stops following QEMU, which itself never gives "
                                 "up (default: %(default)s)")
        parser.add_argument("--xen-max-iters", type=int, default=XEN_MAX_ITERS,
                            help="Xen's cap on live iterations (default: %(default)s, DEF_MAX_ITERS)")
        parser.add_argument("--xen-max-factor", type=float, default=XEN_MAX_FACTOR,
                            help="Xen stops once more than this many times memory was sent "
                                 "(default: %(default)s, DEF_MAX_FACTOR)")
        parser.add_argument("--xen-few-pages", type=int, default=XEN_FEW_PAGES,
                            help="Xen stops after a round of fewer pages than this (default: %(default)s)")
        parser.add_argument("--page-size", type=int, default=4096, help="bytes (default: %(default)s)")
        parser.add_argument("--resume-time", type=float, default=0.0, help="T_resume in seconds (default: %(default)s)")
        add_seed_arguments(parser, first=0)

    def run(self, args: argparse.Namespace) -> LabResult:
        if args.memory_mib <= 0 or not 0 <= args.wws_mib <= args.memory_mib:
            raise ConfigError("--memory-mib/--wws-mib", (args.memory_mib, args.wws_mib),
                              "memory is positive and the working set lies inside it")
        memory = round(args.memory_mib * MiB)
        wws = round(args.wws_mib * MiB)
        bandwidth = args.bandwidth * MB
        rates = _rates_of(args)
        seeds = seeds_of(args)
        runs = []
        for rule in rules_of(args):
            predictions = tuple(predict(memory, bandwidth, rate, page_size=args.page_size,
                                        resume_time_s=args.resume_time, rule=rule) for rate in rates)
            simulations = tuple(SimulatedFigures(tuple(
                simulate(memory, bandwidth, rate, wws, page_size=args.page_size, hot_fraction=args.hot_fraction,
                         seed=seed, resume_time_s=args.resume_time, rule=rule) for seed in seeds)) for rate in rates)
            runs.append(PolicyRun(rule, predictions, simulations))
        headline_index = rates.index(args.dirty_rate * MB)
        return LabResult(
            tables=(model_table(args, memory, rates, runs), simulation_table(args, wws, rates, runs)),
            plot=lambda figure: plot(figure, rates, bandwidth, runs),
            summary=_summary(rates, bandwidth, runs),
            headline=_headline(runs, headline_index),
            assumptions=_assumptions(args, runs),
        )


def model_table(args: argparse.Namespace, memory: int, rates: list[float], runs: list[PolicyRun]) -> Table:
    return Table(
        title=f"Pre-copy of {memory / MiB:g} MiB over {args.bandwidth:g} MB/s: analytic model (Liu et al. 2011 "
              "form)",
        columns=("policy", "dirty MB/s", "lambda", "rounds", "total s", "downtime ms", "MiB sent", "converged",
                 "stop"),
        rows=tuple((run.rule.policy, f"{rate / MB:g}", round(p.dirty_ratio, 3), p.rounds, round(p.total_time_s, 2),
                    round(p.downtime_s * 1e3, 1), round(p.bytes_sent / MiB), "yes" if p.converged else "no",
                    run.rule.describe(p.stop))
                   for run in runs for rate, p in zip(rates, run.predictions, strict=True)),
        notes=("lambda = D / R; rounds: pre-copy rounds while the guest runs (round 0 sends all memory), then "
               "one stop-and-copy; converged: stopped by the policy's own test (what was left fitted the "
               "downtime limit, or for Xen a round sent fewer than --xen-few-pages pages), not by a cap.",
               f"pyrovisor's cap of {args.max_rounds} rounds is pyrovisor's own choice; Xen's 29 iterations and 3x "
               "memory are xc_domain_save's defaults; QEMU never gives up, so at its model cutoff the figures "
               "are those of a forced switch-over QEMU would not make (auto-converge is not modelled)."),
    )


def simulation_table(args: argparse.Namespace, wws: int, rates: list[float], runs: list[PolicyRun]) -> Table:
    count = args.seeds
    return Table(
        title=f"Simulation with a {wws / MiB:g} MiB writable working set, {count} seed"
              f"{'s' if count != 1 else ''} from {args.seed}: mean [95 % interval]",
        columns=("policy", "dirty MB/s", "rounds", "total s", "downtime ms", "MiB sent", "converged", "stop"),
        rows=tuple((run.rule.policy, f"{rate / MB:g}", s.rounds, s.total_s, s.downtime_ms, s.mib_sent, s.converged,
                    run.stops(s))
                   for run in runs for rate, s in zip(rates, run.simulations, strict=True)),
        notes=(f"{args.hot_fraction:.0%} of writes land in the working set; a rewrite of a page that is already "
               "dirty costs nothing, so the dirty set saturates near the working set. converged: seeds that "
               "converged.",),
    )


def _headline(runs: list[PolicyRun], index: int) -> tuple[tuple[str, float | Estimate], ...]:
    if len(runs) > 1:
        return tuple((f"downtime ms ({run.rule.policy})", round(run.predictions[index].downtime_s * 1e3, 3))
                     for run in runs)
    run = runs[0]
    p, s = run.predictions[index], run.simulations[index]
    return (("downtime ms (model)", round(p.downtime_s * 1e3, 3)), ("total s (model)", round(p.total_time_s, 3)),
            ("downtime ms (simulated)", s.downtime_ms), ("total s (simulated)", s.total_s))


def _assumptions(args: argparse.Namespace, runs: list[PolicyRun]) -> tuple[Assumption, ...]:
    policies = {run.rule.policy for run in runs}
    found = [
        Assumption("bandwidth MB/s", args.bandwidth, "assumed (one gigabit per second)"),
        Assumption("headline dirty rate MB/s", args.dirty_rate, "assumed; one of benchmarks/migration.py's rates"),
        Assumption("memory MiB", args.memory_mib, "benchmarks/migration.py's guest"),
        Assumption("writable working set MiB", args.wws_mib, "benchmarks/migration.py's memdirty working set"),
        Assumption("share of writes in the working set", args.hot_fraction, "assumed"),
        Assumption("write pattern", "uniform inside and outside the working set", "assumed"),
        Assumption("every dirtied byte is new (analytic model)", True, "Liu et al., HPDC 2011 (the basic model)"),
        Assumption("page size bytes", args.page_size, "x86 base page"),
        Assumption("resume time s", args.resume_time, "assumed"),
    ]
    if policies & {"pyrovisor", "qemu"}:
        found.append(Assumption("downtime limit s", args.downtime_limit,
                                "QEMU's default (migration/options.c, DEFAULT_MIGRATE_SET_DOWNTIME = 300 ms)"))
    if "pyrovisor" in policies:
        found.append(Assumption("pyrovisor round cap", args.max_rounds,
                                "pyrovisor's own choice (PrecopyPolicy.max_rounds), not from a paper"))
    if "xen" in policies:
        found += [Assumption("Xen iteration cap", args.xen_max_iters, "Xen xc_domain_save.c, DEF_MAX_ITERS"),
                  Assumption("Xen sent-memory factor", args.xen_max_factor, "Xen xc_domain_save.c, DEF_MAX_FACTOR"),
                  Assumption("Xen few-pages threshold", args.xen_few_pages, "Xen xc_domain_save.c (50 pages)")]
    if "qemu" in policies:
        found.append(Assumption("QEMU model cutoff rounds", args.qemu_cutoff,
                                "assumed: the model's cutoff; QEMU itself has no round cap"))
    return tuple(found)


def _summary(rates: list[float], bandwidth: float, runs: list[PolicyRun]) -> tuple[str, ...]:
    lines = []
    for run in runs:
        for rate, p, s in zip(rates, run.predictions, run.simulations, strict=True):
            if p.converged:
                continue
            if p.stop is StopReason.MODEL_CUTOFF:
                what = (f"QEMU never completes (it iterates on; auto-converge is not modelled); at the model's "
                        f"cutoff of {p.rounds} rounds a forced switch-over would take {p.downtime_s:.2f} s")
            else:
                what = f"it stops after {p.rounds} rounds ({run.rule.describe(p.stop)}) with {p.downtime_s:.2f} s of " \
                       "downtime"
            lines.append(f"{run.rule.policy} at {rate / MB:g} MB/s (lambda = {p.dirty_ratio:.2g}): the model does not "
                         f"converge; {what}; with the working set the simulator converges in {s.converged} seeds "
                         f"(downtime {s.downtime_ms:.4g} ms)")
    return tuple(lines)


# --- The plot --------------------------------------------------------------------------------------------

_POLICY_STYLES = {"pyrovisor": ("C0", "-", "o", 6), "xen": ("C1", "--", "s", 5), "qemu": ("C2", ":", "^", 4)}


def plot(figure: Figure, rates: list[float], bandwidth: float, runs: list[PolicyRun]) -> None:
    """Three panels, all on logarithmic axes over positive values only (an empty round or a zero downtime
    has no place on them and is left out): bytes per round, total time and downtime against the dirty rate."""
    per_round, totals, downtimes = figure.subplots(1, 3)
    first = runs[0]
    for k, (rate, p, figures) in enumerate(zip(rates, first.predictions, first.simulations, strict=True)):
        colour = f"C{k}"
        _positive_plot(per_round, range(len(p.round_bytes)), [v / MiB for v in p.round_bytes], "-", color=colour,
                       label=f"{rate / MB:g} MB/s")
        for s in figures.runs:
            _positive_plot(per_round, range(len(s.round_pages)), [q * s.page_size / MiB for q in s.round_pages], "x",
                           color=colour, alpha=0.5, markersize=4)
    per_round.set_yscale("log")
    per_round.set_xlabel("round (last: stop and copy)")
    per_round.set_ylabel("MiB sent in the round")
    per_round.set_title(f"Per round, {first.rule.policy}", fontsize="small")
    per_round.legend(fontsize="x-small", title="lines: model, x: simulation", title_fontsize="x-small")
    x = [rate / MB for rate in rates]
    for run in runs:
        colour, style, marker, size = _POLICY_STYLES[run.rule.policy]
        _positive_plot(totals, x, [p.total_time_s for p in run.predictions], style, color=colour, marker=marker,
                       markersize=size, label=f"{run.rule.policy}, model")
        _estimate_bars(totals, x, [s.total_s for s in run.simulations], colour, f"{run.rule.policy}, simulation")
        _positive_plot(downtimes, x, [p.downtime_s * 1e3 for p in run.predictions], style, color=colour,
                       marker=marker, markersize=size)
        _estimate_bars(downtimes, x, [s.downtime_ms for s in run.simulations], colour, None)
    limits = {run.rule.downtime_limit_s for run in runs if run.rule.downtime_limit_s}
    for limit in sorted(limits):
        downtimes.axhline(limit * 1e3, color="grey", linestyle="-.", linewidth=0.8, label=f"limit {limit * 1e3:g} ms")
    for (workload, downtime), dashes in zip(CLARK_DOWNTIMES_MS, ((0, (1, 2)), (0, (4, 2))), strict=True):
        # measured on their own workloads, whose dirty rates are not on this axis: levels, not points
        downtimes.axhline(downtime, color="black", linestyle=dashes, linewidth=0.8,
                          label=f"Clark et al. 2005, measured: {workload} {downtime:g} ms")
    for axes, title, unit in ((totals, "Total migration time", "seconds"), (downtimes, "Downtime", "milliseconds")):
        axes.axvline(bandwidth / MB, color="grey", linestyle=":", linewidth=0.8,
                     label="dirty rate = bandwidth" if axes is totals else None)
        axes.set_yscale("log")
        axes.set_xlabel("dirty rate (MB/s)")
        axes.set_ylabel(unit)
        axes.set_title(f"{title} (zeros left out)", fontsize="small")
    handles = [*totals.get_legend_handles_labels()[0], *downtimes.get_legend_handles_labels()[0]]
    figure.legend(handles=handles, loc="outside lower center", ncol=3, fontsize="x-small")


def _positive_plot(axes: Axes, x: Sequence[float], y: Sequence[float], fmt: str, **style: object) -> None:
    """Plot the points with y > 0 only: a log axis has no place for the rest."""
    points = [(a, b) for a, b in zip(x, y, strict=True) if b > 0]
    if points:
        xs, ys = zip(*points, strict=True)
        axes.plot(xs, ys, fmt, **style)  # type: ignore[arg-type]


def _estimate_bars(axes: Axes, x: Sequence[float], values: Sequence[Estimate], colour: str,
                   label: str | None) -> None:
    """Simulated means with their 95 % intervals; an interval reaching zero or below is drawn to a tenth of the
    mean (a log axis cannot show it) and the mean itself is left out when it is zero."""
    kept = [(a, e) for a, e in zip(x, values, strict=True) if e.mean > 0]
    if not kept:
        return
    xs = [a for a, _ in kept]
    means = [e.mean for _, e in kept]
    below = [min(e.mean - e.low, 0.9 * e.mean) for _, e in kept]
    above = [e.high - e.mean for _, e in kept]
    axes.errorbar(xs, means, yerr=[below, above], fmt="x", color=colour, capsize=2, markersize=4,
                  label=None if label is None else f"{label} (95 % CI)")


MODEL = PrecopyModel()
