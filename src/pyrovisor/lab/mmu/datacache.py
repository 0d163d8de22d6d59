"""The data cache page-walk references share with the data: which references hit it and which go to memory.

A paging-structure cache holds pointers to tables, not the entries in them, so every entry a walk reads
is a load from the memory hierarchy: it may hit a data cache or go to DRAM. `cache_outcome` runs a
reference stream (`batch.reference_stream`: every entry read and every data access, in order, at their
physical addresses) through one fully associative LRU cache of 64-byte lines, which the trace's data
accesses fill as well, and counts the hits and misses of guest (or native) and of nested (EPT) entry
reads. The cache stands for the part of the hierarchy a walk finds its entries in; its size, and what a
hit and a miss cost, are assumptions of the model that uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyrovisor.lab.mmu.batch import ReferenceStream
from pyrovisor.lab.mmu.caches import CacheGeometry, lru_hits
from pyrovisor.lab.mmu.counts import GUEST_REFERENCE, NESTED_REFERENCE
from pyrovisor.lab.mmu.memory import distinct

LINE_SHIFT = 6  # 64-byte cache lines
KIB_LINES = 1024 >> LINE_SHIFT  # lines per KiB


@dataclass(frozen=True)
class CacheOutcome:
    """Where the entry reads of the counted walks were served: the data cache (hits) or memory (misses)."""

    walks: int
    guest_hits: int
    guest_misses: int
    nested_hits: int
    nested_misses: int

    @property
    def hits(self) -> int:
        return self.guest_hits + self.nested_hits

    @property
    def misses(self) -> int:
        return self.guest_misses + self.nested_misses

    def per_walk(self, count: int) -> float:
        return count / self.walks if self.walks else 0.0


def data_cache(kib: int) -> CacheGeometry:
    """A fully associative cache of `kib` KiB in 64-byte lines."""
    return CacheGeometry(kib * KIB_LINES)


def cache_outcome(stream: ReferenceStream, cache: CacheGeometry, counted_from: int = 0) -> CacheOutcome:
    """Run the whole stream through an initially empty `cache` (keys: line addresses); count the entry reads
    of the walks of accesses `counted_from` onwards (the accesses before only warm the cache up)."""
    hits = lru_hits(stream.addresses >> LINE_SHIFT, cache)
    counted = stream.origins >= counted_from
    guest = counted & (stream.kinds == GUEST_REFERENCE)
    nested = counted & (stream.kinds == NESTED_REFERENCE)
    # Every walk reads at least its leaf guest entry, so the walks are the accesses with a guest read.
    walks = len(distinct(stream.origins[guest]))
    return CacheOutcome(walks=walks, guest_hits=int(hits[guest].sum()), guest_misses=int((~hits[guest]).sum()),
                        nested_hits=int(hits[nested].sum()), nested_misses=int((~hits[nested]).sum()))
