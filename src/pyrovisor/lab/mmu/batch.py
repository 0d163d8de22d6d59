"""The batch walker: the reference walker's model for a whole trace at once, stage by stage.

Each cache sees a stream of lookups that depends only on the caches before it, so the walk can be
computed as a pipeline instead of access by access, with the same counts:

1. TLB: every access looks up its page; the misses are the walks.
2. Paging-structure caches, deepest level first: each level sees the walks that missed every deeper
   level; the deepest hit fixes where a walk starts, and the walk reads one guest entry per level from
   there to the leaf.
3. Nested TLB: each walk translates, in order, the guest tables it reads whose host address it does not
   already have (the root, when it starts there, and every table below the start) and then its data.
4. Nested paging-structure caches, deepest first, for the nested-TLB misses, as in step 2; each nested
   walk reads one EPT entry per level from its start to the leaf.

The guest-physical addresses in step 3 come from reading the guest's tables in simulated memory
(vectorized); every cache decision comes from `lru_hits`, an exact LRU. The same decisions give, besides
the counts, the stream of references itself (`walk_trace`, `reference_stream`): the physical address of
every entry read and of every data access, in the order the reference walker makes them, for a model of
the data cache (`datacache`). A native walk needs no tables to be counted (`simulate_native`).

Long traces are cut into stretches simulated in parallel processes. A stretch other than the first
starts with empty caches and a warm-up (the accesses just before it), and is only used if every cache
decision in it provably equals the one a run from the start of the trace makes. For an LRU set that
is true of a lookup whose key was already looked up in the stretch (the stack distance is measured
inside the stretch), and of any lookup once the set has seen as many distinct keys as it has ways
(a key not seen since then misses either way). Each cache's stream is only trustworthy from where
the caches before it became so; `Certainty` follows that point down the pipeline. A stretch that
cannot be certified is simulated again from the start of the trace.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from pyrovisor.lab.mmu.caches import CacheGeometry, lru_hits
from pyrovisor.lab.mmu.config import MmuConfig
from pyrovisor.lab.mmu.counts import DATA_ACCESS, GUEST_REFERENCE, NESTED_REFERENCE, WalkCounts, combine
from pyrovisor.lab.mmu.memory import distinct
from pyrovisor.lab.mmu.tables import EPT_FORMAT, INDEX_MASK, Machine, walk_many
from pyrovisor.lab.mmu.x86 import ENTRY_BYTES, FRAME_SHIFT, PagingSide

PARALLEL_MINIMUM = 300_000  # accesses per stretch below which one process is faster
WARM_UP_MINIMUM = 10_000  # accesses simulated before a stretch only to fill its caches
WALK_SAMPLE = 50_000
PARALLEL_WALK_RATE = 0.3  # below this many walks per access, one process keeps up


def simulate(machine: Machine, config: MmuConfig, trace: np.ndarray, workers: int | None = None) -> WalkCounts:
    """Counts for `trace` on `machine` with `config`'s caches, starting from empty caches."""
    virtual = np.asarray(trace, dtype=np.int64) & machine.virtual_mask
    if workers is None:
        workers = available_workers() if config.nested and _walks_often(virtual, config) else 1
    workers = max(1, min(workers, len(virtual) // PARALLEL_MINIMUM))
    if workers == 1 or "fork" not in multiprocessing.get_all_start_methods():
        return simulate_stretch(machine, config, virtual).counts
    bounds = np.linspace(0, len(virtual), workers + 1).astype(np.int64).tolist()
    warm_up = max(WARM_UP_MINIMUM, len(virtual) // 50)
    with ProcessPoolExecutor(workers - 1, mp_context=multiprocessing.get_context("fork")) as pool:
        jobs = [pool.submit(_warmed_stretch, machine, config, virtual, bounds[k], bounds[k + 1], warm_up)
                for k in range(1, workers)]
        stretches = [simulate_stretch(machine, config, virtual[: bounds[1]])]
        stretches += [job.result() for job in jobs]
    parts = []
    for k, stretch in enumerate(stretches):
        while not stretch.certain:  # the warm-up was too short: try a longer one (at worst, the whole prefix)
            warm_up *= 8
            stretch = _warmed_stretch(machine, config, virtual, bounds[k], bounds[k + 1], warm_up)
        parts.append(stretch.counts)
    return combine(parts)


def _warmed_stretch(machine: Machine, config: MmuConfig, virtual: np.ndarray, first: int, end: int,
                    warm_up: int) -> Stretch:
    start = max(0, first - warm_up)
    return simulate_stretch(machine, config, virtual[start:end], first - start, at_trace_start=start == 0)


def _walks_often(virtual: np.ndarray, config: MmuConfig) -> bool:
    """Whether more processes are worth starting: the TLB misses often on a sample from the trace's start."""
    sample = virtual[:WALK_SAMPLE] >> config.tlb_page_shift
    return len(sample) > 0 and float(np.mean(~lru_hits(sample, config.tlb))) > PARALLEL_WALK_RATE


def available_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Stretch:
    counts: WalkCounts  # for the accesses from `counted_from` on
    certain: bool  # every counted decision equals the one a run from the trace's start makes


class Certainty:
    """Tracks, down the pipeline, the first access from which every cache decision is certain."""

    def __init__(self, counted_from: int, at_trace_start: bool) -> None:
        self.counted_from = counted_from
        self.at_trace_start = at_trace_start  # then every decision is exact from the first access
        self.exact_from = 0

    def observe(self, keys: np.ndarray, origins: np.ndarray, geometry: CacheGeometry) -> None:
        """Take in one cache's lookup stream (`origins`: the access each lookup serves, non-decreasing)."""
        if self.at_trace_start or geometry.ways_per_set == 0 or len(keys) == 0:
            return
        begin = int(np.searchsorted(origins, self.exact_from))
        keys, origins = keys[begin:], origins[begin:]
        if len(keys) == 0:
            return
        occurring = distinct(keys % geometry.sets) if geometry.sets > 1 else np.zeros(1, dtype=np.int64)
        warm_end = int(np.searchsorted(origins, self.counted_from))
        for end in (warm_end, len(keys)):
            firsts = _first_occurrences(keys[:end])
            sets = keys[firsts] % geometry.sets
            order = np.argsort(sets, kind="stable")
            per_set = np.bincount(sets, minlength=geometry.sets)
            starts = np.concatenate([[0], np.cumsum(per_set)[:-1]])
            rank = np.arange(len(order)) - starts[sets[order]]
            uncertain = firsts[order][rank < geometry.ways_per_set]  # met while the set had free ways
            if end == len(keys) or (per_set[occurring] >= geometry.ways_per_set).all():
                if len(uncertain):
                    self.exact_from = max(self.exact_from, int(origins[uncertain].max()) + 1)
                return

    @property
    def certain(self) -> bool:
        return self.exact_from <= self.counted_from


def simulate_stretch(machine: Machine, config: MmuConfig, virtual: np.ndarray, counted_from: int = 0,
                     at_trace_start: bool = True) -> Stretch:
    """Simulate `virtual` from empty caches; count the accesses from `counted_from` on. Unless the stretch
    starts the trace, the accesses before `counted_from` only warm the caches up."""
    certainty = Certainty(counted_from, at_trace_start)
    plan = _plan(machine.guest, machine, config, virtual, certainty)
    return Stretch(_counts(plan, machine.guest, config, len(virtual), counted_from), certainty.certain)


def simulate_native(guest: PagingSide, config: MmuConfig, trace: np.ndarray) -> WalkCounts:
    """The counts of `simulate(machine, config.native(), trace)` without building any tables: every cache
    decision of a native walk depends on the virtual addresses alone, and so do its references."""
    virtual = np.asarray(trace, dtype=np.int64) & ((1 << guest.address_bits) - 1)
    native = config.native()
    return _counts(_plan(guest, None, native, virtual, Certainty(0, at_trace_start=True)), guest, native,
                   len(virtual), 0)


def _counts(plan: _Plan, guest: PagingSide, config: MmuConfig, accesses: int, counted_from: int) -> WalkCounts:
    guest_each = (guest.leaf + 1 - plan.start).astype(np.int64)
    references = guest_each.copy()
    counted = plan.walk_origin >= counted_from
    nested_references = nested_lookups = nested_walks = 0
    nested_pwc_hits: tuple[int, ...] = ()
    if plan.nested is not None and config.host is not None:
        nested = plan.nested
        nested_each = config.host.leaf + 1 - nested.nested_start
        references += np.bincount(nested.walk_of[nested.missed], weights=nested_each,
                                  minlength=len(plan.walk_origin)).astype(np.int64)
        counted_lookup = counted[nested.walk_of]
        nested_references = int(nested_each[counted_lookup[nested.missed]].sum())
        nested_lookups = int(counted_lookup.sum())
        nested_walks = int(counted_lookup[nested.missed].sum())
        nested_pwc_hits = tuple(int((o >= counted_from).sum()) for o in nested.nested_hit_origins)
    return WalkCounts(
        accesses=accesses - counted_from, walks=int(counted.sum()),
        guest_references=int(guest_each[counted].sum()), nested_references=nested_references,
        nested_lookups=nested_lookups, nested_walks=nested_walks,
        pwc_hits=tuple(int((o >= counted_from).sum()) for o in plan.pwc_hit_origins),
        nested_pwc_hits=nested_pwc_hits,
        references_histogram=tuple(np.bincount(references[counted]).tolist()) if counted.any() else (),
    )


@dataclass(frozen=True)
class _NestedPlan:
    """The nested side of a stretch's walks: every guest-physical address translated, and how."""

    tables: np.ndarray  # (walks, guest levels walked): guest-physical address of the guest table read per level
    data: np.ndarray  # per walk: the data's guest-physical address
    walk_of: np.ndarray  # per nested-TLB lookup, in order: the walk it belongs to
    level_of: np.ndarray  # per lookup: the guest level whose table it translates (guest levels walked: the data)
    lookups: np.ndarray  # per lookup: the guest-physical address translated
    missed: np.ndarray  # per lookup: it missed the nested TLB, so an EPT walk follows
    nested_start: np.ndarray  # per EPT walk: the nested level it starts reading at
    nested_hit_origins: list[np.ndarray]  # per nested level above the leaf: accesses whose EPT walks hit there


@dataclass(frozen=True)
class _Plan:
    """Every cache decision of a stretch, from which both its counts and its reference stream follow."""

    walk_origin: np.ndarray  # per walk (TLB miss): the access it serves
    walked: np.ndarray  # per walk: the virtual address
    start: np.ndarray  # per walk: the guest level it starts reading at (0: the root)
    pwc_hit_origins: list[np.ndarray]  # per guest level above the leaf: accesses whose walks hit there
    nested: _NestedPlan | None  # None on bare metal


def _plan(guest: PagingSide, machine: Machine | None, config: MmuConfig, virtual: np.ndarray,
          certainty: Certainty) -> _Plan:
    """The decisions of every cache for `virtual`; a nested walk needs the machine to read guest tables."""
    tlb_keys = virtual >> config.tlb_page_shift
    tlb_hits = lru_hits(tlb_keys, config.tlb)
    certainty.observe(tlb_keys, np.arange(len(virtual)), config.tlb)
    walk_origin = np.flatnonzero(~tlb_hits)
    walked = virtual[walk_origin]
    start, pwc_hit_origins = _start_levels(walked, walk_origin, guest, config.pwc, certainty)
    if config.host is None:
        return _Plan(walk_origin, walked, start, pwc_hit_origins, None)
    if machine is None:
        raise ValueError("a nested walk reads the guest's tables: it needs a machine")
    host = config.host
    tables, data = machine.guest_walk(walked, nested=True)
    # Addresses each walk translates, walk by walk: guest tables by level (the root only when the walk
    # starts there; a table reached through a cached pointer is already host-physical), then its data.
    needed = np.empty((len(walked), guest.walked_levels + 1), dtype=bool)
    needed[:, 0] = start == 0
    needed[:, 1: guest.walked_levels] = np.arange(1, guest.walked_levels)[None, :] > start[:, None]
    needed[:, guest.walked_levels] = True
    lookups = np.concatenate([tables, data[:, None]], axis=1)[needed]
    walk_of, level_of = np.nonzero(needed)
    ntlb_keys = lookups >> host.page_shift
    missed = ~lru_hits(ntlb_keys, config.nested_tlb)
    certainty.observe(ntlb_keys, walk_origin[walk_of], config.nested_tlb)
    nested_start, nested_hit_origins = _start_levels(lookups[missed], walk_origin[walk_of[missed]], host,
                                                     config.nested_pwc, certainty)
    return _Plan(walk_origin, walked, start, pwc_hit_origins,
                 _NestedPlan(tables, data, walk_of, level_of, lookups, missed, nested_start, nested_hit_origins))


@dataclass(frozen=True)
class ReferenceStream:
    """Every memory reference of a trace in the order the MMU makes it: each walk's entry reads (for a nested
    walk: the EPT entries that translate a guest table before that table's entry, and those that translate
    the data at the end), then the access itself. Addresses are physical: host-physical when nested."""

    addresses: np.ndarray  # int64
    kinds: np.ndarray  # GUEST_REFERENCE, NESTED_REFERENCE or DATA_ACCESS
    origins: np.ndarray  # the access each reference serves

    def __len__(self) -> int:
        return len(self.addresses)


def walk_trace(machine: Machine, config: MmuConfig, trace: np.ndarray) -> tuple[WalkCounts, ReferenceStream]:
    """The counts of `simulate` (in one process) and the stream of references behind them, from one pass."""
    virtual = np.asarray(trace, dtype=np.int64) & machine.virtual_mask
    plan = _plan(machine.guest, machine, config, virtual, Certainty(0, at_trace_start=True))
    return _counts(plan, machine.guest, config, len(virtual), 0), _stream(plan, machine, config, virtual)


def reference_stream(machine: Machine, config: MmuConfig, trace: np.ndarray) -> ReferenceStream:
    """The addresses the walker reads for `trace` from empty caches, with the data accesses between them (the
    same decisions as `simulate`: the stream has exactly `simulate(...).references` entry reads)."""
    return walk_trace(machine, config, trace)[1]


def _stream(plan: _Plan, machine: Machine, config: MmuConfig, virtual: np.ndarray) -> ReferenceStream:
    """Lay every reference into slots per access, then read them out in order. With n guest levels walked and m
    nested levels, guest level d has slots d(m + 1) .. d(m + 1) + m - 1 for the EPT reads that translate its
    table and slot d(m + 1) + m for its own entry; the EPT reads for the data come next, the data access last."""
    guest, host = machine.guest, machine.host
    n = guest.walked_levels
    m = host.walked_levels if config.nested else 0
    width = n * (m + 1) + m + 1
    addresses: list[np.ndarray] = []
    kinds: list[np.ndarray] = []
    slots: list[np.ndarray] = []
    origins: list[np.ndarray] = []

    def add(kind: int, where: np.ndarray, slot: np.ndarray | int, origin: np.ndarray) -> None:
        addresses.append(where)
        kinds.append(np.full(len(where), kind, dtype=np.int8))
        slots.append(np.broadcast_to(np.asarray(slot, dtype=np.int64), where.shape))
        origins.append(origin)

    if plan.nested is None:
        guest_tables, _ = machine.guest_walk(plan.walked, nested=False)  # bare metal: physical already
        _, data_physical = machine.guest_walk(virtual, nested=False)
    else:
        nested = plan.nested
        frames = distinct(nested.tables >> FRAME_SHIFT)
        guest_tables = machine.host_walk(frames << FRAME_SHIFT)[np.searchsorted(frames, nested.tables >> FRAME_SHIFT)]
        data_physical = machine.translate(virtual)
        ept_lookups = nested.lookups[nested.missed]
        ept_tables = _ept_tables(machine, ept_lookups)
        ept_walk_of = nested.walk_of[nested.missed]
        ept_level_of = nested.level_of[nested.missed]
        for depth in range(m):
            reads = nested.nested_start <= depth
            index = (ept_lookups[reads] >> host.table_levels[depth].shift) & INDEX_MASK
            add(NESTED_REFERENCE, ept_tables[reads, depth] + ENTRY_BYTES * index,
                ept_level_of[reads] * (m + 1) + depth, plan.walk_origin[ept_walk_of[reads]])
    for depth in range(n):
        reads = plan.start <= depth
        index = (plan.walked[reads] >> guest.table_levels[depth].shift) & INDEX_MASK
        add(GUEST_REFERENCE, guest_tables[reads, depth] + ENTRY_BYTES * index, depth * (m + 1) + m,
            plan.walk_origin[reads])
    add(DATA_ACCESS, data_physical, width - 1, np.arange(len(virtual), dtype=np.int64))
    all_origins = np.concatenate(origins)
    order = np.argsort(all_origins * width + np.concatenate(slots), kind="stable")
    return ReferenceStream(np.concatenate(addresses)[order], np.concatenate(kinds)[order], all_origins[order])


def _ept_tables(machine: Machine, guest_physical: np.ndarray) -> np.ndarray:
    """Host-physical address of the EPT table read at each nested level for each guest-physical address."""
    tables, _ = walk_many(machine.host_memory.rows_of, machine.host_memory.words, machine.eptp, guest_physical,
                          machine.host, EPT_FORMAT)
    return tables


def _start_levels(addresses: np.ndarray, origins: np.ndarray, side: PagingSide, geometry: CacheGeometry,
                  certainty: Certainty) -> tuple[np.ndarray, list[np.ndarray]]:
    """For each walk, the level it starts reading at after probing the paging-structure caches deepest first;
    and, per level, the accesses whose walks hit there."""
    start = np.zeros(len(addresses), dtype=np.int64)
    pending = np.arange(len(addresses))
    hit_origins: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * side.leaf
    for depth in range(side.leaf - 1, -1, -1):
        keys = addresses[pending] >> side.table_levels[depth].shift
        hit = lru_hits(keys, geometry)
        certainty.observe(keys, origins[pending], geometry)
        start[pending[hit]] = depth + 1
        hit_origins[depth] = origins[pending[hit]]
        pending = pending[~hit]
    return start, hit_origins


def _first_occurrences(keys: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct key, in stream order."""
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64)
    lowest = int(keys.min())
    span = int(keys.max()) - lowest + 1
    positions = np.arange(len(keys))
    if span <= 4 * len(keys) + 4096:
        offsets = keys - lowest
        first_seen = np.empty(span, dtype=np.int64)
        first_seen[offsets[::-1]] = positions[::-1]
        firsts: np.ndarray = positions[first_seen[offsets] == positions]
        return firsts
    return np.sort(np.unique(keys, return_index=True)[1])
