"""Nested IOMMU vs shadow IOMMU: where a guest's DMA mappings cost, per map/unmap or per DMA, and what
invalidation policy (strict, deferred, optimistic teardown) leaves of a 10 Gb/s line rate.

A guest driving a device with its own IOMMU (a vIOMMU) maps each DMA buffer at an I/O virtual address
(IOVA) before the device touches it and unmaps it afterwards. The host can realise those mappings two ways:

- nested (two-stage) translation: the IOMMU walks the guest's IOVA->GPA table, and every guest table
  pointer and the final GPA go through the host's GPA->HPA table. Map and unmap are plain memory writes
  in the guest plus an IOTLB invalidation; a DMA that misses the IOTLB costs a two-dimensional walk of
    (n + 1)(m + 1) - 1 memory references    (n guest levels, m host levels; 24 for 4 + 4)
  Whether the guest's invalidations reach the IOMMU without the host depends on the hardware: with an
  emulated invalidation queue they trap (a VM exit each); with a virtualised command queue they do not.
  The share that traps, t, is a parameter (--trapped-invalidations).
- shadow translation: the host traps every map and unmap (a VM exit), walks the guest table in
  software and keeps a combined IOVA->HPA table the IOMMU walks in one dimension: n references.

Per DMA the nested walk costs more; per map/unmap the shadow trap costs more. With r map+unmap
operations per DMA and an IOTLB miss rate q, the cycles per DMA are

    nested  = q * ((n+1)(m+1) - 1) * c_ref + r * (c_map + c_unmap + t/2 * (c_exit + c_handler))
    shadow  = q * n * c_ref                + r * (c_map + c_unmap + c_exit + c_handler + ...)

and nested wins below the crossover
    d* = [(2 - t) (c_exit + c_handler) + (n + m + 2) c_ref] / [q ((n+1)(m+1) - 1 - n) c_ref]
DMAs per map/unmap pair. The tables here are real radix tables (9 bits per level, 4 KiB pages) built in
simulated guest and host physical memory; the walker counts every reference, and an LRU IOTLB caches
IOVA->HPA translations.

Line rate. A receive ring maps a buffer per packet and unmaps it when the packet arrives, under one of
three invalidation policies: strict (invalidate the IOTLB entry at every unmap and wait), deferred
(clear the entry, flush the whole IOTLB once per 250 unmaps, as Linux's intel-iommu did) and
optimistic teardown (keep the mapping after the unmap and reuse it if the same page is mapped again
soon, tearing it down later; vIOMMU). Which page the next buffer gets is random: with probability
p_reuse a page freed a short while ago (seeded; several seeds give a mean and a 95 % interval). The CPU
is the bottleneck, so
    share of line rate = min(1, B / C),    B = f_cpu * 8 * frame bytes / line rate  (cycles per packet)
    C = c_stack + (events per packet) x (their costs)
where a guest pays t (c_exit + c_handler) more per invalidation under nested translation and traps on
every new mapping and invalidation under shadow translation.

Figures: the direct cost of a VM exit, 2,000 cycles, is the one Landau, Ben-Yehuda and Gordon measured
on a Xeon X5570 with KVM ("SplitX: Split Guest/Hypervisor Execution on Multi-Core", WIOV 2011, Table 1).
N. Amit, M. Ben-Yehuda, D. Tsafrir, A. Schuster, "vIOMMU: Efficient IOMMU Emulation", USENIX ATC 2011:
bare-metal Linux 2.6.36 reaches 43 % of a 10 Gb/s line rate with strict invalidation, 91 % with the
default batched invalidation, and 100 % with optimistic teardown. The stack cost c_stack and the
invalidation cost c_inv are calibrated so that strict and deferred land on 43 % and 91 % (two figures
fix two costs); optimistic teardown is then a prediction. The per-reference and DMA-API costs, the CPU
clock, the frame size, the IOTLB size and p_reuse are assumptions (options). M. Malka, N. Amit,
M. Ben-Yehuda, D. Tsafrir, "rIOMMU: Efficient IOMMU for I/O Devices that Employ Ring Buffers", ASPLOS
2015: IOTLB invalidation is costly (background).
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
from pyrovisor.lab.model import Assumption, LabResult, Table
from pyrovisor.lab.stats import Estimate, add_seed_arguments, estimate, seeds_of

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LEVEL_BITS = 9
ENTRY_BYTES = 8
SPLITX_SOURCE = "Landau et al., WIOV 2011"
VIOMMU_SOURCE = "Amit et al., USENIX ATC 2011"
LINUX_FLUSH_BATCH = 250  # intel-iommu.c of that era: HIGH_WATER_MARK deferred unmaps per IOTLB flush


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

    def flush(self) -> None:
        self._cache.clear()


class Mode(enum.Enum):
    NESTED = "nested"
    SHADOW = "shadow"
    NATIVE = "native"  # bare metal: one table, IOVA -> HPA, no exits


@dataclass(frozen=True)
class Costs:
    """Cycle costs of the primitive events. `exit` is a published measurement (SplitX, WIOV 2011);
    `invalidation` is calibrated on vIOMMU's strict and deferred line rates (see `calibrate`)."""

    reference: int = 100  # assumed: one IOMMU page-walk memory reference, or one table entry the CPU writes
    exit: int = 2_000  # Landau et al. 2011: direct cost of an exit, Xeon X5570 + KVM
    handler: int = 2_000  # assumed: host software handling a trapped map, unmap or invalidation
    invalidation: int = 4_430  # calibrated: one IOTLB invalidation, queued and waited for
    iova: int = 300  # assumed: the DMA API allocating or freeing one IOVA (per map and per real unmap)


def _check_share(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(name, value, "a share between 0 and 1")


class IoAddressSpace:
    """One device's DMA translation in `mode`: guest IOVA table, host GPA table, optional shadow.

    In NATIVE mode there is no guest: the IOVA table's nodes and targets are host-physical pages."""

    def __init__(self, mode: Mode, guest_levels: int, host_levels: int, iotlb_entries: int, costs: Costs,
                 trapped_invalidations: float = 0.0) -> None:
        _check_share("trapped invalidations", trapped_invalidations)
        self.mode = mode
        self.costs = costs
        self.trapped_invalidations = trapped_invalidations
        self._trap_credit = 0.0
        self._next_gpa_page = 0x100
        self._next_hpa_page = 0x80000
        self.host = RadixTable(host_levels, self._allocate_hpa)
        guest_pages = self._allocate_hpa if mode is Mode.NATIVE else self._allocate_gpa
        self.guest = RadixTable(guest_levels, guest_pages)
        self.shadow = RadixTable(guest_levels, self._allocate_hpa) if mode is Mode.SHADOW else None
        self.iotlb = Iotlb(iotlb_entries)
        self.cycles = {"map": 0, "unmap": 0, "dma": 0}
        self.counts = {"map": 0, "unmap": 0, "dma": 0}
        self.walk_references = 0
        self.exits = 0
        self._stale_shadow: list[int] = []  # unmapped by the guest, not yet invalidated (deferred)

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
        """A page to DMA into: its GPA page number in a guest, its HPA page number on bare metal."""
        return self._allocate_hpa() if self.mode is Mode.NATIVE else self._allocate_gpa()

    def resolve(self, buffer: int) -> int | None:
        """The HPA page a buffer (as allocate_buffer returned it) lives in."""
        return buffer if self.mode is Mode.NATIVE else self.host.walk(buffer)[0]

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
        table = self.shadow if self.mode is Mode.SHADOW else self.guest
        assert table is not None
        hpa, reads = table.walk(iova_page)
        return hpa, len(reads)

    # -- operations -------------------------------------------------------------------------------------

    def map(self, iova_page: int, buffer: int) -> int:
        """Map `iova_page` to `buffer`; returns the guest (or native) table entries written."""
        c = self.costs
        written = self.guest.map(iova_page, buffer)
        cost = c.iova + written * c.reference
        if self.mode is Mode.SHADOW:
            assert self.shadow is not None
            self.exits += 1
            _, guest_reads = self.guest.walk(iova_page)  # the host reads the guest's new entry
            hpa, host_reads = self.host.walk(buffer)
            assert hpa is not None
            shadow_written = self.shadow.map(iova_page, hpa)
            cost += c.exit + c.handler + (len(guest_reads) + len(host_reads) + shadow_written) * c.reference
        self.cycles["map"] += cost
        self.counts["map"] += 1
        return written

    def unmap(self, iova_page: int, invalidate: bool = True) -> None:
        """Clear the entry; with `invalidate`, also drop its IOTLB entry and wait (strict). Without it the
        IOTLB may keep translating the IOVA until the next `flush` (deferred)."""
        c = self.costs
        self.guest.unmap(iova_page)
        cost = c.iova + c.reference
        if invalidate:
            self.iotlb.invalidate(iova_page)
            cost += c.invalidation + self._invalidation_trap()
        if self.mode is Mode.SHADOW:
            if invalidate:  # the host learns of the unmap from the trapped invalidation
                self.exits += 1
                cost += c.exit + c.handler + self._clear_shadow([iova_page])
            else:
                self._stale_shadow.append(iova_page)
        self.cycles["unmap"] += cost
        self.counts["unmap"] += 1

    def flush(self) -> None:
        """One global IOTLB invalidation (the end of a deferred batch)."""
        self.iotlb.flush()
        cost = self.costs.invalidation + self._invalidation_trap()
        if self.mode is Mode.SHADOW:
            self.exits += 1
            cost += self.costs.exit + self.costs.handler + self._clear_shadow(self._stale_shadow)
            self._stale_shadow = []
        self.cycles["unmap"] += cost

    def _clear_shadow(self, iova_pages: list[int]) -> int:
        assert self.shadow is not None
        for page in iova_pages:
            self.shadow.unmap(page)
        return len(iova_pages) * self.costs.reference

    def _invalidation_trap(self) -> int:
        """Under nested translation, a share of the guest's invalidations exits to the host: one in every
        1/t, spread evenly (deterministic)."""
        if self.mode is not Mode.NESTED or self.trapped_invalidations <= 0:
            return 0
        self._trap_credit += self.trapped_invalidations
        if self._trap_credit < 1.0 - 1e-9:
            return 0
        self._trap_credit -= 1.0
        self.exits += 1
        return self.costs.exit + self.costs.handler

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
    trapped_invalidations: float = 0.0


def run(mode: Mode, workload: Workload, guest_levels: int = 4, host_levels: int = 4, iotlb_entries: int = 64,
        costs: Costs | None = None, trapped_invalidations: float = 0.0) -> RunResult:
    """Drive the ring: DMAs go round-robin over the slots; a slot's buffer is unmapped and replaced after
    `dmas_per_map` DMAs, as a driver with strict (unmap-on-completion) IOMMU mappings does."""
    space = IoAddressSpace(mode, guest_levels, host_levels, iotlb_entries, costs or Costs(),
                           trapped_invalidations)
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
                     sum(space.cycles.values()) / dmas, (space.counts["map"] + space.counts["unmap"]) / dmas,
                     trapped_invalidations if mode is Mode.NESTED else 0.0)


def nested_references(guest_levels: int, host_levels: int) -> int:
    """(n + 1)(m + 1) - 1."""
    return (guest_levels + 1) * (host_levels + 1) - 1


def crossover_dmas_per_map(guest_levels: int, host_levels: int, miss_rate: float, costs: Costs,
                           trapped_invalidations: float = 0.0) -> float:
    """DMAs per map/unmap pair above which the shadow table is cheaper (below it, nested is)."""
    _check_share("trapped invalidations", trapped_invalidations)
    extra_walk = miss_rate * (nested_references(guest_levels, host_levels) - guest_levels) * costs.reference
    # per map+unmap pair, the shadow path adds two exits and handlers plus its software walk and writes
    # (guest table read n, host walk m, shadow entry 1, shadow clear 1); nested traps a share of invalidations
    shadow_pair = 2 * (costs.exit + costs.handler) + (guest_levels + host_levels + 2) * costs.reference
    nested_pair = trapped_invalidations * (costs.exit + costs.handler)
    if extra_walk <= 0:
        return float("inf")
    return (shadow_pair - nested_pair) / extra_walk


# -- line rate under an invalidation policy ---------------------------------------------------------------


class Invalidation(enum.Enum):
    STRICT = "strict"  # invalidate the IOTLB entry at every unmap and wait for it
    DEFERRED = "deferred"  # clear the entry now, flush the whole IOTLB once per batch of unmaps
    OPTIMISTIC = "optimistic teardown"  # keep the mapping after unmap; reuse it if the page comes back


# vIOMMU (Amit et al., USENIX ATC 2011): bare-metal Linux 2.6.36, share of a 10 Gb/s line rate
VIOMMU_LINE_RATE = {Invalidation.STRICT: 0.43, Invalidation.DEFERRED: 0.91, Invalidation.OPTIMISTIC: 1.00}


@dataclass(frozen=True)
class LineRate:
    """One core receiving at line rate: the cycles it has per packet, and what the stack takes of them."""

    line_gbps: float = 10.0  # vIOMMU's NIC
    frame_bytes: int = 1500  # assumed: one mapped buffer per MTU-sized frame
    cpu_ghz: float = 3.0  # assumed
    stack_cycles: int = 3_140  # calibrated: everything per packet but the DMA API (deferred at 91 %)
    flush_batch: int = LINUX_FLUSH_BATCH
    page_reuse: float = 0.9  # assumed: share of new buffers given a page freed within the teardown window

    @property
    def budget_cycles(self) -> float:
        """Cycles per packet that keep up with the line: f_cpu / (line rate / frame bits)."""
        return self.cpu_ghz * 1e9 * 8 * self.frame_bytes / (self.line_gbps * 1e9)


@dataclass
class Events:
    """What the DMA API did while receiving `packets` packets."""

    packets: int = 0
    maps: int = 0  # new mappings (an IOVA allocated, entries written)
    entries_written: int = 0
    unmaps: int = 0  # mappings torn down (entry cleared, IOVA freed)
    sync_invalidations: int = 0  # strict: one per unmap, waited for
    flushes: int = 0  # global IOTLB invalidations (deferred batches)
    reused: int = 0  # maps that found the page's mapping still alive (optimistic teardown)
    lazy_unmaps: int = 0  # unmaps that left the mapping alive (optimistic teardown)
    dma_api_cycles: int = 0  # what the address space itself counted for all of the above

    @property
    def invalidations(self) -> int:
        return self.sync_invalidations + self.flushes


class DmaApi:
    """The OS's DMA-mapping layer over an IoAddressSpace: IOVA allocation and an invalidation policy.

    IOVAs are freed only once no IOTLB entry can still hold them: at once under strict invalidation, at
    the batch flush otherwise."""

    def __init__(self, space: IoAddressSpace, policy: Invalidation, flush_batch: int,
                 teardown_window: int) -> None:
        if flush_batch < 1 or teardown_window < 1:
            raise ConfigError("DMA API", (flush_batch, teardown_window), "batch and window of at least 1")
        self.space = space
        self.policy = policy
        self.flush_batch = flush_batch
        self.teardown_window = teardown_window
        self.events = Events()
        self.alive: OrderedDict[int, int] = OrderedDict()  # page -> IOVA, unmapped but kept (optimistic)
        self._next_iova = 0x40000
        self._free_iovas: list[int] = []
        self._pending: list[int] = []  # torn down, waiting for the flush

    def _allocate_iova(self) -> int:
        if self._free_iovas:
            return self._free_iovas.pop()
        self._next_iova += 1
        return self._next_iova - 1

    def map(self, page: int) -> int:
        if self.policy is Invalidation.OPTIMISTIC:
            kept = self.alive.pop(page, None)
            if kept is not None:
                self.events.reused += 1
                self.space.cycles["map"] += self.space.costs.reference  # find the kept mapping
                return kept
        iova = self._allocate_iova()
        self.events.entries_written += self.space.map(iova, page)
        self.events.maps += 1
        return iova

    def unmap(self, iova: int, page: int) -> None:
        if self.policy is Invalidation.STRICT:
            self.space.unmap(iova, invalidate=True)
            self.events.unmaps += 1
            self.events.sync_invalidations += 1
            self._free_iovas.append(iova)
        elif self.policy is Invalidation.DEFERRED:
            self._tear_down(iova)
        else:
            self.alive[page] = iova
            self.events.lazy_unmaps += 1
            self.space.cycles["unmap"] += self.space.costs.reference  # park the mapping
            while len(self.alive) > self.teardown_window:
                _, expired = self.alive.popitem(last=False)
                self._tear_down(expired)

    def _tear_down(self, iova: int) -> None:
        self.space.unmap(iova, invalidate=False)
        self.events.unmaps += 1
        self._pending.append(iova)
        if len(self._pending) >= self.flush_batch:
            self.space.flush()
            self.events.flushes += 1
            self._free_iovas.extend(self._pending)
            self._pending.clear()


def simulate_receive(policy: Invalidation, line: LineRate, ring: int = 128, levels: tuple[int, int] = (4, 4),
                     iotlb: int = 64, packets: int = 2000, seed: int = 0, mode: Mode = Mode.NATIVE,
                     costs: Costs | None = None, trapped_invalidations: float = 0.0) -> Events:
    """A receive ring: the device writes each packet into the next slot's buffer, the driver unmaps it,
    hands the page up the stack and maps a new buffer. The new buffer is, with probability
    `line.page_reuse`, one of the last 2 x ring pages freed (the teardown window), else a fresh one.
    The run starts with the window full, as in the steady state. Every DMA is checked to land in its slot's page. Bare metal (NATIVE) by default; the events do not
    depend on the mode, only what the address space counts for them (`dma_api_cycles`) does."""
    if ring < 1 or packets < 1:
        raise ConfigError("receive ring", (ring, packets), "at least one slot and one packet")
    _check_share("--page-reuse", line.page_reuse)
    rng = np.random.default_rng(seed)
    space = IoAddressSpace(mode, *levels, iotlb, costs or Costs(), trapped_invalidations)
    window = 2 * ring
    api = DmaApi(space, policy, line.flush_batch, window)
    slots = []
    for _ in range(ring):
        page = space.allocate_buffer()
        slots.append((page, api.map(page)))
    recent: OrderedDict[int, None] = OrderedDict()  # pages freed lately, oldest first
    for _ in range(window):  # start in the steady state: a full window of freed pages (and kept mappings)
        page = space.allocate_buffer()
        api.unmap(api.map(page), page)
        recent[page] = None
    api.events = Events()  # filling the ring and the window is not part of the steady state
    space.reset_counters()
    reuse = rng.random(packets) < line.page_reuse
    for n in range(packets):
        slot = n % ring
        page, iova = slots[slot]
        if space.dma(iova) != space.resolve(page):
            raise AssertionError(f"DMA to IOVA {iova:#x} missed its page {page:#x}")
        api.unmap(iova, page)
        recent[page] = None
        if len(recent) > window:
            recent.popitem(last=False)
        if reuse[n]:
            new_page = list(recent)[int(rng.integers(len(recent)))]
            del recent[new_page]
        else:
            new_page = space.allocate_buffer()
        slots[slot] = (new_page, api.map(new_page))
    api.events.packets = packets
    api.events.dma_api_cycles = space.cycles["map"] + space.cycles["unmap"]
    return api.events


def cycles_per_packet(events: Events, line: LineRate, costs: Costs, mode: Mode = Mode.NATIVE,
                      levels: tuple[int, int] = (4, 4), trapped_invalidations: float = 0.0) -> float:
    """CPU cycles per packet of a run's events, on bare metal (NATIVE) or in a guest (NESTED, SHADOW)."""
    _check_share("trapped invalidations", trapped_invalidations)
    e = events
    total: float = (costs.iova * (e.maps + e.unmaps)
                    + costs.reference * (e.entries_written + e.unmaps + e.reused + e.lazy_unmaps)
                    + costs.invalidation * e.invalidations)
    trap = costs.exit + costs.handler
    if mode is Mode.NESTED:  # the guest writes its own tables; only its invalidations may exit
        total += trapped_invalidations * trap * e.invalidations
    elif mode is Mode.SHADOW:  # every new mapping and every invalidation exits; the host mirrors the tables
        total += (trap + (sum(levels) + 1) * costs.reference) * e.maps + trap * e.invalidations
        total += costs.reference * e.unmaps
    return line.stack_cycles + total / e.packets


def line_rate_share(cycles: float, line: LineRate) -> float:
    """Share of the line rate one core keeps up with at `cycles` per packet."""
    return min(1.0, line.budget_cycles / cycles)


def calibrate(line: LineRate, costs: Costs, strict: float = VIOMMU_LINE_RATE[Invalidation.STRICT],
              deferred: float = VIOMMU_LINE_RATE[Invalidation.DEFERRED]) -> tuple[float, float]:
    """(c_stack, c_inv) that put strict and deferred invalidation on the given shares of the line rate,
    with one map (one entry written) and one unmap (one entry cleared) per packet:
        B / strict   = c_stack + 2 c_iova + 2 c_ref + c_inv
        B / deferred = c_stack + 2 c_iova + 2 c_ref + c_inv / batch"""
    budget = line.budget_cycles
    invalidation = budget * (1 / strict - 1 / deferred) / (1 - 1 / line.flush_batch)
    stack = budget / deferred - 2 * (costs.iova + costs.reference) - invalidation / line.flush_batch
    return stack, invalidation


@dataclass(frozen=True)
class LineRateRow:
    policy: Invalidation
    bare_metal: Estimate  # % of line rate
    nested: Estimate
    nested_trapped: Estimate
    shadow: Estimate
    reused: Estimate  # % of maps served by a kept mapping


def line_rate_rows(line: LineRate, costs: Costs, ring: int, levels: tuple[int, int], iotlb: int, packets: int,
                   seeds: range, trapped_invalidations: float) -> list[LineRateRow]:
    rows = []
    for policy in Invalidation:
        runs = [simulate_receive(policy, line, ring, levels, iotlb, packets, seed) for seed in seeds]

        def share(mode: Mode, trapped: float = 0.0, runs: list[Events] = runs) -> Estimate:
            cycles = [cycles_per_packet(e, line, costs, mode, levels, trapped) for e in runs]
            return estimate([100 * line_rate_share(c, line) for c in cycles])

        rows.append(LineRateRow(policy, share(Mode.NATIVE), share(Mode.NESTED),
                                share(Mode.NESTED, trapped_invalidations), share(Mode.SHADOW),
                                estimate([100 * e.reused / e.packets for e in runs])))
    return rows


# -- the `pyrovisor lab iommu` command ----------------------------------------------------------------------

PER_MAP_SWEEP = (1, 2, 4, 8, 16, 32, 64, 0)


@dataclass(frozen=True)
class SweepPoint:
    nested: RunResult  # guest invalidations do not trap
    trapped: RunResult  # nested, a share --trapped-invalidations of them trap
    shadow: RunResult


@dataclass(frozen=True)
class Advantage:
    trapped_invalidations: float
    nested_cycles: float  # per DMA, one DMA per map (strict)
    shadow_cycles: float
    crossover: float

    @property
    def ratio(self) -> float:
        return self.shadow_cycles / self.nested_cycles


@dataclass(frozen=True)
class Outcome:
    points: list[SweepPoint]
    advantages: list[Advantage]  # trapped share 0, as set, 1
    line_rates: list[LineRateRow]
    miss_rate: float
    costs: Costs
    line: LineRate
    trapped_invalidations: float = 1.0

    def advantage(self, trapped: float) -> Advantage:
        return next(a for a in self.advantages if a.trapped_invalidations == trapped)


class IommuModel:
    name = "iommu"
    summary = "Nested (two-stage) vs shadow IOMMU translation: cost per map/unmap vs per DMA, and the crossover"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        line = LineRate()
        parser.add_argument("--trapped-invalidations", type=float, default=1.0,
                            help="share of the guest's IOTLB invalidations that exit to the host under "
                                 "nested translation: 1 with an emulated invalidation queue, 0 with a "
                                 "virtualised command queue (default: %(default)s)")
        parser.add_argument("--guest-levels", type=int, default=4, help="guest IOMMU table levels (default: 4)")
        parser.add_argument("--host-levels", type=int, default=4, help="host (second-stage) levels (default: 4)")
        parser.add_argument("--iotlb", type=int, default=64, help="IOTLB entries (assumed; default: %(default)s)")
        parser.add_argument("--ring", type=int, default=128, help="buffers in flight (default: %(default)s)")
        parser.add_argument("--dmas", type=int, default=4096,
                            help="least DMAs simulated per point of the ring sweep (default: %(default)s)")
        parser.add_argument("--reference-cycles", type=int, default=Costs.reference,
                            help="cycles per page-walk reference or table entry written (assumed; "
                                 "default: %(default)s)")
        parser.add_argument("--exit-cycles", type=int, default=Costs.exit,
                            help="cycles per VM exit (default: %(default)s, SplitX's measurement)")
        parser.add_argument("--handler-cycles", type=int, default=Costs.handler,
                            help="host cycles to handle a trapped map, unmap or invalidation (assumed; "
                                 "default: %(default)s)")
        parser.add_argument("--invalidation-cycles", type=int, default=Costs.invalidation,
                            help="cycles per IOTLB invalidation waited for (calibrated on vIOMMU's strict "
                                 "43 %%; default: %(default)s)")
        parser.add_argument("--iova-cycles", type=int, default=Costs.iova,
                            help="DMA-API cycles to allocate or free an IOVA (assumed; default: %(default)s)")
        parser.add_argument("--stack-cycles", type=int, default=line.stack_cycles,
                            help="cycles per received packet outside the DMA API (calibrated on vIOMMU's "
                                 "deferred 91 %%; default: %(default)s)")
        parser.add_argument("--cpu-ghz", type=float, default=line.cpu_ghz,
                            help="clock of the receiving core (assumed; default: %(default)s)")
        parser.add_argument("--frame-bytes", type=int, default=line.frame_bytes,
                            help="bytes per received buffer (assumed: MTU; default: %(default)s)")
        parser.add_argument("--line-gbps", type=float, default=line.line_gbps,
                            help="NIC line rate (vIOMMU's 10 GbE; default: %(default)s)")
        parser.add_argument("--flush-batch", type=int, default=line.flush_batch,
                            help="deferred unmaps per global IOTLB flush (Linux intel-iommu; "
                                 "default: %(default)s)")
        parser.add_argument("--page-reuse", type=float, default=line.page_reuse,
                            help="share of new receive buffers that get a recently freed page (assumed; "
                                 "default: %(default)s)")
        parser.add_argument("--packets", type=int, default=2000,
                            help="packets per seed in the line-rate simulation (default: %(default)s)")
        add_seed_arguments(parser, first=0)

    def run(self, args: argparse.Namespace) -> LabResult:
        outcome = compute(args)
        return LabResult(
            tables=(walk_table(), sweep_table(outcome, args), advantage_table(outcome),
                    line_rate_table(outcome, args), cost_table(outcome)),
            plot=lambda figure: plot(figure, outcome),
            summary=summary(outcome),
            headline=headline(outcome),
            assumptions=assumptions(outcome, args),
        )


def compute(args: argparse.Namespace) -> Outcome:
    trapped = args.trapped_invalidations
    _check_share("--trapped-invalidations", trapped)
    for option, value in (("--ring", args.ring), ("--packets", args.packets),
                          ("--frame-bytes", args.frame_bytes), ("--flush-batch", args.flush_batch)):
        if value < 1:
            raise ConfigError(option, value, "must be at least 1")
    for option, number in (("--cpu-ghz", args.cpu_ghz), ("--line-gbps", args.line_gbps)):
        if number <= 0:
            raise ConfigError(option, number, "must be positive")
    costs = Costs(args.reference_cycles, args.exit_cycles, args.handler_cycles, args.invalidation_cycles,
                  args.iova_cycles)
    line = LineRate(args.line_gbps, args.frame_bytes, args.cpu_ghz, args.stack_cycles, args.flush_batch,
                    args.page_reuse)
    levels = (args.guest_levels, args.host_levels)

    def ring_run(mode: Mode, per_map: int, share: float = 0.0) -> RunResult:
        # enough DMAs for every slot to be remapped at least twice
        workload = Workload(args.ring, per_map, max(args.dmas, 2 * args.ring * per_map))
        return run(mode, workload, *levels, args.iotlb, costs, share)

    points = [SweepPoint(ring_run(Mode.NESTED, d), ring_run(Mode.NESTED, d, trapped),
                         ring_run(Mode.SHADOW, d)) for d in PER_MAP_SWEEP]
    miss = points[-1].nested.miss_rate
    advantages = []
    shadow_one = points[0].shadow.cycles_per_dma
    for share in sorted({0.0, trapped, 1.0}):
        nested_one = points[0].trapped if share == trapped else ring_run(Mode.NESTED, 1, share)
        advantages.append(Advantage(share, nested_one.cycles_per_dma, shadow_one,
                                    crossover_dmas_per_map(*levels, miss, costs, share)))
    rows = line_rate_rows(line, costs, args.ring, levels, args.iotlb, args.packets, seeds_of(args), trapped)
    return Outcome(points, advantages, rows, miss, costs, line, trapped)


def headline(outcome: Outcome) -> tuple[tuple[str, float | Estimate], ...]:
    strict = next(r for r in outcome.line_rates if r.policy is Invalidation.STRICT)
    chosen = outcome.advantage(outcome.trapped_invalidations)
    return (
        ("nested advantage, invalidations not trapped (x)", round(outcome.advantage(0.0).ratio, 3)),
        ("nested advantage, invalidations trapped (x)", round(chosen.ratio, 3)),
        ("crossover DMAs/map", round(chosen.crossover, 3)),
        ("strict line rate, bare metal %", strict.bare_metal),
    )


def summary(outcome: Outcome) -> tuple[str, ...]:
    share = outcome.trapped_invalidations
    free, chosen = outcome.advantage(0.0), outcome.advantage(share)
    rates = ", ".join(f"{r.policy.value} {r.bare_metal.mean:.0f} %" for r in outcome.line_rates)
    return (
        f"crossover: nested is cheaper below {chosen.crossover:.1f} DMAs per map/unmap pair "
        f"(map+unmap per DMA above {2 / chosen.crossover:.3f}), shadow above it "
        f"(guest invalidations trapped: {share:g})",
        f"one DMA per mapping: nested is {free.ratio:.2f}x cheaper than shadow when guest invalidations do "
        f"not trap, {chosen.ratio:.2f}x when a share {share:g} of them does",
        f"bare-metal line rate: {rates} (vIOMMU measured 43, 91 and 100 %)",
    )


def assumptions(outcome: Outcome, args: argparse.Namespace) -> tuple[Assumption, ...]:
    costs, line = outcome.costs, outcome.line
    calibrated = f"calibrated on {VIOMMU_SOURCE}: strict 43 %, deferred 91 % of 10 Gb/s"
    return (
        Assumption("guest invalidations that trap under nested translation (share)",
                   outcome.trapped_invalidations,
                   "assumed: 1 for an emulated invalidation queue, 0 for a virtualised command queue"),
        Assumption("VM exit, direct cost (cycles)", costs.exit, f"{SPLITX_SOURCE}, Xeon X5570 + KVM"),
        Assumption("IOTLB invalidation waited for (cycles)", costs.invalidation, calibrated),
        Assumption("receive stack per packet, outside the DMA API (cycles)", line.stack_cycles, calibrated),
        Assumption("page-walk reference or table entry written (cycles)", costs.reference, "assumed"),
        Assumption("trap handler (cycles)", costs.handler, "assumed"),
        Assumption("IOVA allocate or free (cycles)", costs.iova, "assumed"),
        Assumption("IOTLB entries", args.iotlb, "assumed"),
        Assumption("table levels, guest + host", f"{args.guest_levels} + {args.host_levels}", "assumed"),
        Assumption("line rate (Gb/s)", line.line_gbps, f"{VIOMMU_SOURCE}: 10 Gb/s NIC"),
        Assumption("bytes per receive buffer", line.frame_bytes, "assumed: one MTU-sized frame per mapping"),
        Assumption("receiving core clock (GHz)", line.cpu_ghz, "assumed: one core, the bottleneck"),
        Assumption("deferred unmaps per IOTLB flush", line.flush_batch,
                   "Linux intel-iommu (HIGH_WATER_MARK)"),
        Assumption("new buffers on a recently freed page (share)", line.page_reuse, "assumed"),
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


def _cheaper(nested: RunResult, shadow: RunResult) -> str:
    return "nested" if nested.cycles_per_dma < shadow.cycles_per_dma else "shadow"


def sweep_table(outcome: Outcome, args: argparse.Namespace) -> Table:
    rows = []
    for p in outcome.points:
        per_map = p.nested.workload.dmas_per_map
        rows.append((per_map or "never", round(p.nested.map_unmap_per_dma, 3), round(p.nested.miss_rate, 3),
                     round(p.nested.references_per_dma, 1), round(p.shadow.references_per_dma, 1),
                     round(p.nested.cycles_per_dma), round(p.trapped.cycles_per_dma),
                     round(p.shadow.cycles_per_dma),
                     _cheaper(p.nested, p.shadow), _cheaper(p.trapped, p.shadow)))
    share = outcome.trapped_invalidations
    return Table(
        title=f"Cycles per DMA, ring of {args.ring} buffers, IOTLB {args.iotlb} entries, "
              f"{args.guest_levels}+{args.host_levels} levels, strict unmaps",
        columns=("DMAs/map", "ops/DMA", "miss", "refs N", "refs S", "cycles N", "cycles N trap", "cycles S",
                 "cheaper", "cheaper if trapped"),
        rows=tuple(rows),
        notes=("ops/DMA: maps + unmaps per DMA; miss: IOTLB miss rate; refs: walk references per DMA; "
               "N nested with guest invalidations not trapped; N trap: nested with a share "
               f"{share:g} of them trapped (--trapped-invalidations); S shadow (every map and unmap traps).",
               "cycles per DMA include that DMA's share of the map and unmap work; 'never': mapped once "
               "(static mappings), so only the walks count.",),
    )


def advantage_table(outcome: Outcome) -> Table:
    rows = []
    for a in outcome.advantages:
        label = {0.0: "none (virtualised command queue)", 1.0: "all (emulated invalidation queue)"}.get(
            a.trapped_invalidations, "as set")
        rows.append((a.trapped_invalidations, label, round(a.nested_cycles), round(a.shadow_cycles),
                     round(a.ratio, 2), round(a.crossover, 2)))
    return Table(
        title="Nested vs shadow at one DMA per mapping, by the share of guest invalidations that trap",
        columns=("trapped", "guest invalidations trapping", "cycles N", "cycles S", "nested advantage (x)",
                 "crossover DMAs/map"),
        rows=tuple(rows),
        notes=("nested advantage: shadow cycles / nested cycles per DMA with one DMA per map/unmap pair "
               "(strict); the option --trapped-invalidations picks the share used elsewhere "
               f"({outcome.trapped_invalidations:g}).",),
    )


def line_rate_table(outcome: Outcome, args: argparse.Namespace) -> Table:
    rows = []
    for r in outcome.line_rates:
        published = 100 * VIOMMU_LINE_RATE[r.policy]
        rows.append((r.policy.value, published, r.bare_metal, round(abs(r.bare_metal.mean - published), 2),
                     r.nested, r.nested_trapped, r.shadow, r.reused))
    line = outcome.line
    return Table(
        title=f"Share of a {line.line_gbps:g} Gb/s line rate by invalidation policy (%), receive ring of "
              f"{args.ring}, {args.packets} packets x {args.seeds} seeds",
        columns=("policy", "vIOMMU", "bare metal", "off by", "nested", "nested trap", "shadow", "reused"),
        rows=tuple(rows),
        notes=(f"vIOMMU: bare-metal Linux 2.6.36 as measured by {VIOMMU_SOURCE}; off by: |model - vIOMMU| in "
               "points. Strict and deferred calibrate the stack and invalidation costs; optimistic teardown "
               "is a prediction.",
               f"{line.budget_cycles:.0f} cycles per packet keep up with the line ({line.cpu_ghz:g} GHz, "
               f"{line.frame_bytes}-byte buffers). Guests (predictions, not measured): nested without "
               f"trapping pays what bare metal pays (its longer walks are the IOMMU's time, not the CPU's); "
               f"nested trap: a share {outcome.trapped_invalidations:g} of invalidations exits; shadow: "
               "every new mapping and invalidation exits (no sidecore).",
               "reused: buffers whose mapping was kept alive (optimistic teardown only); figures are means "
               "over the seeds with 95 % intervals.",),
    )


def cost_table(outcome: Outcome) -> Table:
    c = outcome.costs
    return Table(
        title="Cost model (cycles)",
        columns=("reference", "VM exit", "trap handler", "invalidation", "IOVA", "stack/packet", "miss rate",
                 "trapped"),
        rows=((c.reference, c.exit, c.handler, c.invalidation, c.iova, outcome.line.stack_cycles,
               round(outcome.miss_rate, 3), outcome.trapped_invalidations),),
        notes=(f"VM exit: direct cost measured by {SPLITX_SOURCE} on a Xeon X5570; invalidation and "
               f"stack/packet: calibrated so bare-metal strict and deferred give vIOMMU's 43 and 91 %; the "
               "others are assumptions. Change any of them with the options.",),
    )


def plot(figure: Figure, outcome: Outcome) -> None:
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
    finite = [p for p in outcome.points if p.nested.workload.dmas_per_map]
    x = [p.nested.workload.dmas_per_map for p in finite]
    share = outcome.trapped_invalidations
    left.plot(x, [p.nested.cycles_per_dma for p in finite], "o-", color="C0",
              label="nested, invalidations not trapped")
    left.plot(x, [p.trapped.cycles_per_dma for p in finite], "^-", color="C2",
              label=f"nested, share {share:g} of invalidations trapped")
    left.plot(x, [p.shadow.cycles_per_dma for p in finite], "s-", color="C1",
              label="shadow (trap every map/unmap)")
    static = outcome.points[-1]
    left.axhline(static.nested.cycles_per_dma, color="C0", linestyle=":", label="nested, static mappings")
    left.axhline(static.shadow.cycles_per_dma, color="C1", linestyle=":", label="shadow, static mappings")
    for a, color in ((outcome.advantage(0.0), "grey"), (outcome.advantage(share), "C2"))[:2 if share else 1]:
        if a.crossover != float("inf"):
            left.axvline(a.crossover, color=color, linestyle="--",
                         label=f"crossover, trapped {a.trapped_invalidations:g} ({a.crossover:.1f})")
    left.set_xscale("log", base=2)
    left.set_xticks(x, [str(v) for v in x])
    left.set_yscale("log")
    left.set_xlabel("DMAs per map/unmap pair (log scale)")
    left.set_ylabel("cycles per DMA (log scale)")
    left.set_title("Nested walks per DMA vs shadow traps per map/unmap", fontsize="small")
    left.legend(fontsize="x-small")

    rows = outcome.line_rates
    positions = np.arange(len(rows))
    width = 0.2
    series: tuple[tuple[str, list[Estimate], str], ...] = (
        ("bare metal = nested, untrapped", [r.bare_metal for r in rows], "C0"),
        (f"guest: nested, share {share:g} trapped", [r.nested_trapped for r in rows], "C2"),
        ("guest: shadow", [r.shadow for r in rows], "C1"))
    for offset, (label, estimates, color) in enumerate(series):
        means = [e.mean for e in estimates]
        errors = [[e.mean - e.low for e in estimates], [e.high - e.mean for e in estimates]]
        right.bar(positions + (offset - 1) * width, means, width, yerr=errors, capsize=2, color=color,
                  label=label)
    right.scatter(positions - width, [100 * VIOMMU_LINE_RATE[r.policy] for r in rows], marker="D", s=50,
                  color="black", zorder=3, label=f"bare metal, measured ({VIOMMU_SOURCE})")
    right.set_xticks(positions, [r.policy.value.replace(" ", "\n") for r in rows])
    right.set_ylim(0, 125)
    right.axhline(100, color="grey", linestyle=":", linewidth=1)
    right.set_ylabel(f"% of {outcome.line.line_gbps:g} Gb/s line rate")
    right.set_title("Line rate by invalidation policy", fontsize="small")
    right.legend(fontsize="x-small", loc="upper left")


MODEL = IommuModel()
