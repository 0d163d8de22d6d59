"""Nested IOMMU vs shadow IOMMU: where a guest's DMA mappings cost, per map/unmap or per DMA.

A guest driving a device with its own IOMMU (a vIOMMU) maps each DMA buffer at an I/O virtual address
(IOVA) before the device touches it and unmaps it afterwards. The host can realise those mappings two ways:

- nested (two-stage) translation: the IOMMU walks the guest's IOVA->GPA table, and every guest table
  pointer and the final GPA go through the host's GPA->HPA table. Map and unmap are plain memory writes
  in the guest plus an IOTLB invalidation; a DMA that misses the IOTLB costs a two-dimensional walk of
    (n + 1)(m + 1) - 1 memory references    (n guest levels, m host levels; 24 for 4 + 4)
- shadow translation: the host traps every map and unmap (a VM exit), walks the guest table in
  software and keeps a combined IOVA->HPA table the IOMMU walks in one dimension: n references.

Per DMA the nested walk costs more; per map/unmap the shadow trap costs more. With r map+unmap
operations per DMA and an IOTLB miss rate q, the cycles per DMA are

    nested  = q * ((n+1)(m+1) - 1) * c_ref + r * c_map_nested
    shadow  = q * n * c_ref                + r * (c_exit + c_handler + ...)

and nested wins when r exceeds the crossover r* = q * ((n+1)(m+1) - 1 - n) * c_ref / (c_map_shadow - c_map_nested).
The tables here are real radix tables (9 bits per level, 4 KiB pages) built in simulated guest and host
physical memory; the walker counts every reference, and an LRU IOTLB caches IOVA->HPA translations and is
invalidated on unmap.

Figures: the direct cost of a VM exit, 2,000 cycles, is the one Landau, Ben-Yehuda and Gordon measured
on a Xeon X5570 with KVM ("SplitX: Split Guest/Hypervisor Execution on Multi-Core", WIOV 2011, Table 1),
who add that indirect and handling costs can be an order of magnitude higher. The per-reference cost,
handler cost, invalidation cost and IOTLB size are assumptions (options). Background: N. Amit, M.
Ben-Yehuda, D. Tsafrir, A. Schuster, "vIOMMU: Efficient IOMMU Emulation", USENIX ATC 2011 (an emulated
IOMMU whose every map/unmap traps; optimistic teardown and a sidecore to cut the cost); M. Malka, N. Amit,
M. Ben-Yehuda, D. Tsafrir, "rIOMMU: Efficient IOMMU for I/O Devices that Employ Ring Buffers", ASPLOS
2015 (IOTLB invalidation is costly; up to 7.56x throughput from avoiding it).
"""

from __future__ import annotations

import argparse
import enum
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pyrovisor.errors import ConfigError
from pyrovisor.lab.model import LabResult, Table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LEVEL_BITS = 9
ENTRY_BYTES = 8


class RadixTable:
    """A translation table of `levels` levels whose nodes are pages allocated in some physical address space."""

    def __init__(self, levels: int, allocate_node: Callable[[], int]) -> None:
        if not 1 <= levels <= 6:
            raise ConfigError("table levels", levels, "must be between 1 and 6")
        self.levels = levels
        self._allocate = allocate_node
        self.root = allocate_node()
        self.nodes: dict[int, dict[int, int]] = {self.root: {}}

    def _index(self, page: int, level: int) -> int:
        return (page >> (LEVEL_BITS * (self.levels - 1 - level))) & ((1 << LEVEL_BITS) - 1)

    def map(self, page: int, target: int) -> int:
        """Map `page` to `target` (page numbers); returns the number of entries written."""
        node = self.root
        written = 0
        for level in range(self.levels - 1):
            index = self._index(page, level)
            child = self.nodes[node].get(index)
            if child is None:
                child = self._allocate()
                self.nodes[child] = {}
                self.nodes[node][index] = child
                written += 1
            node = child
        self.nodes[node][self._index(page, self.levels - 1)] = target
        return written + 1

    def unmap(self, page: int) -> bool:
        node = self.root
        for level in range(self.levels - 1):
            child = self.nodes[node].get(self._index(page, level))
            if child is None:
                return False
            node = child
        return self.nodes[node].pop(self._index(page, self.levels - 1), None) is not None

    def walk(self, page: int) -> tuple[int | None, list[int]]:
        """The target of `page` and the addresses of the entries read, top level first."""
        node = self.root
        reads = []
        for level in range(self.levels):
            index = self._index(page, level)
            reads.append((node << 12) + index * ENTRY_BYTES)
            value = self.nodes[node].get(index)
            if value is None:
                return None, reads
            node = value
        return node, reads


class Iotlb:
    """An LRU cache of IOVA page -> HPA page."""

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self._cache: OrderedDict[int, int] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def lookup(self, iova_page: int) -> int | None:
        hpa = self._cache.get(iova_page)
        if hpa is None:
            self.misses += 1
            return None
        self._cache.move_to_end(iova_page)
        self.hits += 1
        return hpa

    def fill(self, iova_page: int, hpa_page: int) -> None:
        if self.entries <= 0:
            return
        self._cache[iova_page] = hpa_page
        self._cache.move_to_end(iova_page)
        while len(self._cache) > self.entries:
            self._cache.popitem(last=False)

    def invalidate(self, iova_page: int) -> None:
        self._cache.pop(iova_page, None)


class Mode(enum.Enum):
    NESTED = "nested"
    SHADOW = "shadow"


@dataclass(frozen=True)
class Costs:
    """Cycle costs of the primitive events. Only `exit` is a published measurement (SplitX, WIOV 2011)."""

    reference: int = 100  # assumed: one IOMMU page-walk memory reference
    exit: int = 2_000  # Landau et al. 2011: direct cost of an exit, Xeon X5570 + KVM
    handler: int = 2_000  # assumed: host software handling a trapped map or unmap
    invalidation: int = 1_000  # assumed: one IOTLB invalidation, queued and waited for


class IoAddressSpace:
    """One guest device's DMA translation in `mode`: guest IOVA table, host GPA table, optional shadow."""

    def __init__(self, mode: Mode, guest_levels: int, host_levels: int, iotlb_entries: int, costs: Costs,
                 nested_invalidation_exits: bool = False, seed: int = 0) -> None:
        self.mode = mode
        self.costs = costs
        self.nested_invalidation_exits = nested_invalidation_exits
        self._rng = np.random.default_rng(seed)
        self._next_gpa_page = 0x100
        self._next_hpa_page = 0x80000
        self.host = RadixTable(host_levels, self._allocate_hpa)
        self.guest = RadixTable(guest_levels, self._allocate_gpa)
        self.shadow = RadixTable(guest_levels, self._allocate_hpa) if mode is Mode.SHADOW else None
        self.iotlb = Iotlb(iotlb_entries)
        self.cycles = {"map": 0, "unmap": 0, "dma": 0}
        self.counts = {"map": 0, "unmap": 0, "dma": 0}
        self.walk_references = 0
        self.exits = 0

    def reset_counters(self) -> None:
        """Forget the costs so far (after warming up) but keep tables and IOTLB contents."""
        self.cycles = dict.fromkeys(self.cycles, 0)
        self.counts = dict.fromkeys(self.counts, 0)
        self.walk_references = 0
        self.exits = 0
        self.iotlb.hits = self.iotlb.misses = 0

    def _allocate_hpa(self) -> int:
        page = self._next_hpa_page
        self._next_hpa_page += 1
        return page

    def _allocate_gpa(self) -> int:
        page = self._next_gpa_page
        self._next_gpa_page += 1
        self.host.map(page, self._allocate_hpa())  # guest RAM is backed by host memory
        return page

    def allocate_buffer(self) -> int:
        """A guest page to DMA into (its GPA page number)."""
        return self._allocate_gpa()

    # -- walks ------------------------------------------------------------------------------------------

    def nested_walk(self, iova_page: int) -> tuple[int | None, int]:
        """Two-dimensional walk: every guest table node is found through the host table first."""
        references = 0
        node = self.guest.root
        for level in range(self.guest.levels):
            _, host_reads = self.host.walk(node)
            references += len(host_reads) + 1  # find the node's host page, then read its entry
            value = self.guest.nodes[node].get(self.guest._index(iova_page, level))
            if value is None:
                return None, references
            node = value
        hpa, host_reads = self.host.walk(node)  # node is now the data GPA page
        return hpa, references + len(host_reads)

    def _translate(self, iova_page: int) -> tuple[int | None, int]:
        if self.mode is Mode.NESTED:
            return self.nested_walk(iova_page)
        assert self.shadow is not None
        hpa, reads = self.shadow.walk(iova_page)
        return hpa, len(reads)

    # -- operations -------------------------------------------------------------------------------------

    def map(self, iova_page: int, gpa_page: int) -> None:
        c = self.costs
        written = self.guest.map(iova_page, gpa_page)
        cost = written * c.reference
        if self.mode is Mode.SHADOW:
            assert self.shadow is not None
            self.exits += 1
            _, guest_reads = self.guest.walk(iova_page)  # the host reads the guest's new entry
            hpa, host_reads = self.host.walk(gpa_page)
            assert hpa is not None
            shadow_written = self.shadow.map(iova_page, hpa)
            cost += c.exit + c.handler + (len(guest_reads) + len(host_reads) + shadow_written) * c.reference
        self.cycles["map"] += cost
        self.counts["map"] += 1

    def unmap(self, iova_page: int) -> None:
        c = self.costs
        self.guest.unmap(iova_page)
        self.iotlb.invalidate(iova_page)
        cost = c.reference + c.invalidation
        if self.mode is Mode.SHADOW:
            assert self.shadow is not None
            self.exits += 1
            self.shadow.unmap(iova_page)
            cost += c.exit + c.handler + c.reference
        elif self.nested_invalidation_exits:
            self.exits += 1
            cost += c.exit + c.handler
        self.cycles["unmap"] += cost
        self.counts["unmap"] += 1

    def dma(self, iova_page: int) -> int:
        """The device reads or writes one page at `iova_page`; returns the HPA page it reached."""
        hpa = self.iotlb.lookup(iova_page)
        cost = 0
        if hpa is None:
            hpa, references = self._translate(iova_page)
            if hpa is None:
                raise ConfigError("DMA", hex(iova_page << 12), "IOMMU fault: the IOVA is not mapped")
            self.walk_references += references
            cost = references * self.costs.reference
            self.iotlb.fill(iova_page, hpa)
        self.cycles["dma"] += cost
        self.counts["dma"] += 1
        return hpa


@dataclass(frozen=True)
class Workload:
    """A device ring: `ring_slots` buffers in flight, each used for `dmas_per_map` DMAs (0: mapped for good)."""

    ring_slots: int = 128
    dmas_per_map: int = 1
    dmas: int = 4096


@dataclass(frozen=True)
class RunResult:
    mode: Mode
    workload: Workload
    dmas: int
    maps: int
    unmaps: int
    exits: int
    miss_rate: float
    references_per_dma: float
    cycles_per_dma: float
    map_unmap_per_dma: float


def run(mode: Mode, workload: Workload, guest_levels: int = 4, host_levels: int = 4, iotlb_entries: int = 64,
        costs: Costs | None = None, nested_invalidation_exits: bool = False) -> RunResult:
    """Drive the ring: DMAs go round-robin over the slots; a slot's buffer is unmapped and replaced after
    `dmas_per_map` DMAs, as a driver with strict (unmap-on-completion) IOMMU mappings does."""
    space = IoAddressSpace(mode, guest_levels, host_levels, iotlb_entries, costs or Costs(),
                           nested_invalidation_exits)
    iova_base = 0x40000  # IOVA pages handed out to slots, recycled as in a real IOVA allocator
    free_iovas = list(range(iova_base + workload.ring_slots * 2, iova_base, -1))
    slots = []
    for _ in range(workload.ring_slots):
        iova = free_iovas.pop()
        space.map(iova, space.allocate_buffer())
        slots.append([iova, 0])
    space.reset_counters()  # the initial fill of the ring is not part of the steady state
    for n in range(workload.dmas):
        slot = slots[n % workload.ring_slots]
        space.dma(slot[0])
        slot[1] += 1
        if workload.dmas_per_map and slot[1] >= workload.dmas_per_map:
            space.unmap(slot[0])
            free_iovas.append(slot[0])
            slot[0] = free_iovas.pop(0)
            slot[1] = 0
            space.map(slot[0], space.allocate_buffer())
    dmas = space.counts["dma"]
    lookups = space.iotlb.hits + space.iotlb.misses
    return RunResult(mode, workload, dmas, space.counts["map"], space.counts["unmap"], space.exits,
                     space.iotlb.misses / lookups if lookups else 0.0, space.walk_references / dmas,
                     sum(space.cycles.values()) / dmas, (space.counts["map"] + space.counts["unmap"]) / dmas)


def nested_references(guest_levels: int, host_levels: int) -> int:
    """(n + 1)(m + 1) - 1."""
    return (guest_levels + 1) * (host_levels + 1) - 1


def crossover_dmas_per_map(guest_levels: int, host_levels: int, miss_rate: float, costs: Costs,
                           nested_invalidation_exits: bool = False) -> float:
    """DMAs per map/unmap pair above which the shadow table is cheaper (below it, nested is)."""
    extra_walk = miss_rate * (nested_references(guest_levels, host_levels) - guest_levels) * costs.reference
    # per map+unmap pair, the shadow path adds two exits and handlers plus its software walk and writes
    # (guest table read n, host walk m, shadow entry 1, shadow clear 1); nested may trap invalidations
    shadow_pair = 2 * (costs.exit + costs.handler) + (guest_levels + host_levels + 2) * costs.reference
    nested_pair = (costs.exit + costs.handler) if nested_invalidation_exits else 0
    if extra_walk <= 0:
        return float("inf")
    return (shadow_pair - nested_pair) / extra_walk


class IommuModel:
    name = "iommu"
    summary = "Nested (two-stage) vs shadow IOMMU translation: cost per map/unmap vs per DMA, and the crossover"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--guest-levels", type=int, default=4, help="guest IOMMU table levels (default: 4)")
        parser.add_argument("--host-levels", type=int, default=4, help="host (second-stage) levels (default: 4)")
        parser.add_argument("--iotlb", type=int, default=64, help="IOTLB entries (assumed; default: %(default)s)")
        parser.add_argument("--ring", type=int, default=128, help="buffers in flight (default: %(default)s)")
        parser.add_argument("--dmas", type=int, default=4096,
                            help="least DMAs simulated per point (default: %(default)s)")
        parser.add_argument("--reference-cycles", type=int, default=Costs.reference,
                            help="cycles per page-walk reference (assumed; default: %(default)s)")
        parser.add_argument("--exit-cycles", type=int, default=Costs.exit,
                            help="cycles per VM exit (default: %(default)s, SplitX's measurement)")
        parser.add_argument("--handler-cycles", type=int, default=Costs.handler,
                            help="host cycles to handle a trapped map/unmap (assumed; default: %(default)s)")
        parser.add_argument("--invalidation-cycles", type=int, default=Costs.invalidation,
                            help="cycles per IOTLB invalidation (assumed; default: %(default)s)")
        parser.add_argument("--nested-invalidation-exits", action="store_true",
                            help="the guest's invalidations trap to the host in nested mode too")

    def run(self, args: argparse.Namespace) -> LabResult:
        costs = Costs(args.reference_cycles, args.exit_cycles, args.handler_cycles, args.invalidation_cycles)
        sweep = [1, 2, 4, 8, 16, 32, 64, 0]
        points = []
        for per_map in sweep:
            # enough DMAs for every slot to be remapped at least twice
            workload = Workload(args.ring, per_map, max(args.dmas, 2 * args.ring * per_map))
            points.append(tuple(run(mode, workload, args.guest_levels, args.host_levels, args.iotlb, costs,
                                    args.nested_invalidation_exits) for mode in Mode))
        miss = points[-1][0].miss_rate
        crossover = crossover_dmas_per_map(args.guest_levels, args.host_levels, miss, costs,
                                           args.nested_invalidation_exits)
        return LabResult(
            tables=(walk_table(), sweep_table(points, args), _crossover_table(crossover, miss, costs, args)),
            plot=lambda figure: plot(figure, points, crossover),
            summary=(f"crossover: nested is cheaper below {crossover:.1f} DMAs per map/unmap pair "
                     f"(map+unmap per DMA above {2 / crossover:.3f}), shadow above it",),
        )


def walk_table() -> Table:
    rows = []
    for n, m in ((3, 3), (4, 4), (5, 5), (4, 5), (5, 4)):
        space = IoAddressSpace(Mode.NESTED, n, m, 0, Costs())
        buffer = space.allocate_buffer()
        space.map(0x12345, buffer)
        _, references = space.nested_walk(0x12345)
        rows.append((f"{n} + {m}", references, nested_references(n, m), n))
    return Table(title="IOMMU walk references for one DMA that misses the IOTLB",
                 columns=("guest + host levels", "nested (counted)", "(n+1)(m+1)-1", "shadow / native"),
                 rows=tuple(rows))


def sweep_table(points: list[tuple[RunResult, ...]], args: argparse.Namespace) -> Table:
    rows = []
    for nested, shadow in points:
        per_map = nested.workload.dmas_per_map
        rows.append((per_map or "never", round(nested.map_unmap_per_dma, 3), round(nested.miss_rate, 3),
                     round(nested.references_per_dma, 1), round(shadow.references_per_dma, 1),
                     round(nested.cycles_per_dma), round(shadow.cycles_per_dma),
                     "nested" if nested.cycles_per_dma < shadow.cycles_per_dma else "shadow"))
    return Table(
        title=f"Cycles per DMA, ring of {args.ring} buffers, IOTLB {args.iotlb} entries, "
              f"{args.guest_levels}+{args.host_levels} levels",
        columns=("DMAs/map", "ops/DMA", "miss", "refs N", "refs S", "cycles N", "cycles S", "cheaper"),
        rows=tuple(rows),
        notes=("ops/DMA: maps + unmaps per DMA; miss: IOTLB miss rate; refs: walk references per DMA; "
               "N nested, S shadow.",
               "cycles per DMA include that DMA's share of the map and unmap work; 'never': mapped once "
               "(static mappings), so only the walks count.",),
    )


def _crossover_table(crossover: float, miss: float, costs: Costs, args: argparse.Namespace) -> Table:
    return Table(
        title="Cost model (cycles)",
        columns=("reference", "VM exit", "trap handler", "invalidation", "miss rate", "crossover DMAs/map"),
        rows=((costs.reference, costs.exit, costs.handler, costs.invalidation, round(miss, 3),
               round(crossover, 2)),),
        notes=("VM exit: direct cost measured by Landau et al. (SplitX, WIOV 2011) on a Xeon X5570; "
               "the other costs are assumptions, change them with the options.",),
    )


def plot(figure: Figure, points: list[tuple[RunResult, ...]], crossover: float) -> None:
    axes = figure.subplots()
    finite = [p for p in points if p[0].workload.dmas_per_map]
    x = [p[0].workload.dmas_per_map for p in finite]
    axes.plot(x, [p[0].cycles_per_dma for p in finite], "o-", label="nested (two-stage walk, no traps)")
    axes.plot(x, [p[1].cycles_per_dma for p in finite], "s-", label="shadow (trap every map/unmap)")
    static = points[-1]
    axes.axhline(static[0].cycles_per_dma, color="C0", linestyle=":", label="nested, static mappings")
    axes.axhline(static[1].cycles_per_dma, color="C1", linestyle=":", label="shadow, static mappings")
    if crossover != float("inf"):
        axes.axvline(crossover, color="grey", linestyle="--", label=f"analytic crossover ({crossover:.1f})")
    axes.set_xscale("log", base=2)
    axes.set_xticks(x, [str(v) for v in x])
    axes.set_yscale("log")
    axes.set_xlabel("DMAs per map/unmap pair (log scale)")
    axes.set_ylabel("cycles per DMA (log scale)")
    axes.set_title("Who pays: nested walks per DMA vs shadow traps per map/unmap")
    axes.legend(fontsize="small")


MODEL = IommuModel()
