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
sides. From a trace the model reports walks per access w (TLB misses) and references per walk r, and
estimates the cost of translation with an assumed cost per access c_a and per reference c_r:

    cycles per access = c_a + w r c_r,      f = w r c_r / (cycles per access on bare metal)

f_native and f_vm are the fractions of the bare-metal cycles spent walking, natively and nested (same
trace, same TLB, so w is the same), and the throughput model is

    QPS_vm / QPS_native = 1 / (1 + f_vm - f_native)

Given a measured native walk fraction f, the simulated reference ratio k = r_vm / r_native gives
f_vm = k f, so QPS_vm / QPS_native = 1 / (1 + (k - 1) f).

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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pyrovisor.arch.x86_64.layout import parse_size
from pyrovisor.lab.mmu.batch import simulate
from pyrovisor.lab.mmu.caches import CacheGeometry
from pyrovisor.lab.mmu.config import MmuConfig
from pyrovisor.lab.mmu.counts import WalkCounts
from pyrovisor.lab.mmu.reference import ReferenceWalker
from pyrovisor.lab.mmu.tables import build_machine
from pyrovisor.lab.mmu.traces import PATTERNS, TraceSpec, load_trace, synthetic
from pyrovisor.lab.mmu.x86 import PAGE_SIZES, PagingSide, parse_page_size
from pyrovisor.lab.model import LabResult, Table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PARK_NATIVE = 1.5  # Park et al., ASPLOS 2022, abstract: accesses per native walk with page walker caches
PARK_VIRTUALIZED = 4.4  # the same, virtualized (two-dimensional) walks
MEASURED_WALK_FRACTIONS = (0.05, 0.10, 0.20, 0.30)


@dataclass(frozen=True)
class CostModel:
    """Assumed cycle costs: of an access apart from translation, and of one page-walk memory reference."""

    access_cycles: float = 100.0
    reference_cycles: float = 30.0

    def cycles(self, counts: WalkCounts) -> float:
        """Cycles for the whole trace."""
        return counts.accesses * self.access_cycles + counts.references * self.reference_cycles

    def walk_fraction(self, counts: WalkCounts, baseline: WalkCounts) -> float:
        """Cycles spent walking in `counts`, as a fraction of all cycles of `baseline` (the bare-metal run)."""
        return counts.references * self.reference_cycles / self.cycles(baseline)


def qps_ratio(f_native: float, f_vm: float) -> float:
    """QPS_vm / QPS_native = 1 / (1 + f_vm - f_native), both fractions of the native run's cycles."""
    return 1.0 / (1.0 + f_vm - f_native)


def qps_ratio_from_measured(f_native: float, reference_ratio: float) -> float:
    """The same with f_vm = k * f_native, k the simulated ratio of references per walk."""
    return qps_ratio(f_native, reference_ratio * f_native)


@dataclass(frozen=True)
class WorkloadResult:
    label: str
    native: WalkCounts
    nested: WalkCounts

    @property
    def reference_ratio(self) -> float:
        return self.nested.references / self.native.references if self.native.references else 1.0


def run_workload(label: str, trace: np.ndarray, config: MmuConfig, seed: int = 0) -> WorkloadResult:
    """Build a machine for the trace and walk it natively and nested."""
    machine = build_machine(trace, config.guest, config.host or PagingSide(), seed=seed)
    return WorkloadResult(label, simulate(machine, config.native(), trace), simulate(machine, config, trace))


def cold_walk(config: MmuConfig) -> int:
    """References the reference walker makes for one access with every cache removed (must equal the formula)."""
    address = 0x7F12_3456_7000
    machine = build_machine(np.array([address]), config.guest, config.host or PagingSide())
    walker = ReferenceWalker(machine, config.cold())
    walker.access(address)
    return walker.counts().references


class NestedPagingModel:
    name = "nested-paging"
    summary = "Nested (2-D) page walks on a software MMU: references per walk, walks per access, QPS model"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--pattern", choices=(*PATTERNS, "all"), default="all",
                            help="synthetic access pattern (default: %(default)s)")
        parser.add_argument("--trace", type=Path, metavar="FILE",
                            help="addresses from a file instead (.npy, .bin: little-endian u64, or text: one per line)")
        parser.add_argument("--accesses", type=int, default=200_000, help="synthetic trace length (default: %(default)s)")
        parser.add_argument("--footprint", default="1G", help="memory a synthetic trace spans (default: %(default)s)")
        parser.add_argument("--stride", type=int, default=64, help="sequential stride in bytes (default: %(default)s)")
        parser.add_argument("--nodes", type=int, default=1 << 16, help="pointer-chase list nodes (default: %(default)s)")
        parser.add_argument("--hot-fraction", type=float, default=0.9, help="hot-cold: share of hot accesses")
        parser.add_argument("--hot-size", default="4M", help="hot-cold: hot region (default: %(default)s)")
        parser.add_argument("--guest-levels", type=int, choices=(4, 5), default=4)
        parser.add_argument("--host-levels", type=int, choices=(4, 5), default=4)
        parser.add_argument("--guest-page", choices=tuple(PAGE_SIZES), default="4K")
        parser.add_argument("--host-page", choices=tuple(PAGE_SIZES), default="4K")
        parser.add_argument("--tlb", default="1536:12", help="TLB entries[:ways] (assumed; default: %(default)s)")
        parser.add_argument("--pwc", default="32", help="paging-structure cache per guest level (default: %(default)s)")
        parser.add_argument("--nested-tlb", default="64", help="nested TLB entries[:ways] (default: %(default)s)")
        parser.add_argument("--nested-pwc", default="32", help="paging-structure cache per nested level (default: %(default)s)")
        parser.add_argument("--access-cycles", type=float, default=100.0,
                            help="cycles of an access apart from translation (assumed; default: %(default)s)")
        parser.add_argument("--reference-cycles", type=float, default=30.0,
                            help="cycles of one page-walk reference (assumed; default: %(default)s)")
        parser.add_argument("--seed", type=int, default=1)

    def run(self, args: argparse.Namespace) -> LabResult:
        config = MmuConfig(
            guest=PagingSide(args.guest_levels, parse_page_size(args.guest_page)),
            host=PagingSide(args.host_levels, parse_page_size(args.host_page)),
            tlb=CacheGeometry.parse(args.tlb), pwc=CacheGeometry.parse(args.pwc),
            nested_tlb=CacheGeometry.parse(args.nested_tlb), nested_pwc=CacheGeometry.parse(args.nested_pwc),
        )
        costs = CostModel(args.access_cycles, args.reference_cycles)
        results = [run_workload(label, trace, config, args.seed) for label, trace in _workloads(args)]
        return LabResult(
            tables=(workload_table(results, config, costs), measured_fraction_table(results),
                    cold_walk_table(config)),
            plot=lambda figure: plot(figure, results),
            summary=_summary(results),
        )


def _workloads(args: argparse.Namespace) -> list[tuple[str, np.ndarray]]:
    if args.trace is not None:
        return [(args.trace.name, load_trace(args.trace))]
    patterns = PATTERNS if args.pattern == "all" else (args.pattern,)
    specs = [TraceSpec(p, accesses=args.accesses, footprint=parse_size(args.footprint), stride=args.stride,
                       nodes=args.nodes, hot_fraction=args.hot_fraction, hot_bytes=parse_size(args.hot_size),
                       seed=args.seed) for p in patterns]
    return [(spec.pattern, synthetic(spec)) for spec in specs]


def workload_table(results: list[WorkloadResult], config: MmuConfig, costs: CostModel) -> Table:
    rows = []
    for r in results:
        f_native = costs.walk_fraction(r.native, r.native)
        f_vm = costs.walk_fraction(r.nested, r.native)
        rows.append((r.label, f"{r.nested.accesses:,}", round(r.nested.walks_per_access, 4),
                     round(r.native.references_per_walk, 2), round(r.nested.references_per_walk, 2),
                     round(r.nested.guest_references / max(r.nested.walks, 1), 2),
                     round(r.nested.nested_references / max(r.nested.walks, 1), 2),
                     f"{f_native:.1%}", f"{f_vm:.1%}", round(qps_ratio(f_native, f_vm), 3)))
    assert config.host is not None
    return Table(
        title=f"Page walks: guest {config.guest.describe()}, host {config.host.describe()}",
        columns=("trace", "accesses", "walks/access", "refs/walk native", "refs/walk nested", "guest refs",
                 "nested refs", "f_native", "f_vm", "QPS vm/native"),
        rows=tuple(rows),
        notes=(f"caches: TLB {config.tlb.describe()}, paging-structure {config.pwc.describe()} per level, "
               f"nested TLB {config.nested_tlb.describe()}, nested paging-structure {config.nested_pwc.describe()} "
               "per level (assumed sizes, LRU).",
               f"f: walk cycles / bare-metal cycles, with {costs.access_cycles:g} cycles per access and "
               f"{costs.reference_cycles:g} per reference (assumed); QPS vm/native = 1 / (1 + f_vm - f_native).",
               f"Park et al. (ASPLOS 2022): {PARK_NATIVE} accesses per native walk and {PARK_VIRTUALIZED} per "
               "virtualized walk with page walker caches."),
    )


def measured_fraction_table(results: list[WorkloadResult]) -> Table:
    rows = tuple((f"{f:.0%}", *(round(qps_ratio_from_measured(f, r.reference_ratio), 3) for r in results))
                 for f in MEASURED_WALK_FRACTIONS)
    return Table(
        title="QPS vm/native for a measured native walk fraction f (f_vm = k f, k = nested/native references)",
        columns=("f_native", *(f"{r.label} (k={r.reference_ratio:.2f})" for r in results)),
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


def _summary(results: list[WorkloadResult]) -> tuple[str, ...]:
    return tuple(f"{r.label}: {r.nested.references_per_walk:.2f} references per nested walk vs "
                 f"{r.native.references_per_walk:.2f} native (x{r.reference_ratio:.2f}; Park et al.: "
                 f"{PARK_VIRTUALIZED} vs {PARK_NATIVE}, x{PARK_VIRTUALIZED / PARK_NATIVE:.2f})" for r in results)


def plot(figure: Figure, results: list[WorkloadResult]) -> None:
    left, right = figure.subplots(1, 2)
    x = np.arange(len(results))
    left.bar(x - 0.2, [r.native.references_per_walk for r in results], 0.4, label="native")
    left.bar(x + 0.2, [r.nested.references_per_walk for r in results], 0.4, label="nested")
    left.axhline(PARK_NATIVE, color="C0", linestyle=":", label=f"Park et al. native ({PARK_NATIVE})")
    left.axhline(PARK_VIRTUALIZED, color="C1", linestyle=":", label=f"Park et al. virtualized ({PARK_VIRTUALIZED})")
    left.set_xticks(x, [r.label for r in results], rotation=15)
    left.set_ylabel("memory references per walk")
    left.set_title("References per walk (warm caches)")
    left.legend(fontsize="small")
    for r in results:
        histogram = np.array(r.nested.references_histogram, dtype=float)
        if histogram.sum():
            right.step(np.arange(len(histogram)), histogram / histogram.sum(), where="mid", label=r.label)
    right.set_xlabel("references in one nested walk")
    right.set_ylabel("share of walks")
    right.set_title("Nested walks by references made")
    right.legend(fontsize="small")


MODEL = NestedPagingModel()
