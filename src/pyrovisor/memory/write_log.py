"""HostWriteLog: which guest pages the VMM itself wrote, one flag per page, exact under concurrent writers."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from pyrovisor.memory.region import PAGE_SIZE, MemoryRegion

_EMPTY = np.zeros(0, dtype=np.int64)


class HostWriteLog:
    """A flag per guest page for each RAM region, set by writers and taken by one harvester.

    KVM's dirty log sees only what vCPUs write; devices, loaders and the page-discard port write
    through `GuestMemory`, which records here. Setting flags and taking them both hold one lock, so a
    page recorded while a harvest runs lands either in that harvest or in the next, never nowhere.
    """

    def __init__(self, regions: Sequence[MemoryRegion]) -> None:
        self._regions = tuple(regions)
        self._lock = threading.Lock()
        self._flags: list[np.ndarray] | None = None
        self.active = False  # read without the lock by writers, as a fast "nothing to do"

    def start(self) -> None:
        with self._lock:
            self._flags = [np.zeros(region.size // PAGE_SIZE, dtype=np.bool_) for region in self._regions]
            self.active = True

    def stop(self) -> None:
        with self._lock:
            self._flags = None
            self.active = False

    def record(self, gpa: int, size: int) -> None:
        """Mark every page [gpa, gpa+size) touches (the range must lie in RAM; callers check first)."""
        if size <= 0:
            return
        end = gpa + size
        with self._lock:
            flags = self._flags
            if flags is None:
                return
            for region, bits in zip(self._regions, flags, strict=True):
                if gpa < region.end and end > region.gpa:
                    first = (max(gpa, region.gpa) - region.gpa) // PAGE_SIZE
                    last = (min(end, region.end) - 1 - region.gpa) // PAGE_SIZE
                    bits[first:last + 1] = True

    def take(self) -> np.ndarray:
        """Sorted page frame numbers recorded since the last call; their flags are cleared."""
        with self._lock:
            flags = self._flags
            if flags is None:
                return _EMPTY
            parts = []
            for region, bits in zip(self._regions, flags, strict=True):
                marked = np.flatnonzero(bits)
                if len(marked):
                    bits[marked] = False
                    parts.append(marked.astype(np.int64) + region.gpa // PAGE_SIZE)
        return np.concatenate(parts) if parts else _EMPTY
