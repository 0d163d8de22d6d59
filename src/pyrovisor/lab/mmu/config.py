"""What a simulated MMU looks like: the two paging dimensions and the sizes of its translation caches.

Defaults are assumptions of the order of a recent x86 core, not a specific part: a 1536-entry, 12-way
TLB; 32-entry paging-structure caches per level above the leaves, for the guest's tables and for the
nested ones; a 64-entry nested TLB (guest-physical -> host-physical).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pyrovisor.lab.mmu.caches import CacheGeometry
from pyrovisor.lab.mmu.x86 import PagingSide

NO_CACHE = CacheGeometry(0)
FOUR_LEVELS_4K = PagingSide()
TLB = CacheGeometry(1536, 12)
PAGING_STRUCTURE_CACHE = CacheGeometry(32)
NESTED_TLB = CacheGeometry(64)


@dataclass(frozen=True)
class MmuConfig:
    guest: PagingSide = FOUR_LEVELS_4K
    host: PagingSide | None = FOUR_LEVELS_4K  # None: bare metal, one-dimensional walks
    tlb: CacheGeometry = TLB
    pwc: CacheGeometry = PAGING_STRUCTURE_CACHE  # each guest (or native) level above the leaf has one
    nested_tlb: CacheGeometry = NESTED_TLB
    nested_pwc: CacheGeometry = PAGING_STRUCTURE_CACHE  # each nested level above the leaf has one

    @property
    def nested(self) -> bool:
        return self.host is not None

    @property
    def tlb_page_shift(self) -> int:
        """A TLB entry covers the smaller of the guest and host pages (a guest 2 MiB page on 4 KiB host pages
        is cached as 4 KiB pieces)."""
        if self.host is None:
            return self.guest.page_shift
        return min(self.guest.page_shift, self.host.page_shift)

    def native(self) -> MmuConfig:
        return replace(self, host=None)

    def cold(self) -> MmuConfig:
        """The same MMU with every translation cache removed: each access is a full walk."""
        return replace(self, tlb=NO_CACHE, pwc=NO_CACHE, nested_tlb=NO_CACHE, nested_pwc=NO_CACHE)

    def cold_references(self) -> int:
        """References of a walk with nothing cached: n on bare metal, (n + 1)(m + 1) - 1 nested."""
        n = self.guest.walked_levels
        if self.host is None:
            return n
        m = self.host.walked_levels
        return (n + 1) * (m + 1) - 1
