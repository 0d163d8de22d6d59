"""Nested page walks: a software MMU counts every memory reference of one- and two-dimensional walks.

A guest's x86-64 page tables and the host's EPT are built as 64-bit entries in simulated memory (the
guest's tables sit in the host frames the EPT maps them to). A walker translates every address of a
trace through a TLB, paging-structure caches for the guest (or native) levels, a nested TLB
(guest-physical -> host-physical) and paging-structure caches for the nested levels, and counts every
page-table entry it reads (`pyrovisor.lab.mmu`).

With n guest levels walked and m nested levels walked (4 or 5 levels, one fewer per side for 2 MiB
pages and two fewer for 1 GiB pages), a walk with nothing cached reads

    native: n entries          nested: (n + 1)(m + 1) - 1 entries

because each of the n guest tables and the final guest-physical address need an m-entry nested walk,
plus the n guest entries themselves: 24 for 4 + 4 levels, 35 for 5 + 5, 15 with 2 MiB pages on both
sides. From a trace the model reports walks per access w (TLB misses) and references per walk r.

Two cost models price a walk. With one cost c_r per reference, a walk costs r c_r. With a data cache
that page-table entries share with the data (`pyrovisor.lab.mmu.datacache`), each entry read either
hits it (c_hit) or goes to memory (c_miss), and a walk with h hits and u misses costs h c_hit + u c_miss.
With an assumed cost c_a of an access apart from translation and C the cycles of one walk,

    cycles per access = c_a + w C,      f = w C / (c_a + w C_native)

f_native and f_vm are the fractions of the bare-metal cycles spent walking, natively and nested (same
trace, same TLB, so w is the same), and the throughput model is

    QPS_vm / QPS_native = 1 / (1 + f_vm - f_native)

Given a measured native walk fraction f, the simulated reference ratio k = r_vm / r_native gives
f_vm = k f, so QPS_vm / QPS_native = 1 / (1 + (k - 1) f).

Calibration: for a random trace over F bytes of 4 KiB pages, a PDE cache of C entries covers C x 2 MiB,
and a native walk reads the leaf entry plus, when the PDE cache misses, the PDE:
r_native = 2 - min(1, C x 2 MiB / F) (uniform references: an LRU cache of C of N regions hits C/N).
The model finds, by running the walker, the footprint at which r_native equals Park et al.'s 1.5
(128 MiB for C = 32), and reports the nested walk there.

Every simulated figure is the mean over several seeds (trace and frame placement) with a 95 % Student-t
confidence interval.

Sources: R. Bhargava, B. Serebrin, F. Spadini, S. Manne, "Accelerating Two-Dimensional Page Walks for
Virtualized Systems", ASPLOS 2008 (the two-dimensional walk and its up to 24 references for 4 + 4
levels; nested TLB and page walk caches). C. H. Park, I. Vougioukas, A. Sandberg, D. Black-Schaffer,
"Every Walk's a Hit: Making Page Walks Single-Access Cache Hits", ASPLOS 2022 (abstract: page walker
caches already bring a native walk to 1.5 memory accesses; a virtualized walk takes 4.4). Entry
formats: Intel SDM vol. 3 (4-level and 5-level paging; EPT). Cache sizes and cycle costs are
assumptions (options).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from pyrovisor.lab.mmu.batch import available_workers, simulate, simulate_native, walk_trace
from pyrovisor.lab.mmu.caches import CacheGeometry
from pyrovisor.lab.mmu.config import MmuConfig
from pyrovisor.lab.mmu.counts import WalkCounts, combine
from pyrovisor.lab.mmu.datacache import CacheOutcome, cache_outcome, data_cache
from pyrovisor.lab.mmu.reference import ReferenceWalker
from pyrovisor.lab.mmu.tables import build_machine
from pyrovisor.lab.mmu.traces import PATTERNS, TraceSpec, footprint_pages, load_trace, synthetic
from pyrovisor.lab.mmu.x86 import PAGE_SIZES, PagingSide, parse_page_size
from pyrovisor.lab.model import Assumption, LabResult, Table
from pyrovisor.lab.stats import Estimate, add_seed_arguments, estimate, seeds_of

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PARK_NATIVE = 1.5  # Park et al., ASPLOS 2022, abstract: accesses per native walk with page walker caches
PARK_VIRTUALIZED = 4.4  # the same, virtualized (two-dimensional) walks
PARK = "Park et al., ASPLOS 2022 (abstract)"
MEASURED_WALK_FRACTIONS = (0.05, 0.10, 0.20, 0.30)
MiB = 1 << 20
PDE_REACH = 2 * MiB  # what one entry of the deepest guest paging-structure cache covers (4 KiB pages)
CALIBRATION_FOOTPRINTS_MIB = (32, 64, 128, 256, 512, 1024, 2048)  # the grid the search starts from
BISECTION_STEPS = 5  # halvings of the bracketing interval, in log(footprint)
CACHE_WARM_UP = 0.5  # share of each trace whose accesses only warm the data cache up
HISTOGRAM_SHARE = 0.99  # the histogram's x-range holds at least this share of each trace's walks
HEADLINE_PATTERN = "random"

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Workload:
    """A trace per seed: a synthetic pattern drawn with the seed, or a file's trace (the same for every seed)."""

    label: str
    spec: TraceSpec | None = None
    addresses: np.ndarray | None = None

    def trace(self, seed: int) -> np.ndarray:
        if self.addresses is not None:
            return self.addresses
        assert self.spec is not None
        return synthetic(replace(self.spec, seed=seed))


@dataclass(frozen=True)
class CostModel:
    """Assumed cycle costs: of an access apart from translation; of one page-walk reference (one cost for
    all); and of an entry read that hits the data cache or goes to memory (the hit/miss model)."""

    access_cycles: float = 100.0
    reference_cycles: float = 30.0
    hit_cycles: float = 16.0
    miss_cycles: float = 200.0

    def cycles(self, counts: WalkCounts) -> float:
        """Cycles for the whole trace, one cost per reference."""
        return counts.accesses * self.access_cycles + counts.references * self.reference_cycles

    def walk_fraction(self, counts: WalkCounts, baseline: WalkCounts) -> float:
        """Cycles spent walking in `counts`, as a fraction of all cycles of `baseline` (the bare-metal run)."""
        return counts.references * self.reference_cycles / self.cycles(baseline)

    def flat_walk_cycles(self, counts: WalkCounts) -> float:
        """Cycles of an average walk with one cost per reference: r c_r."""
        return counts.references_per_walk * self.reference_cycles

    def fitted_reference_cycles(self, native: WalkCounts, native_cache: CacheOutcome) -> float:
        """The one cost per reference that prices the native walk as the hit/miss model does."""
        references = native.references_per_walk
        return self.split_walk_cycles(native_cache) / references if references else 0.0

    def split_walk_cycles(self, outcome: CacheOutcome) -> float:
        """Cycles of an average walk when hits and misses cost differently: h c_hit + u c_miss."""
        return (outcome.per_walk(outcome.hits) * self.hit_cycles
                + outcome.per_walk(outcome.misses) * self.miss_cycles)


def qps_ratio(f_native: float, f_vm: float) -> float:
    """QPS_vm / QPS_native = 1 / (1 + f_vm - f_native), both fractions of the native run's cycles."""
    return 1.0 / (1.0 + f_vm - f_native)


def qps_ratio_from_measured(f_native: float, reference_ratio: float) -> float:
    """The same with f_vm = k * f_native, k the simulated ratio of references per walk."""
    return qps_ratio(f_native, reference_ratio * f_native)


def walk_fractions(walks_per_access: float, native_walk: float, vm_walk: float,
                   access_cycles: float) -> tuple[float, float]:
    """f_native and f_vm: cycles walking per access over bare-metal cycles per access, c_a + w C_native."""
    bare_metal = access_cycles + walks_per_access * native_walk
    return walks_per_access * native_walk / bare_metal, walks_per_access * vm_walk / bare_metal


def analytic_native_references(footprint: float, pwc_entries: int) -> float:
    """References per native walk of a uniformly random trace over `footprint` bytes of 4 KiB pages, with
    LRU paging-structure caches of `pwc_entries` (valid while the PDPTE cache covers the footprint)."""
    return 2.0 - min(1.0, pwc_entries * PDE_REACH / footprint)


def analytic_footprint(target: float, pwc_entries: int) -> float:
    """The footprint (bytes) at which `analytic_native_references` equals `target` (1 < target < 2)."""
    return pwc_entries * PDE_REACH / (2.0 - target)


@dataclass(frozen=True)
class SeedRun:
    """One seed of one workload: the counts, natively and nested, and where their entry reads were served."""

    native: WalkCounts
    nested: WalkCounts
    native_cache: CacheOutcome
    nested_cache: CacheOutcome


@dataclass(frozen=True)
class WorkloadResult:
    label: str
    runs: tuple[SeedRun, ...]

    def over_seeds(self, figure: Callable[[SeedRun], float]) -> Estimate:
        return estimate([figure(run) for run in self.runs])

    @property
    def native(self) -> WalkCounts:
        """All seeds' native counts added up."""
        return combine(run.native for run in self.runs)

    @property
    def nested(self) -> WalkCounts:
        return combine(run.nested for run in self.runs)

    @property
    def reference_ratio(self) -> float:
        native, nested = self.native, self.nested
        return nested.references / native.references if native.references else 1.0


def run_seeds(workloads: Sequence[Workload], config: MmuConfig, cache: CacheGeometry, seed: int) -> list[SeedRun]:
    """One seed of every workload on one machine (frames placed by `seed`) that maps every page of the
    synthetic footprint, or the pages a trace file touches: walk each trace natively and nested, and run
    both reference streams through the data cache (the first CACHE_WARM_UP of the accesses only warm it)."""
    traces = [w.trace(seed) for w in workloads]
    # the synthetic patterns share one footprint (base and size); a trace file maps what it touches
    mapped = [footprint_pages(w.spec, config.guest.page_size) for w in workloads[:1] if w.spec is not None]
    machine = build_machine(np.concatenate([*mapped, *traces]), config.guest, config.host or PagingSide(), seed=seed)
    runs = []
    for trace in traces:
        native, native_stream = walk_trace(machine, config.native(), trace)
        nested, nested_stream = walk_trace(machine, config, trace)
        warm = int(len(trace) * CACHE_WARM_UP)
        runs.append(SeedRun(native, nested, cache_outcome(native_stream, cache, warm),
                            cache_outcome(nested_stream, cache, warm)))
    return runs


def _run_seeds(job: tuple[Sequence[Workload], MmuConfig, CacheGeometry, int]) -> list[SeedRun]:
    return run_seeds(*job)


def cold_walk(config: MmuConfig) -> int:
    """References the reference walker makes for one access with every cache removed (must equal the formula)."""
    address = 0x7F12_3456_7000
    machine = build_machine(np.array([address]), config.guest, config.host or PagingSide())
    walker = ReferenceWalker(machine, config.cold())
    walker.access(address)
    return walker.counts().references


# --- calibration: the footprint at which a native walk reads Park et al.'s 1.5 references ---------------


def random_trace(footprint: float, accesses: int, seed: int) -> tuple[TraceSpec, np.ndarray]:
    spec = TraceSpec("random", accesses=accesses, footprint=int(footprint), seed=seed)
    return spec, synthetic(spec)


def native_walk_references(footprint: float, config: MmuConfig, accesses: int, seed: int) -> float:
    """References per native walk of a uniformly random trace over `footprint` bytes (no tables needed)."""
    _, trace = random_trace(footprint, accesses, seed)
    return simulate_native(config.guest, config, trace).references_per_walk


def nested_walk_references(footprint: float, config: MmuConfig, accesses: int, seed: int) -> float:
    """References per nested walk of the same trace, on a machine that maps the whole footprint."""
    spec, trace = random_trace(footprint, accesses, seed)
    pages = footprint_pages(spec, config.guest.page_size)
    machine = build_machine(np.concatenate([pages, trace]), config.guest, config.host or PagingSide(), seed=seed)
    return simulate(machine, config, trace, workers=1).references_per_walk


def crossing(target: float, measure: Callable[[float], float], grid: Sequence[float],
             steps: int = BISECTION_STEPS) -> tuple[list[float], float | None]:
    """`measure` at every footprint of `grid`; then, between the first two neighbours that bracket `target`,
    `steps` bisections in log(footprint) and a log-linear interpolation. None when the grid does not
    bracket it. `measure` must grow with the footprint (as references per walk do)."""
    values = [measure(x) for x in grid]
    bracket = next((i for i in range(len(grid) - 1) if values[i] <= target <= values[i + 1]), None)
    if bracket is None:
        return values, None
    low, high, at_low, at_high = grid[bracket], grid[bracket + 1], values[bracket], values[bracket + 1]
    for _ in range(steps):
        middle = math.sqrt(low * high)
        at_middle = measure(middle)
        if at_middle < target:
            low, at_low = middle, at_middle
        else:
            high, at_high = middle, at_middle
    if at_high == at_low:
        return values, math.sqrt(low * high)
    share = (target - at_low) / (at_high - at_low)
    return values, math.exp(math.log(low) + share * (math.log(high) - math.log(low)))


@dataclass(frozen=True)
class Calibration:
    grid_mib: tuple[float, ...]
    native_by_seed: tuple[tuple[float, ...], ...]  # per seed, per grid footprint
    footprint_mib: tuple[float, ...]  # per seed where the grid brackets the target
    native_there: tuple[float, ...]  # native references per walk at that footprint, per seed
    nested_there: tuple[float, ...]  # nested references per walk there


def _calibrate_seed(job: tuple[float, MmuConfig, int, int]) -> tuple[list[float], float | None, float, float]:
    target, config, accesses, seed = job

    def native(footprint_mib: float) -> float:
        return native_walk_references(footprint_mib * MiB, config, accesses, seed)

    values, found = crossing(target, native, CALIBRATION_FOOTPRINTS_MIB)
    if found is None:
        return values, None, math.nan, math.nan
    return values, found, native(found), nested_walk_references(found * MiB, config, accesses, seed)


def calibrate(target: float, config: MmuConfig, accesses: int, seeds: Sequence[int]) -> Calibration:
    """Per seed, the footprint at which a random trace's native walk reads `target` references."""
    per_seed = _over(_calibrate_seed, [(target, config, accesses, seed) for seed in seeds])
    found = [(p[1], p[2], p[3]) for p in per_seed if p[1] is not None]
    return Calibration(
        grid_mib=tuple(float(x) for x in CALIBRATION_FOOTPRINTS_MIB),
        native_by_seed=tuple(tuple(p[0]) for p in per_seed),
        footprint_mib=tuple(f for f, _, _ in found), native_there=tuple(n for _, n, _ in found),
        nested_there=tuple(v for _, _, v in found),
    )


def _over(function: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """`function` (a module-level one) over `items`, in parallel processes when there are CPUs to spare."""
    workers = min(len(items), available_workers())
    if workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return [function(item) for item in items]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(function, items))


class NestedPagingModel:
    name = "nested-paging"
    summary = "Nested (2-D) page walks on a software MMU: references per walk, walks per access, QPS model"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        trace = parser.add_argument_group("trace")
        trace.add_argument("--pattern", choices=(*PATTERNS, "all"), default="all",
                           help="synthetic access pattern (default: %(default)s)")
        trace.add_argument("--trace", type=Path, metavar="FILE",
                           help="addresses from a file instead (.npy, .bin: little-endian u64, or text: one per line)")
        trace.add_argument("--accesses", type=int, default=50_000,
                           help="synthetic trace length (default: %(default)s)")
        trace.add_argument("--footprint-mib", type=float, default=1024.0,
                           help="memory a synthetic trace spans, MiB (default: %(default)s)")
        trace.add_argument("--stride", type=int, default=64, help="sequential stride in bytes (default: %(default)s)")
        trace.add_argument("--nodes", type=int, default=1 << 16, help="pointer-chase list nodes (default: %(default)s)")
        trace.add_argument("--hot-fraction", type=float, default=0.9,
                           help="hot-cold: share of hot accesses (default: %(default)s)")
        trace.add_argument("--hot-mib", type=float, default=4.0, help="hot-cold: hot region, MiB (default: %(default)s)")
        add_seed_arguments(parser, first=1, count=5)
        mmu = parser.add_argument_group("MMU (sizes are assumed; all caches LRU)")
        mmu.add_argument("--guest-levels", type=int, choices=(4, 5), default=4)
        mmu.add_argument("--host-levels", type=int, choices=(4, 5), default=4)
        mmu.add_argument("--guest-page", choices=tuple(PAGE_SIZES), default="4K")
        mmu.add_argument("--host-page", choices=tuple(PAGE_SIZES), default="4K")
        mmu.add_argument("--tlb", type=int, default=1536, help="TLB entries (default: %(default)s)")
        mmu.add_argument("--tlb-ways", type=int, default=12, help="TLB ways, 0: fully associative (default: %(default)s)")
        mmu.add_argument("--pwc", type=int, default=32,
                         help="paging-structure cache entries per guest level, fully associative (default: %(default)s)")
        mmu.add_argument("--nested-tlb", type=int, default=64,
                         help="nested TLB entries, fully associative (default: %(default)s)")
        mmu.add_argument("--nested-pwc", type=int, default=32,
                         help="paging-structure cache entries per nested level (default: %(default)s)")
        mmu.add_argument("--cache-kib", type=int, default=2048,
                         help="data cache that entry reads share with the data, KiB, fully associative "
                              "(default: %(default)s)")
        costs = parser.add_argument_group("costs (assumed cycles)")
        costs.add_argument("--access-cycles", type=float, default=100.0,
                           help="an access apart from translation (default: %(default)s)")
        costs.add_argument("--reference-cycles", type=float, default=30.0,
                           help="one page-walk reference, the one-cost model (default: %(default)s)")
        costs.add_argument("--hit-cycles", type=float, default=16.0,
                           help="an entry read that hits the data cache (default: %(default)s)")
        costs.add_argument("--miss-cycles", type=float, default=200.0,
                           help="an entry read that goes to memory (default: %(default)s)")
        calibration = parser.add_argument_group("calibration against Park et al. (random traces)")
        calibration.add_argument("--target-native-refs", type=float, default=PARK_NATIVE,
                                 help="references per native walk to find the footprint for (default: "
                                      "%(default)s, Park et al.)")
        calibration.add_argument("--calibration-accesses", type=int, default=10_000,
                                 help="accesses per trace of the footprint search (default: %(default)s)")

    def run(self, args: argparse.Namespace) -> LabResult:
        config = mmu_config(args)
        costs = CostModel(args.access_cycles, args.reference_cycles, args.hit_cycles, args.miss_cycles)
        seeds = list(seeds_of(args))
        workloads = _workloads(args)
        cache = data_cache(args.cache_kib)
        by_seed = _over(_run_seeds, [(workloads, config, cache, seed) for seed in seeds])
        results = [WorkloadResult(w.label, tuple(runs[i] for runs in by_seed)) for i, w in enumerate(workloads)]
        calibration = calibrate(args.target_native_refs, config, args.calibration_accesses, seeds)
        return LabResult(
            tables=(workload_table(results, config, costs), cache_table(results, args.cache_kib),
                    cost_table(results, costs),
                    calibration_table(calibration, args.target_native_refs, config),
                    measured_fraction_table(results), cold_walk_table(config)),
            plot=lambda figure: plot(figure, results, calibration, costs, args.target_native_refs),
            summary=_summary(results, calibration, costs, args.target_native_refs),
            headline=headline(results, calibration, costs),
            assumptions=assumptions(args, config),
        )


def mmu_config(args: argparse.Namespace) -> MmuConfig:
    return MmuConfig(
        guest=PagingSide(args.guest_levels, parse_page_size(args.guest_page)),
        host=PagingSide(args.host_levels, parse_page_size(args.host_page)),
        tlb=CacheGeometry(args.tlb, args.tlb_ways), pwc=CacheGeometry(args.pwc),
        nested_tlb=CacheGeometry(args.nested_tlb), nested_pwc=CacheGeometry(args.nested_pwc),
    )


def _workloads(args: argparse.Namespace) -> list[Workload]:
    if args.trace is not None:
        path: Path = args.trace
        return [Workload(path.name, addresses=load_trace(path))]
    patterns = PATTERNS if args.pattern == "all" else (args.pattern,)
    return [Workload(pattern, TraceSpec(pattern, accesses=args.accesses, footprint=int(args.footprint_mib * MiB),
                                        stride=args.stride, nodes=args.nodes, hot_fraction=args.hot_fraction,
                                        hot_bytes=int(args.hot_mib * MiB), seed=args.seed))
            for pattern in patterns]


PRICINGS = ("one cost", "fitted", "hit-miss")  # how `walk_cycles` prices a walk


def walk_cycles(run: SeedRun, costs: CostModel, pricing: str) -> tuple[float, float]:
    """Cycles of the average native and nested walk of one seed. "one cost": c_r per reference; "fitted": one
    cost per reference chosen so the native walk costs what the hit/miss model says; "hit-miss": c_hit per
    entry read that hits the data cache and c_miss per one that goes to memory."""
    if pricing == "hit-miss":
        return costs.split_walk_cycles(run.native_cache), costs.split_walk_cycles(run.nested_cache)
    per_reference = (costs.fitted_reference_cycles(run.native, run.native_cache) if pricing == "fitted"
                     else costs.reference_cycles)
    return run.native.references_per_walk * per_reference, run.nested.references_per_walk * per_reference


def _fractions(run: SeedRun, costs: CostModel, pricing: str) -> tuple[float, float]:
    return walk_fractions(run.nested.walks_per_access, *walk_cycles(run, costs, pricing), costs.access_cycles)


def qps(run: SeedRun, costs: CostModel, pricing: str) -> float:
    """QPS vm/native of one seed under one of the PRICINGS."""
    return qps_ratio(*_fractions(run, costs, pricing))


def vm_walk_cost(run: SeedRun, costs: CostModel, pricing: str) -> float:
    """Cycles a nested walk costs beyond the native walk of the same trace."""
    native, nested = walk_cycles(run, costs, pricing)
    return nested - native


def workload_table(results: list[WorkloadResult], config: MmuConfig, costs: CostModel) -> Table:
    rows = []
    for r in results:
        rows.append((
            r.label, r.runs[0].nested.accesses, r.over_seeds(lambda s: s.nested.walks_per_access),
            r.over_seeds(lambda s: s.native.references_per_walk), r.over_seeds(lambda s: s.nested.references_per_walk),
            r.over_seeds(lambda s: s.nested.guest_references / max(s.nested.walks, 1)),
            r.over_seeds(lambda s: s.nested.nested_references / max(s.nested.walks, 1)),
            r.over_seeds(lambda s: 100 * _fractions(s, costs, "one cost")[0]),
            r.over_seeds(lambda s: 100 * _fractions(s, costs, "one cost")[1]),
            r.over_seeds(lambda s: qps(s, costs, "one cost"))))
    assert config.host is not None
    return Table(
        title=f"Page walks: guest {config.guest.describe()}, host {config.host.describe()}",
        columns=("trace", "accesses", "walks/access", "refs/walk native", "refs/walk nested", "guest refs",
                 "nested refs", "f_native %", "f_vm %", "QPS vm/native"),
        rows=tuple(rows),
        notes=(f"caches: TLB {config.tlb.describe()}, paging-structure {config.pwc.describe()} per level, "
               f"nested TLB {config.nested_tlb.describe()}, nested paging-structure {config.nested_pwc.describe()} "
               "per level (assumed sizes, LRU).",
               f"means over {len(results[0].runs)} seeds, with the 95% confidence interval in brackets.",
               f"f and QPS here: one cost per reference, {costs.access_cycles:g} cycles per access and "
               f"{costs.reference_cycles:g} per reference (assumed); QPS vm/native = 1 / (1 + f_vm - f_native).",
               f"Park et al. (ASPLOS 2022): {PARK_NATIVE} accesses per native walk and {PARK_VIRTUALIZED} per "
               "virtualized walk with page walker caches."),
    )


def cache_table(results: list[WorkloadResult], cache_kib: int) -> Table:
    def rate(outcome: Callable[[SeedRun], CacheOutcome], part: str) -> Callable[[SeedRun], float]:
        return lambda s: outcome(s).per_walk(getattr(outcome(s), part))

    def native(s: SeedRun) -> CacheOutcome:
        return s.native_cache

    def nested(s: SeedRun) -> CacheOutcome:
        return s.nested_cache

    rows = tuple((r.label, *(r.over_seeds(rate(outcome, part)) for outcome, part in (
        (native, "guest_hits"), (native, "guest_misses"), (nested, "guest_hits"), (nested, "guest_misses"),
        (nested, "nested_hits"), (nested, "nested_misses")))) for r in results)
    return Table(
        title="Entry reads per walk that hit the data cache or go to memory",
        columns=("trace", "native hits", "native misses", "nested: guest hits", "guest misses", "EPT hits",
                 "EPT misses"),
        rows=rows,
        notes=(f"data cache: {cache_kib} KiB, 64-byte lines, fully associative LRU, shared with the trace's data "
               f"(assumed); the first {CACHE_WARM_UP:.0%} of each trace only warms it up.",),
    )


def cost_table(results: list[WorkloadResult], costs: CostModel) -> Table:
    def per_pricing(figure: Callable[[SeedRun, CostModel, str], float], pricing: str) -> Callable[[SeedRun], float]:
        return lambda run: figure(run, costs, pricing)

    rows = []
    for r in results:
        rows.append((r.label, r.over_seeds(lambda s: costs.fitted_reference_cycles(s.native, s.native_cache)),
                     *(r.over_seeds(per_pricing(vm_walk_cost, p)) for p in PRICINGS),
                     *(r.over_seeds(per_pricing(qps, p)) for p in PRICINGS)))
    return Table(
        title="VM cost of a walk and QPS vm/native: one cost per reference vs reads that hit or miss the cache",
        columns=("trace", "fitted cycles/ref", *(f"VM cycles/walk {p}" for p in PRICINGS),
                 *(f"QPS {p}" for p in PRICINGS)),
        rows=tuple(rows),
        notes=(f"one cost: {costs.reference_cycles:g} cycles per reference; hit-miss: {costs.hit_cycles:g} cycles "
               f"per entry read that hits the data cache, {costs.miss_cycles:g} per read that goes to memory; "
               f"{costs.access_cycles:g} per access apart from translation (all assumed).",
               "fitted: one cost per reference chosen so that the native walk costs what it costs under hit-miss; "
               "it shows whether a nested walk's references are dearer than a native walk's.",
               "VM cycles/walk: what a nested walk costs beyond the native walk of the same access; "
               "paging-structure cache hits are not entry reads and cost nothing here."),
    )


def calibration_table(calibration: Calibration, target: float, config: MmuConfig) -> Table:
    four_k = config.guest.page_size == PAGE_SIZES["4K"]
    rows: list[tuple[object, ...]] = []
    for index, footprint in enumerate(calibration.grid_mib):
        analytic = analytic_native_references(footprint * MiB, config.pwc.entries) if four_k else ""
        rows.append((f"{footprint:g}", estimate([values[index] for values in calibration.native_by_seed]),
                     analytic, ""))
    if calibration.footprint_mib:
        analytic_mib = analytic_footprint(target, config.pwc.entries) / MiB if four_k and 1 < target < 2 else ""
        rows.append((f"found: {estimate(calibration.footprint_mib):.4g} (analytic {analytic_mib:.4g})"
                     if analytic_mib != "" else f"found: {estimate(calibration.footprint_mib):.4g}",
                     estimate(calibration.native_there), target, estimate(calibration.nested_there)))
    else:
        rows.append((f"not bracketed by {calibration.grid_mib[0]:g}-{calibration.grid_mib[-1]:g} MiB",
                     "", target, ""))
    return Table(
        title=f"Footprint at which a random trace's native walk reads {target:g} references (Park et al.: "
              f"{PARK_NATIVE} native, {PARK_VIRTUALIZED} virtualized)",
        columns=("footprint MiB", "refs/walk native", "analytic 2 - C*2MiB/F", "refs/walk nested"),
        rows=tuple(rows),
        notes=(f"the walker over a grid of footprints, then {BISECTION_STEPS} bisections in log(footprint) per "
               f"seed, {len(calibration.native_by_seed)} seeds; the last row gives the footprint found (mean and "
               "95% interval over seeds) and the walks there.",
               f"analytic: a random trace over F bytes misses the {config.pwc.entries}-entry PDE cache with "
               "probability 1 - C*2MiB/F, and then reads the PDE as well as the leaf entry."),
    )


def measured_fraction_table(results: list[WorkloadResult]) -> Table:
    def ratio(run: SeedRun) -> float:
        return run.nested.references / run.native.references if run.native.references else 1.0

    def at(f: float) -> Callable[[SeedRun], float]:
        return lambda run: qps_ratio_from_measured(f, ratio(run))

    rows = tuple((f"{f:.0%}", *(r.over_seeds(at(f)) for r in results)) for f in MEASURED_WALK_FRACTIONS)
    return Table(
        title="QPS vm/native for a measured native walk fraction f (f_vm = k f, k = nested/native references)",
        columns=("f_native", *(f"{r.label} (k={r.over_seeds(ratio).mean:.2f})" for r in results)),
        rows=rows,
    )


def cold_walk_table(config: MmuConfig) -> Table:
    assert config.host is not None
    cases = [("this configuration", config),
             ("4+4 levels, 4K/4K", MmuConfig()),
             ("5+5 levels, 4K/4K", MmuConfig(guest=PagingSide(5), host=PagingSide(5))),
             ("4+4 levels, 2M/2M", MmuConfig(guest=PagingSide(4, PAGE_SIZES["2M"]), host=PagingSide(4, PAGE_SIZES["2M"]))),
             ("4+4 levels, 1G/1G", MmuConfig(guest=PagingSide(4, PAGE_SIZES["1G"]), host=PagingSide(4, PAGE_SIZES["1G"])))]
    rows = []
    for label, case in cases:
        assert case.host is not None
        n, m = case.guest.walked_levels, case.host.walked_levels
        rows.append((label, n, m, case.native().cold_references(), cold_walk(case.native()),
                     case.cold_references(), cold_walk(case)))
    return Table(
        title="Cold walks (nothing cached): counted by the walker against the formula",
        columns=("case", "n", "m", "native n", "native counted", "nested (n+1)(m+1)-1", "nested counted"),
        rows=tuple(rows),
    )


def _headline_workload(results: list[WorkloadResult]) -> WorkloadResult:
    return next((r for r in results if r.label == HEADLINE_PATTERN), results[0])


def headline(results: list[WorkloadResult], calibration: Calibration,
             costs: CostModel) -> tuple[tuple[str, float | Estimate], ...]:
    main = _headline_workload(results)
    found = estimate(calibration.footprint_mib) if calibration.footprint_mib else math.nan
    return (
        (f"refs/native walk ({main.label})", main.over_seeds(lambda s: s.native.references_per_walk)),
        (f"refs/nested walk ({main.label})", main.over_seeds(lambda s: s.nested.references_per_walk)),
        (f"QPS vm/native hit-miss ({main.label})", main.over_seeds(lambda s: qps(s, costs, "hit-miss"))),
        ("footprint MiB at target refs/native walk", found),
    )


def assumptions(args: argparse.Namespace, config: MmuConfig) -> tuple[Assumption, ...]:
    return (
        Assumption("TLB", config.tlb.describe(), "assumed (of the order of a second-level TLB), LRU"),
        Assumption("paging-structure cache entries per guest level", args.pwc, "assumed, LRU"),
        Assumption("nested TLB entries", args.nested_tlb, "assumed, LRU"),
        Assumption("paging-structure cache entries per nested level", args.nested_pwc, "assumed, LRU"),
        Assumption("data cache KiB (shared by entry reads and data)", args.cache_kib, "assumed, LRU"),
        Assumption("share of each trace that only warms the data cache", CACHE_WARM_UP, "assumed"),
        Assumption("cycles per access apart from translation", args.access_cycles, "assumed"),
        Assumption("cycles per reference (one-cost model)", args.reference_cycles, "assumed"),
        Assumption("cycles per entry read hitting the data cache", args.hit_cycles, "assumed"),
        Assumption("cycles per entry read going to memory", args.miss_cycles, "assumed"),
        Assumption("footprint of the synthetic traces MiB", args.footprint_mib, "assumed"),
        Assumption("guest frames and host frames placed at random", True, "assumed"),
        Assumption("references per native walk, target of the footprint search", args.target_native_refs,
                   PARK if args.target_native_refs == PARK_NATIVE else "assumed"),
        Assumption("references per native walk with page walker caches", PARK_NATIVE, PARK),
        Assumption("references per virtualized walk with page walker caches", PARK_VIRTUALIZED, PARK),
    )


def _summary(results: list[WorkloadResult], calibration: Calibration, costs: CostModel,
             target: float) -> tuple[str, ...]:
    lines = [f"{r.label}: {r.over_seeds(lambda s: s.nested.references_per_walk):.3g} references per nested walk vs "
             f"{r.over_seeds(lambda s: s.native.references_per_walk):.3g} native (x{r.reference_ratio:.2f}; "
             f"Park et al.: {PARK_VIRTUALIZED} vs {PARK_NATIVE}, x{PARK_VIRTUALIZED / PARK_NATIVE:.2f})"
             for r in results]
    if calibration.footprint_mib:
        lines.append(f"a random trace's native walk reads {target:g} references at a footprint of "
                     f"{estimate(calibration.footprint_mib):.3g} MiB; the nested walk there reads "
                     f"{estimate(calibration.nested_there):.3g} (Park et al.: {PARK_VIRTUALIZED})")
    main = _headline_workload(results)
    lines.append(f"{main.label}: a nested walk costs {main.over_seeds(lambda s: vm_walk_cost(s, costs, 'hit-miss')):.3g} "
                 f"cycles more than a native one when misses cost {costs.miss_cycles:g} and hits "
                 f"{costs.hit_cycles:g}, against "
                 f"{main.over_seeds(lambda s: vm_walk_cost(s, costs, 'one cost')):.3g} with "
                 f"{costs.reference_cycles:g} per reference and "
                 f"{main.over_seeds(lambda s: vm_walk_cost(s, costs, 'fitted')):.3g} with one cost fitted to the "
                 "native walk")
    return tuple(lines)


def plot(figure: Figure, results: list[WorkloadResult], calibration: Calibration, costs: CostModel,
         target: float) -> None:
    figure.set_size_inches(14, 9)
    figure.set_layout_engine("constrained")  # makes room for the legends beside the axes
    (walks, histogram), (footprints, throughput) = figure.subplots(2, 2)
    _plot_references(walks, results)
    _plot_histogram(histogram, results)
    _plot_calibration(footprints, calibration, target)
    _plot_qps(throughput, results, costs)


def _error(values: list[Estimate]) -> np.ndarray:
    return np.array([[v.mean - v.low for v in values], [v.high - v.mean for v in values]])


def _plot_references(axes: Axes, results: list[WorkloadResult]) -> None:
    x = np.arange(len(results))
    native = [r.over_seeds(lambda s: s.native.references_per_walk) for r in results]
    nested = [r.over_seeds(lambda s: s.nested.references_per_walk) for r in results]
    axes.bar(x - 0.2, [v.mean for v in native], 0.4, yerr=_error(native), capsize=3, color="C0", label="native")
    axes.bar(x + 0.2, [v.mean for v in nested], 0.4, yerr=_error(nested), capsize=3, color="C1", label="nested")
    park = len(results)
    axes.plot([park - 0.2], [PARK_NATIVE], marker="*", markersize=14, linestyle="none", color="C0",
              markeredgecolor="black", label=f"Park et al. 2022, native ({PARK_NATIVE})")
    axes.plot([park + 0.2], [PARK_VIRTUALIZED], marker="*", markersize=14, linestyle="none", color="C1",
              markeredgecolor="black", label=f"Park et al. 2022, virtualized ({PARK_VIRTUALIZED})")
    axes.set_xticks(np.arange(len(results) + 1), [*(r.label for r in results), "Park et al."], rotation=15)
    axes.set_xlim(-0.6, park + 0.6)
    axes.set_ylabel("memory references per walk")
    axes.set_title("References per walk (warm caches; 95% CI over seeds)")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _plot_histogram(axes: Axes, results: list[WorkloadResult]) -> None:
    last = 1
    for r in results:
        counts = np.array(r.nested.references_histogram, dtype=float)
        if not counts.sum():
            continue
        share = counts / counts.sum()
        last = max(last, int(np.searchsorted(np.cumsum(share), HISTOGRAM_SHARE)) + 1)
        axes.step(np.arange(len(share)), share, where="mid", label=r.label)
    axes.axvline(PARK_VIRTUALIZED, color="C3", linestyle=":")
    axes.plot([PARK_VIRTUALIZED], [axes.get_ylim()[1] * 0.95], marker="*", markersize=12, linestyle="none",
              color="C3", label=f"Park et al. 2022, mean virtualized walk ({PARK_VIRTUALIZED})")
    axes.set_xlim(-0.5, max(last, math.ceil(PARK_VIRTUALIZED)) + 0.5)
    axes.set_xlabel(f"references in one nested walk (range: {HISTOGRAM_SHARE:.0%} of each trace's walks)")
    axes.set_ylabel("share of walks")
    axes.set_title("Nested walks by references made")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _plot_calibration(axes: Axes, calibration: Calibration, target: float) -> None:
    grid = list(calibration.grid_mib)
    values = [estimate([v[i] for v in calibration.native_by_seed]) for i in range(len(grid))]
    axes.errorbar(grid, [v.mean for v in values], yerr=_error(values), marker="o", capsize=3,
                  label="model, random trace, native")
    axes.plot([grid[0], grid[-1]], [PARK_NATIVE, PARK_NATIVE], marker="*", markersize=12, linestyle=":",
              color="C3", label=f"Park et al. 2022, native ({PARK_NATIVE})")
    axes.plot([grid[0], grid[-1]], [PARK_VIRTUALIZED, PARK_VIRTUALIZED], marker="*", markersize=12, linestyle=":",
              color="C1", label=f"Park et al. 2022, virtualized ({PARK_VIRTUALIZED})")
    if calibration.footprint_mib:
        found, nested = estimate(calibration.footprint_mib), estimate(calibration.nested_there)
        axes.axvline(found.mean, color="grey", linestyle="--", label=f"{target:g} refs/walk at {found.mean:.0f} MiB")
        axes.errorbar([found.mean], [nested.mean], yerr=_error([nested]), marker="s", color="C1", capsize=3,
                      linestyle="none", label=f"model, nested walk there ({nested.mean:.2f})")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("footprint of the random trace, MiB")
    axes.set_ylabel("references per walk")
    axes.set_title("Where the model matches Park et al.'s native walk")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _plot_qps(axes: Axes, results: list[WorkloadResult], costs: CostModel) -> None:
    x = np.arange(len(results))
    flat = [r.over_seeds(lambda s: qps(s, costs, "one cost")) for r in results]
    split = [r.over_seeds(lambda s: qps(s, costs, "hit-miss")) for r in results]
    axes.bar(x - 0.2, [v.mean for v in flat], 0.4, yerr=_error(flat), capsize=3, color="C2",
             label=f"one cost: {costs.reference_cycles:g} cycles per reference")
    axes.bar(x + 0.2, [v.mean for v in split], 0.4, yerr=_error(split), capsize=3, color="C4",
             label=f"hit {costs.hit_cycles:g} / miss {costs.miss_cycles:g} cycles")
    axes.set_xticks(x, [r.label for r in results], rotation=15)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("QPS vm / QPS native")
    axes.set_title("Throughput under nested paging, by cost model")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


MODEL = NestedPagingModel()
