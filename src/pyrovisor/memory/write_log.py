"""HostWriteLog: which guest pages the VMM itself wrote, one bit per page, exact under concurrent writers."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from pyrovisor.memory.page_set import PageSet
from pyrovisor.memory.region import PAGE_SIZE, MemoryRegion


class HostWriteLog:
    """A bitmap of guest pages for each RAM region (bit n = the region's page n), set by writers and taken by
    one harvester.

    KVM's dirty log sees only what vCPUs write; devices, loaders and the page-discard port write
    through `GuestMemory`, which records here. Setting bits and taking them both hold one lock, so a
    page recorded while a harvest runs lands either in that harvest or in the next, never nowhere.
    """

    def __init__(self, regions: Sequence[MemoryRegion]) -> None:
        self._regions = tuple(regions)
        self._lock = threading.Lock()
        self._bitmaps: list[bytearray] | None = None
        self._written = False  # some bit is set
        self.active = False  # read without the lock by writers, as a fast "nothing to do"

    def start(self) -> None:
        with self._lock:
            self._bitmaps = [_empty_bitmap(region) for region in self._regions]
            self._written = False
            self.active = True

    def stop(self) -> None:
        with self._lock:
            self._bitmaps = None
            self.active = False

    def record(self, gpa: int, size: int) -> None:
        """Mark every page [gpa, gpa+size) touches (the range must lie in RAM; callers check first)."""
        if size <= 0:
            return
        end = gpa + size
        with self._lock:
            bitmaps = self._bitmaps
            if bitmaps is None:
                return
            for region, bitmap in zip(self._regions, bitmaps, strict=True):
                if gpa < region.end and end > region.gpa:
                    first = (max(gpa, region.gpa) - region.gpa) // PAGE_SIZE
                    last = (min(end, region.end) - 1 - region.gpa) // PAGE_SIZE
                    _set_bits(bitmap, first, last)
                    self._written = True

    def take(self) -> PageSet:
        """The page frame numbers recorded since the last call; their bits are cleared."""
        with self._lock:
            bitmaps = self._bitmaps
            if bitmaps is None or not self._written:
                return PageSet()
            bits = 0
            for index, (region, bitmap) in enumerate(zip(self._regions, bitmaps, strict=True)):
                region_bits = int.from_bytes(bitmap, "little")
                if region_bits:
                    bits |= region_bits << (region.gpa // PAGE_SIZE)
                    bitmaps[index] = _empty_bitmap(region)
            self._written = False
        return PageSet(bits)


def _empty_bitmap(region: MemoryRegion) -> bytearray:
    return bytearray((region.size // PAGE_SIZE + 7) // 8)


def _set_bits(bitmap: bytearray, first: int, last: int) -> None:
    """Set bits first..last (inclusive) of a little-endian bitmap."""
    low, high = first >> 3, last >> 3
    head = (0xFF << (first & 7)) & 0xFF
    tail = 0xFF >> (7 - (last & 7))
    if low == high:
        bitmap[low] |= head & tail
        return
    bitmap[low] |= head
    if high - low > 1:
        bitmap[low + 1:high] = b"\xff" * (high - low - 1)
    bitmap[high] |= tail
