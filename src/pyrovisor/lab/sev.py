"""Memory encryption (SEV): the cost a decryption latency on every DRAM fetch adds to page walks and accesses.

With AMD SEV, an AES engine in the memory controller decrypts every line read from DRAM; lines held
in the caches are plaintext, so a cache hit pays nothing extra. A memory reference that hits the
caches with probability h therefore costs

    t(h) = h t_cache + (1 - h) (t_mem + t_enc)

A walk of R_g guest-table references and R_n nested-table references (the guest's tables live in its
encrypted memory; the nested tables in host memory, encrypted only if the host uses SME too), with
page-table hit rate h_pt, costs

    T_walk = R_g t(h_pt) + R_n t_n(h_pt)         (t_n: t with t_enc = 0 if the host does not encrypt)

and an access with data hit rate h_d and w walks per access costs T_access = t(h_d) + w T_walk. The
overhead of encryption is T(t_enc) / T(0) - 1. A program that spends a share s of its time in these
accesses slows down by s times that overhead (s = 1 by default: the run time is the accesses).

t_enc is an input, swept: no decryption latency has been published for any EPYC part. Costs are linear
in t_enc, T = A + B t_enc with B = (1 - h_d) + w (R_g + R_n [host encrypts]) (1 - h_pt), so the
latency that gives a slowdown x is t_enc = (x / s) A / B. The model uses this only to say which t_enc
values are consistent with a published slowdown *under assumed hit rates*: Counter-light's 9 % is
consistent with a range of t_enc, one end per end of an assumed band of hit rates, and with any other
t_enc at some other hit rate. It is not a measurement of t_enc.

Walk sizes: cold walks read n = 4 entries natively and (n + 1)(m + 1) - 1 = 24 nested (4 guest, 20
nested). Warm walks use the averages Park et al. report with page walker caches, 1.5 references
natively and 4.4 virtualized; the nested-paging model shows a warm nested walk reads as many guest
entries as a native walk, so 1.5 of the 4.4 are counted as guest references and 2.9 as nested.

Sources: D. Kaplan, J. Powell, T. Woller, "AMD Memory Encryption", AMD white paper, 2016 (the AES
engine in the memory controller; encryption adds latency to DRAM accesses only). C. H. Park,
I. Vougioukas, A. Sandberg, D. Black-Schaffer, "Every Walk's a Hit", ASPLOS 2022 (abstract: 1.5 and
4.4 accesses per walk). "Counter-light Memory Encryption", ISCA 2024 (abstract: with counterless
encryption such as SEV every last-level-cache miss waits for the cipher after the data arrive;
real-system measurements show a 9 % average slowdown on irregular workloads). B. Rogers, Y. Solihin,
M. Prvulovic, "Memory Predecryption: Hiding the Latency Overhead of Memory Encryption", WASSA 2005,
ACM SIGARCH Computer Architecture News (simulated an extra 128-cycle decryption latency per memory
block). The latencies, hit rates and memory share are assumptions (options).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from pyrovisor.errors import ConfigError
from pyrovisor.lab.model import Assumption, LabResult, Table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PARK_NATIVE = 1.5
PARK_VIRTUALIZED = 4.4
COUNTER_LIGHT_SLOWDOWN = 0.09  # average slowdown of irregular workloads under counterless encryption, ISCA 2024
COUNTER_LIGHT = "Counter-light Memory Encryption, ISCA 2024"
ROGERS_DECRYPTION_CYCLES = 128.0  # WASSA 2005: the decryption latency they simulated
ROGERS = "Rogers, Solihin, Prvulovic, WASSA 2005"
KAPLAN = "Kaplan, Powell, Woller, AMD Memory Encryption white paper, 2016"
SWEEP_T_ENC = (0.0, 20.0, 40.0, 80.0, ROGERS_DECRYPTION_CYCLES)
SWEEP_HIT_RATES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


@dataclass(frozen=True)
class Walk:
    """How many page-table references one walk makes, by dimension."""

    label: str
    guest: float
    nested: float

    @property
    def references(self) -> float:
        return self.guest + self.nested


WALKS = (
    Walk("native, cold", 4, 0),
    Walk("nested 4+4, cold", 4, 20),
    Walk("native, warm (Park et al.)", PARK_NATIVE, 0),
    Walk("nested, warm (Park et al.)", PARK_NATIVE, PARK_VIRTUALIZED - PARK_NATIVE),
)
GUEST_WALK = WALKS[3]  # the walk of an SEV guest under nested paging, with page walker caches


@dataclass(frozen=True)
class Latencies:
    """Cycles and hit rates (all assumed)."""

    cache: float = 40.0  # a reference served by the cache hierarchy
    memory: float = 250.0  # a reference served by DRAM, before decryption
    decryption: float = 40.0  # t_enc, added to every DRAM fetch of encrypted memory
    page_table_hit_rate: float = 0.9
    data_hit_rate: float = 0.8
    walks_per_access: float = 0.1
    host_encrypts: bool = True  # SME on the host: nested tables are encrypted too

    def __post_init__(self) -> None:
        for name in ("page_table_hit_rate", "data_hit_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')}", getattr(self, name), "a hit rate is in [0, 1]")
        if min(self.cache, self.memory, self.decryption, self.walks_per_access) < 0:
            raise ConfigError("latencies", self, "latencies and walk rates are not negative")

    def plain(self) -> Latencies:
        return replace(self, decryption=0.0)

    def at_hit_rate(self, hit_rate: float) -> Latencies:
        """The same latencies with page tables and data hitting the caches alike."""
        return replace(self, page_table_hit_rate=hit_rate, data_hit_rate=hit_rate)

    def reference(self, hit_rate: float, encrypted: bool = True) -> float:
        """t(h) = h t_cache + (1 - h)(t_mem + t_enc)."""
        miss = self.memory + (self.decryption if encrypted else 0.0)
        return hit_rate * self.cache + (1.0 - hit_rate) * miss

    def walk(self, walk: Walk) -> float:
        h = self.page_table_hit_rate
        return walk.guest * self.reference(h) + walk.nested * self.reference(h, self.host_encrypts)

    def access(self, walk: Walk) -> float:
        return self.reference(self.data_hit_rate) + self.walks_per_access * self.walk(walk)

    def decryption_for_overhead(self, overhead: float, walk: Walk) -> float:
        """t_enc that makes an access `overhead` slower than without encryption (costs are linear in t_enc)."""
        plain = self.plain()
        encrypted_walk_refs = walk.guest + (walk.nested if self.host_encrypts else 0.0)
        per_cycle = (1.0 - self.data_hit_rate) + self.walks_per_access * encrypted_walk_refs * (1.0 - self.page_table_hit_rate)
        if per_cycle == 0:
            return float("inf")
        return overhead * plain.access(walk) / per_cycle


def overhead(encrypted: float, plain: float) -> float:
    return encrypted / plain - 1.0 if plain else 0.0


def slowdown(latencies: Latencies, memory_share: float, walk: Walk = GUEST_WALK) -> float:
    """A program's slowdown: the share of its time spent in the modelled accesses times their overhead."""
    return memory_share * overhead(latencies.access(walk), latencies.plain().access(walk))


def decryption_for_slowdown(latencies: Latencies, target: float, memory_share: float,
                            walk: Walk = GUEST_WALK) -> float:
    """The t_enc consistent with a published slowdown, given hit rates, latencies and memory share."""
    if memory_share <= 0:
        return float("inf")
    return latencies.decryption_for_overhead(target / memory_share, walk)


def hit_rate_for(latencies: Latencies, target: float, memory_share: float, walk: Walk = GUEST_WALK) -> float | None:
    """The hit rate (page tables and data alike) at which `latencies` give the slowdown `target`.

    The slowdown falls as the hit rate rises (zero at 1), so bisection finds it; None if even a hit rate
    of 0 stays below the target."""
    if slowdown(latencies.at_hit_rate(0.0), memory_share, walk) < target:
        return None
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if slowdown(latencies.at_hit_rate(middle), memory_share, walk) >= target:
            low = middle
        else:
            high = middle
    return (low + high) / 2


@dataclass(frozen=True)
class Consistency:
    """What the published points say about t_enc under an assumed band of hit rates."""

    low_hit_rate: float
    high_hit_rate: float
    t_enc_low: float  # t_enc giving Counter-light's 9 % at the low hit rate
    t_enc_high: float  # ... at the high hit rate
    t_enc_given: float  # ... at the given page-table and data hit rates
    rogers_low: float  # slowdown at Rogers et al.'s 128 cycles, low hit rate
    rogers_high: float
    rogers_given: float
    rogers_hit_rate: float | None  # the hit rate at which 128 cycles gives 9 %


def consistency(latencies: Latencies, memory_share: float, low_hit_rate: float, high_hit_rate: float) -> Consistency:
    rogers = replace(latencies, decryption=ROGERS_DECRYPTION_CYCLES)
    return Consistency(
        low_hit_rate, high_hit_rate,
        decryption_for_slowdown(latencies.at_hit_rate(low_hit_rate), COUNTER_LIGHT_SLOWDOWN, memory_share),
        decryption_for_slowdown(latencies.at_hit_rate(high_hit_rate), COUNTER_LIGHT_SLOWDOWN, memory_share),
        decryption_for_slowdown(latencies, COUNTER_LIGHT_SLOWDOWN, memory_share),
        slowdown(rogers.at_hit_rate(low_hit_rate), memory_share),
        slowdown(rogers.at_hit_rate(high_hit_rate), memory_share),
        slowdown(rogers, memory_share),
        hit_rate_for(rogers, COUNTER_LIGHT_SLOWDOWN, memory_share),
    )


class SevModel:
    name = "sev"
    summary = "SEV memory encryption: walk and access cost when every DRAM fetch pays a decryption latency"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--t-cache", type=float, default=40.0, help="cycles, cache hit (assumed; default: %(default)s)")
        parser.add_argument("--t-mem", type=float, default=250.0, help="cycles, DRAM fetch (assumed; default: %(default)s)")
        parser.add_argument("--t-enc", type=float, default=40.0,
                            help="cycles of decryption per DRAM fetch: the input to sweep, no published value for "
                                 "any EPYC part (default: %(default)s, illustrative)")
        parser.add_argument("--page-table-hit-rate", type=float, default=0.9, help="(assumed; default: %(default)s)")
        parser.add_argument("--data-hit-rate", type=float, default=0.8, help="(assumed; default: %(default)s)")
        parser.add_argument("--walks-per-access", type=float, default=0.1,
                            help="TLB misses per access (assumed; default: %(default)s)")
        parser.add_argument("--memory-share", type=float, default=1.0,
                            help="share of a program's time spent in the modelled accesses; its slowdown is this "
                                 "times their overhead (assumed; default: %(default)s)")
        parser.add_argument("--low-hit-rate", type=float, default=0.5,
                            help="low end of the hit rates (page tables and data alike) assumed for the irregular "
                                 "workloads behind Counter-light's 9 %% (default: %(default)s)")
        parser.add_argument("--high-hit-rate", type=float, default=0.9,
                            help="high end of that band (default: %(default)s)")
        parser.add_argument("--plain-nested-tables", action="store_true",
                            help="the host does not encrypt its own memory (no SME): nested tables pay no t_enc")

    def run(self, args: argparse.Namespace) -> LabResult:
        latencies = Latencies(args.t_cache, args.t_mem, args.t_enc, args.page_table_hit_rate, args.data_hit_rate,
                              args.walks_per_access, not args.plain_nested_tables)
        if not 0.0 < args.memory_share <= 1.0:
            raise ConfigError("--memory-share", args.memory_share, "a share of the run time is in (0, 1]")
        if not 0.0 <= args.low_hit_rate <= args.high_hit_rate < 1.0:
            raise ConfigError("--low-hit-rate/--high-hit-rate", (args.low_hit_rate, args.high_hit_rate),
                              "give 0 <= low <= high < 1")
        share = args.memory_share
        points = consistency(latencies, share, args.low_hit_rate, args.high_hit_rate)
        headline: tuple[tuple[str, float], ...] = (
            ("slowdown at t_enc %", 100 * slowdown(latencies, share)),
            ("t_enc for 9 %, low hit rate (cycles)", points.t_enc_low),
            ("t_enc for 9 %, high hit rate (cycles)", points.t_enc_high),
            ("slowdown at 128 cycles %", 100 * points.rogers_given),
        )
        return LabResult(tables=(cost_table(latencies), sweep_table(latencies, share),
                                 published_table(points)),
                         plot=lambda figure: plot(figure, latencies, share, points),
                         summary=_summary(latencies, share, points),
                         headline=headline,
                         assumptions=assumptions(args))


def assumptions(args: argparse.Namespace) -> tuple[Assumption, ...]:
    return (
        Assumption("t_enc cycles", args.t_enc, "assumed: the swept input; no published value for any EPYC part"),
        Assumption("decryption on DRAM fetches only, hits plaintext", True, KAPLAN),
        Assumption("t_cache cycles", args.t_cache, "assumed"),
        Assumption("t_mem cycles", args.t_mem, "assumed"),
        Assumption("page-table hit rate", args.page_table_hit_rate, "assumed"),
        Assumption("data hit rate", args.data_hit_rate, "assumed"),
        Assumption("walks per access", args.walks_per_access, "assumed"),
        Assumption("memory share of run time", args.memory_share, "assumed"),
        Assumption("hit-rate band for irregular workloads", [args.low_hit_rate, args.high_hit_rate], "assumed"),
        Assumption("nested tables encrypted (host SME)", not args.plain_nested_tables, "assumed"),
        Assumption("references per warm walk, native / nested", [PARK_NATIVE, PARK_VIRTUALIZED],
                   "Park et al., ASPLOS 2022"),
        Assumption("published slowdown under counterless encryption", COUNTER_LIGHT_SLOWDOWN,
                   f"{COUNTER_LIGHT}: average over irregular workloads, real system"),
        Assumption("published decryption latency cycles", ROGERS_DECRYPTION_CYCLES,
                   f"{ROGERS}: simulated, a 2005 design, not SEV"),
    )


def cost_table(latencies: Latencies) -> Table:
    plain = latencies.plain()
    rows = []
    for walk in WALKS:
        rows.append((walk.label, f"{walk.guest:g}+{walk.nested:g}", round(plain.walk(walk), 1),
                     round(latencies.walk(walk), 1), f"{overhead(latencies.walk(walk), plain.walk(walk)):.1%}",
                     round(plain.access(walk), 1), round(latencies.access(walk), 1),
                     f"{overhead(latencies.access(walk), plain.access(walk)):.1%}"))
    return Table(
        title=f"Cost with t_enc = {latencies.decryption:g} cycles per DRAM fetch "
              f"(page-table hit rate {latencies.page_table_hit_rate:g}, data {latencies.data_hit_rate:g}, "
              f"{latencies.walks_per_access:g} walks per access)",
        columns=("walk", "refs guest+nested", "walk plain", "walk SEV", "walk +", "access plain", "access SEV",
                 "access +"),
        rows=tuple(rows),
        notes=(f"cycles; t_cache = {latencies.cache:g}, t_mem = {latencies.memory:g}, t_enc = "
               f"{latencies.decryption:g} (all assumed; t_enc is the input to sweep). Nested tables "
               f"{'are encrypted too (host SME)' if latencies.host_encrypts else 'are plaintext (no host SME)'}.",),
    )


def sweep_table(latencies: Latencies, memory_share: float) -> Table:
    rows = []
    for h in SWEEP_HIT_RATES:
        at = latencies.at_hit_rate(h)
        cells = [f"{slowdown(replace(at, decryption=t_enc), memory_share):.1%}" for t_enc in SWEEP_T_ENC[1:]]
        rows.append((h, *cells, round(decryption_for_slowdown(at, COUNTER_LIGHT_SLOWDOWN, memory_share), 1)))
    return Table(
        title="Slowdown from encryption with warm nested walks, by hit rate (page tables and data alike) and t_enc",
        columns=("hit rate", *(f"t_enc={t:g}" for t in SWEEP_T_ENC[1:]), "t_enc for 9 %"),
        rows=tuple(rows),
        notes=(f"memory share {memory_share:g}. Last column: the t_enc at which the model gives Counter-light's "
               f"9 % at that hit rate. t_enc = {ROGERS_DECRYPTION_CYCLES:g}: the latency Rogers et al. simulated.",),
    )


def published_table(points: Consistency) -> Table:
    low, high = points.low_hit_rate, points.high_hit_rate
    where = "none" if points.rogers_hit_rate is None else round(points.rogers_hit_rate, 3)
    return Table(
        title="Published points and the t_enc consistent with them, conditional on the assumed hit rates",
        columns=("published point", "gives", f"hit rate {low:g}", f"hit rate {high:g}", "given hit rates"),
        rows=(
            (f"{COUNTER_LIGHT}: 9 % average slowdown", "t_enc (cycles)", round(points.t_enc_low, 1),
             round(points.t_enc_high, 1), round(points.t_enc_given, 1)),
            (f"{ROGERS}: 128 cycles (simulated)", "slowdown %", round(100 * points.rogers_low, 1),
             round(100 * points.rogers_high, 1), round(100 * points.rogers_given, 1)),
        ),
        notes=(f"Hit rate at which 128 cycles gives 9 %: {where} (page tables and data alike). A t_enc outside "
               f"[{points.t_enc_low:.0f}, {points.t_enc_high:.0f}] is consistent with 9 % too, at hit rates outside "
               f"[{low:g}, {high:g}].",),
    )


def _summary(latencies: Latencies, memory_share: float, points: Consistency) -> tuple[str, ...]:
    conditions = (f"hit rates {points.low_hit_rate:g}-{points.high_hit_rate:g} (page tables and data alike), "
                  f"{latencies.walks_per_access:g} walks per access, t_mem {latencies.memory:g}, "
                  f"memory share {memory_share:g}")
    rogers = ("no hit rate" if points.rogers_hit_rate is None
              else f"a hit rate of {points.rogers_hit_rate:.3f}")
    target = f"{100 * COUNTER_LIGHT_SLOWDOWN:g} %"
    rogers_range = sorted((points.rogers_low, points.rogers_high))
    return (
        f"t_enc is an input: no decryption latency is published for SEV. Counter-light's {target} is consistent "
        f"with t_enc = {points.t_enc_low:.0f}-{points.t_enc_high:.0f} cycles if {conditions}; other hit rates give "
        "other values",
        f"Rogers et al.'s {ROGERS_DECRYPTION_CYCLES:g} cycles gives {100 * rogers_range[0]:.1f}-"
        f"{100 * rogers_range[1]:.1f} % over the same band, and {target} at {rogers}",
    )


def plot(figure: Figure, latencies: Latencies, memory_share: float, points: Consistency) -> None:
    left, right = figure.subplots(1, 2)
    t_enc = np.linspace(0.0, 160.0, 161)
    low = latencies.at_hit_rate(points.low_hit_rate)
    high = latencies.at_hit_rate(points.high_hit_rate)

    def curve(at: Latencies) -> list[float]:
        return [100 * slowdown(replace(at, decryption=float(t)), memory_share) for t in t_enc]

    left.fill_between(t_enc, curve(high), curve(low), color="C0", alpha=0.2,
                      label=f"hit rates {points.low_hit_rate:g}-{points.high_hit_rate:g} (assumed)")
    left.plot(t_enc, curve(latencies), color="C0",
              label=f"given rates ({latencies.page_table_hit_rate:g} tables, {latencies.data_hit_rate:g} data)")
    target = 100 * COUNTER_LIGHT_SLOWDOWN
    left.axhline(target, color="C3", linestyle="--", linewidth=0.8)
    left.axvspan(points.t_enc_low, points.t_enc_high, color="C3", alpha=0.08)
    left.plot([points.t_enc_low, points.t_enc_high], [target, target], "s", color="C3",
              label="Counter-light (ISCA 2024): 9 %")
    left.axvline(ROGERS_DECRYPTION_CYCLES, color="C2", linestyle=":", linewidth=0.8)
    left.plot([ROGERS_DECRYPTION_CYCLES] * 2, [100 * points.rogers_high, 100 * points.rogers_low], "^", color="C2",
              label="Rogers et al. (WASSA 2005): 128 cycles")
    left.set_xlabel("t_enc, decryption cycles per DRAM fetch (input)")
    left.set_ylabel("slowdown from encryption (%)")
    left.set_title("Slowdown by t_enc (warm nested walks)", fontsize="medium")
    left.legend(fontsize="x-small", loc="upper left")

    hit_rates = np.linspace(0.0, 0.98, 197)
    needed = [decryption_for_slowdown(latencies.at_hit_rate(float(h)), COUNTER_LIGHT_SLOWDOWN, memory_share)
              for h in hit_rates]
    right.plot(hit_rates, needed, color="C3", label="t_enc giving Counter-light's 9 %")
    right.axvspan(points.low_hit_rate, points.high_hit_rate, color="C0", alpha=0.15, label="assumed band")
    right.plot([points.low_hit_rate, points.high_hit_rate], [points.t_enc_low, points.t_enc_high], "s", color="C3")
    right.axhline(ROGERS_DECRYPTION_CYCLES, color="C2", linestyle=":", linewidth=0.8,
                  label="Rogers et al.: 128 cycles")
    if points.rogers_hit_rate is not None:
        right.plot([points.rogers_hit_rate], [ROGERS_DECRYPTION_CYCLES], "^", color="C2")
        right.annotate(f"h = {points.rogers_hit_rate:.3f}", (points.rogers_hit_rate, ROGERS_DECRYPTION_CYCLES),
                       textcoords="offset points", xytext=(-4, 6), ha="right", fontsize="x-small")
    right.set_ylim(0, 1.1 * max(max(needed), ROGERS_DECRYPTION_CYCLES))
    right.set_xlabel("hit rate, page tables and data alike (assumed)")
    right.set_ylabel("t_enc (cycles)")
    right.set_title("Which t_enc gives 9 %, by hit rate", fontsize="medium")
    right.legend(fontsize="x-small", loc="upper left")


MODEL = SevModel()
