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
overhead of encryption is T(t_enc) / T(0) - 1. Costs are linear in t_enc, T = A + B t_enc with
B = (1 - h_d) + w (R_g + R_n [host encrypts]) (1 - h_pt), so the decryption latency that produces an
overhead x is t_enc = x A / B.

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
M. Prvulovic, "Memory Predecryption: Hiding the Latency Overhead of Memory Encryption", WASSA 2005
(simulated an extra 128-cycle decryption latency per memory block; the top of the sweep here). The
latencies and hit rates are assumptions (options); t_enc for a given part is not published.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from pyrovisor.errors import ConfigError
from pyrovisor.lab.model import LabResult, Table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PARK_NATIVE = 1.5
PARK_VIRTUALIZED = 4.4
COUNTER_LIGHT_SLOWDOWN = 0.09  # average slowdown of irregular workloads under counterless encryption, ISCA 2024
ROGERS_DECRYPTION_CYCLES = 128.0  # WASSA 2005: the decryption latency they simulated
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


class SevModel:
    name = "sev"
    summary = "SEV memory encryption: walk and access cost when every DRAM fetch pays a decryption latency"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--t-cache", type=float, default=40.0, help="cycles, cache hit (assumed; default: %(default)s)")
        parser.add_argument("--t-mem", type=float, default=250.0, help="cycles, DRAM fetch (assumed; default: %(default)s)")
        parser.add_argument("--t-enc", type=float, default=40.0,
                            help="cycles of decryption per DRAM fetch (assumed; default: %(default)s)")
        parser.add_argument("--page-table-hit-rate", type=float, default=0.9, help="(default: %(default)s)")
        parser.add_argument("--data-hit-rate", type=float, default=0.8, help="(default: %(default)s)")
        parser.add_argument("--walks-per-access", type=float, default=0.1, help="TLB misses per access (default: %(default)s)")
        parser.add_argument("--plain-nested-tables", action="store_true",
                            help="the host does not encrypt its own memory (no SME): nested tables pay no t_enc")

    def run(self, args: argparse.Namespace) -> LabResult:
        latencies = Latencies(args.t_cache, args.t_mem, args.t_enc, args.page_table_hit_rate, args.data_hit_rate,
                              args.walks_per_access, not args.plain_nested_tables)
        return LabResult(tables=(cost_table(latencies), sweep_table(latencies)),
                         plot=lambda figure: plot(figure, latencies), summary=_summary(latencies))


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
        notes=(f"cycles; t_cache = {latencies.cache:g}, t_mem = {latencies.memory:g} (assumed). Nested tables "
               f"{'are encrypted too (host SME)' if latencies.host_encrypts else 'are plaintext (no host SME)'}.",),
    )


def sweep_table(latencies: Latencies) -> Table:
    walk = WALKS[3]
    rows = []
    for h in SWEEP_HIT_RATES:
        cells = []
        for t_enc in SWEEP_T_ENC[1:]:
            at = replace(latencies, decryption=t_enc, page_table_hit_rate=h, data_hit_rate=h)
            cells.append(f"{overhead(at.access(walk), at.plain().access(walk)):.1%}")
        rows.append((h, *cells))
    return Table(
        title="Access overhead of encryption for warm nested walks, by hit rate (page tables and data alike)",
        columns=("hit rate", *(f"t_enc={t:g}" for t in SWEEP_T_ENC[1:])),
        rows=tuple(rows),
        notes=(f"t_enc = {ROGERS_DECRYPTION_CYCLES:g}: the decryption latency Rogers et al. simulated (WASSA 2005).",),
    )


def _summary(latencies: Latencies) -> tuple[str, ...]:
    walk = WALKS[3]
    needed = latencies.decryption_for_overhead(COUNTER_LIGHT_SLOWDOWN, walk)
    irregular = replace(latencies, data_hit_rate=0.5, page_table_hit_rate=0.7, walks_per_access=0.5)
    needed_irregular = irregular.decryption_for_overhead(COUNTER_LIGHT_SLOWDOWN, walk)
    return (f"a {COUNTER_LIGHT_SLOWDOWN:.0%} slowdown (Counter-light, ISCA 2024: irregular workloads under SEV-like "
            f"encryption) needs t_enc = {needed:.0f} cycles with these hit rates, or {needed_irregular:.0f} cycles "
            "for an irregular workload with data hit rate 0.5, page-table hit rate 0.7 and 0.5 walks per access",)


def plot(figure: Figure, latencies: Latencies) -> None:
    left, right = figure.subplots(1, 2)
    hit_rates = np.linspace(0.0, 1.0, 101)
    walk = WALKS[3]
    for t_enc in SWEEP_T_ENC[1:]:
        values = []
        for h in hit_rates:
            at = replace(latencies, decryption=t_enc, page_table_hit_rate=float(h), data_hit_rate=float(h))
            values.append(100 * overhead(at.access(walk), at.plain().access(walk)))
        left.plot(hit_rates, values, label=f"t_enc = {t_enc:g}")
    left.set_xlabel("cache hit rate (page tables and data)")
    left.set_ylabel("access slowdown from encryption (%)")
    left.set_title("Warm nested walks, by hit rate")
    left.legend(fontsize="small")
    for k, walk in enumerate(WALKS):
        plain, encrypted = [], []
        for h in hit_rates:
            at = replace(latencies, page_table_hit_rate=float(h))
            plain.append(at.plain().walk(walk))
            encrypted.append(at.walk(walk))
        right.plot(hit_rates, encrypted, color=f"C{k}", label=f"{walk.label}, SEV")
        right.plot(hit_rates, plain, color=f"C{k}", linestyle=":")
    right.set_yscale("log")
    right.set_xlabel("page-table hit rate")
    right.set_ylabel("cycles per walk (dotted: no encryption)")
    right.set_title(f"Walk cost, t_enc = {latencies.decryption:g}")
    right.legend(fontsize="x-small")


MODEL = SevModel()
