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
(vectorized); every cache decision comes from `lru_hits`, an exact LRU.

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
from pyrovisor.lab.mmu.counts import WalkCounts, combine
from pyrovisor.lab.mmu.tables import Machine
from pyrovisor.lab.mmu.x86 import PagingSide

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
        occurring = np.unique(keys % geometry.sets) if geometry.sets > 1 else np.zeros(1, dtype=np.int64)
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
    tlb_keys = virtual >> config.tlb_page_shift
    tlb_hits = lru_hits(tlb_keys, config.tlb)
    certainty.observe(tlb_keys, np.arange(len(virtual)), config.tlb)
    walk_origin = np.flatnonzero(~tlb_hits)
    walked = virtual[walk_origin]
    guest = machine.guest
    start, pwc_hit_origins = _start_levels(walked, walk_origin, guest, config.pwc, certainty)
    references = (guest.leaf + 1 - start).astype(np.int64)
    counted = walk_origin >= counted_from
    nested_references = nested_lookups = nested_walks = 0
    nested_pwc_hits: tuple[int, ...] = ()
    if config.host is not None:
        host = config.host
        tables, data = machine.guest_walk(walked, nested=True)
        # Addresses each walk translates, walk by walk: guest tables by level (the root only when the walk
        # starts there; a table reached through a cached pointer is already host-physical), then its data.
        needed = np.empty((len(walked), guest.walked_levels + 1), dtype=bool)
        needed[:, 0] = start == 0
        needed[:, 1: guest.walked_levels] = np.arange(1, guest.walked_levels)[None, :] > start[:, None]
        needed[:, guest.walked_levels] = True
        lookups = np.concatenate([tables, data[:, None]], axis=1)[needed]
        walk_of = np.nonzero(needed)[0]
        ntlb_keys = lookups >> host.page_shift
        missed = ~lru_hits(ntlb_keys, config.nested_tlb)
        certainty.observe(ntlb_keys, walk_origin[walk_of], config.nested_tlb)
        nested_start, nested_hit_origins = _start_levels(lookups[missed], walk_origin[walk_of[missed]], host,
                                                         config.nested_pwc, certainty)
        nested_each = host.leaf + 1 - nested_start
        references += np.bincount(walk_of[missed], weights=nested_each, minlength=len(walked)).astype(np.int64)
        counted_lookup = counted[walk_of]
        nested_references = int(nested_each[counted_lookup[missed]].sum())
        nested_lookups = int(counted_lookup.sum())
        nested_walks = int(counted_lookup[missed].sum())
        nested_pwc_hits = tuple(int((o >= counted_from).sum()) for o in nested_hit_origins)
    return Stretch(
        WalkCounts(
            accesses=len(virtual) - counted_from, walks=int(counted.sum()),
            guest_references=int((guest.leaf + 1 - start)[counted].sum()), nested_references=nested_references,
            nested_lookups=nested_lookups, nested_walks=nested_walks,
            pwc_hits=tuple(int((o >= counted_from).sum()) for o in pwc_hit_origins), nested_pwc_hits=nested_pwc_hits,
            references_histogram=tuple(np.bincount(references[counted]).tolist()) if counted.any() else (),
        ),
        certainty.certain,
    )


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
