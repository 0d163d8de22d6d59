"""LRU caches of translations: one object per cache for the reference walker, and a whole-stream function.

A cache has `entries` entries in sets of `ways` (ways = 0: fully associative). A key (a page number
or an address prefix) belongs to set `key mod sets`; each set keeps its keys in least-recently-used
order. A lookup that hits makes the key the most recent; a miss is followed by a fill that inserts
the key and evicts the least recent one when the set is full. Zero entries: nothing is cached.

`lru_hits` answers, for a whole stream of keys, which lookups hit a cache that starts empty and is
filled after every miss. The answer is exact: each set's stream runs through `functools.lru_cache`,
CPython's least-recently-used cache (a dictionary and a linked list, in C), wrapped around a counter so
that every miss returns a fresh number. A key repeated back to back always hits and changes nothing, so
such repeats are answered without the cache; and when a stream has fewer distinct keys than a set has
ways, nothing is ever evicted, so exactly the first lookup of each key misses.
"""

from __future__ import annotations

import functools
import itertools
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from pyrovisor.errors import ConfigError


@dataclass(frozen=True)
class CacheGeometry:
    entries: int
    ways: int = 0  # 0: fully associative

    def __post_init__(self) -> None:
        if self.entries < 0 or self.ways < 0:
            raise ConfigError("cache geometry", (self.entries, self.ways), "sizes must not be negative")
        if self.ways and self.entries % self.ways:
            raise ConfigError("cache geometry", f"{self.entries}:{self.ways}", "entries must be a multiple of ways")

    @property
    def sets(self) -> int:
        return self.entries // self.ways if self.ways and self.entries else 1

    @property
    def ways_per_set(self) -> int:
        return min(self.ways, self.entries) if self.ways else self.entries

    def describe(self) -> str:
        if self.entries == 0:
            return "none"
        if self.ways in (0, self.entries):
            return f"{self.entries}, fully assoc."
        return f"{self.entries}, {self.ways}-way"

    @classmethod
    def parse(cls, text: str) -> CacheGeometry:
        """'1536:12' is 1536 entries, 12-way; '32' is 32 entries, fully associative."""
        entries, _, ways = text.partition(":")
        try:
            return cls(int(entries), int(ways) if ways else 0)
        except ValueError as exc:
            raise ConfigError("cache geometry", text, "give ENTRIES or ENTRIES:WAYS, e.g. 1536:12") from exc


class LruCache:
    """One cache, looked up and filled one key at a time (the reference walker's caches)."""

    def __init__(self, geometry: CacheGeometry) -> None:
        self.geometry = geometry
        self._capacity = geometry.ways_per_set
        self._sets: list[OrderedDict[int, int]] = [OrderedDict() for _ in range(geometry.sets)]
        self.hits = 0
        self.misses = 0

    def lookup(self, key: int) -> int | None:
        entries = self._sets[key % len(self._sets)]
        if key in entries:
            entries.move_to_end(key)
            self.hits += 1
            return entries[key]
        self.misses += 1
        return None

    def fill(self, key: int, value: int) -> None:
        if self._capacity == 0:
            return
        entries = self._sets[key % len(self._sets)]
        entries[key] = value
        if len(entries) > self._capacity:
            entries.popitem(last=False)


def lru_hits(keys: np.ndarray, geometry: CacheGeometry) -> np.ndarray:
    """Which lookups of `keys`, in order, hit an initially empty cache filled after each miss."""
    keys = np.asarray(keys, dtype=np.int64)
    if len(keys) == 0 or geometry.ways_per_set == 0:
        return np.zeros(len(keys), dtype=bool)
    starts = np.empty(len(keys), dtype=bool)
    starts[0] = True
    np.not_equal(keys[1:], keys[:-1], out=starts[1:])
    distinct_runs = keys[starts]
    if geometry.sets == 1:
        run_hits = _fully_associative_hits(distinct_runs, geometry.ways_per_set)
    else:
        set_of = distinct_runs % geometry.sets
        order = np.argsort(set_of.astype(np.uint16) if geometry.sets <= 1 << 16 else set_of, kind="stable")
        by_set = distinct_runs[order]
        bounds = np.concatenate([[0], np.cumsum(np.bincount(set_of, minlength=geometry.sets))]).tolist()
        hits_by_set = np.empty(len(by_set), dtype=bool)
        for first, last in itertools.pairwise(bounds):
            if last > first:
                hits_by_set[first:last] = _fully_associative_hits(by_set[first:last], geometry.ways_per_set)
        run_hits = np.empty(len(by_set), dtype=bool)
        run_hits[order] = hits_by_set
    hits = np.ones(len(keys), dtype=bool)
    hits[starts] = run_hits
    return hits


def _fully_associative_hits(keys: np.ndarray, capacity: int) -> np.ndarray:
    lowest = int(keys.min())
    if int(keys.max()) - lowest < capacity:  # fewer distinct keys than entries: no evictions
        offsets = keys - lowest
        positions = np.arange(len(keys))
        first_seen = np.empty(int(offsets.max()) + 1, dtype=np.int64)
        first_seen[offsets[::-1]] = positions[::-1]  # the earliest position of each key is written last
        repeated: np.ndarray = first_seen[offsets] != positions
        return repeated
    counter = itertools.count()
    cache = functools.lru_cache(maxsize=capacity)(functools.partial(next, counter))
    tokens = np.fromiter(map(cache, np.ascontiguousarray(keys).data), dtype=np.int64, count=len(keys))
    # Misses draw 0, 1, 2, ... in order, so a lookup missed exactly when its token exceeds every earlier one.
    fresh = np.empty(len(tokens), dtype=bool)
    fresh[0] = True
    np.greater(tokens[1:], np.maximum.accumulate(tokens)[:-1], out=fresh[1:])
    return ~fresh
