"""What a walker reports for a trace: accesses, walks, and every memory reference by kind."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

# Kinds of memory reference in a reference stream (`batch.reference_stream`, `ReferenceWalker(record=True)`).
GUEST_REFERENCE = 0  # a guest (or native) page-table entry read
NESTED_REFERENCE = 1  # an EPT entry read
DATA_ACCESS = 2  # the access itself, after its translation


@dataclass(frozen=True)
class WalkCounts:
    accesses: int
    walks: int  # TLB misses
    guest_references: int  # guest (or native) page-table entries read
    nested_references: int  # EPT entries read
    nested_lookups: int  # guest-physical addresses translated (nested-TLB lookups)
    nested_walks: int  # nested-TLB misses, each a walk of the EPT
    pwc_hits: tuple[int, ...]  # per guest level above the leaf, root level first
    nested_pwc_hits: tuple[int, ...]  # per nested level above the leaf, root level first
    references_histogram: tuple[int, ...]  # entry k: walks that made k references

    @property
    def references(self) -> int:
        return self.guest_references + self.nested_references

    @property
    def references_per_walk(self) -> float:
        return self.references / self.walks if self.walks else 0.0

    @property
    def walks_per_access(self) -> float:
        return self.walks / self.accesses if self.accesses else 0.0

    @property
    def references_per_access(self) -> float:
        return self.references / self.accesses if self.accesses else 0.0


def combine(parts: Iterable[WalkCounts]) -> WalkCounts:
    """The counts of consecutive stretches of one trace, added up."""
    parts = list(parts)

    def add(vectors: Iterable[tuple[int, ...]]) -> tuple[int, ...]:
        return tuple(sum(column) for column in itertools.zip_longest(*vectors, fillvalue=0))

    return WalkCounts(
        accesses=sum(p.accesses for p in parts), walks=sum(p.walks for p in parts),
        guest_references=sum(p.guest_references for p in parts),
        nested_references=sum(p.nested_references for p in parts),
        nested_lookups=sum(p.nested_lookups for p in parts), nested_walks=sum(p.nested_walks for p in parts),
        pwc_hits=add(p.pwc_hits for p in parts), nested_pwc_hits=add(p.nested_pwc_hits for p in parts),
        references_histogram=add(p.references_histogram for p in parts),
    )
