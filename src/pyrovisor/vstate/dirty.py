"""DirtyTracker: which guest pages changed since the last look — KVM's dirty log plus host-side writes."""

from __future__ import annotations

import numpy as np

from pyrovisor.kvm.vm import MEM_LOG_DIRTY_PAGES
from pyrovisor.memory import GuestMemory
from pyrovisor.memory.region import PAGE_SIZE
from pyrovisor.vstate.vm import Vm


def bitmap_pages(bitmap: bytes | bytearray, first_page: int = 0) -> np.ndarray:
    """Page numbers of the set bits of a KVM dirty bitmap (bit n of the bitmap = page first_page + n)."""
    bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder="little")
    return np.flatnonzero(bits).astype(np.int64) + first_page


class DirtyTracker:
    """Turns on dirty logging for every memslot and reports changed guest page frame numbers.

    KVM logs pages the vCPUs write; `GuestMemory` records pages the VMM itself writes (devices,
    loaders). `collect()` returns both and starts a new interval.
    """

    def __init__(self, vm: Vm, memory: GuestMemory) -> None:
        self._vm = vm
        self._memory = memory
        self.active = False

    def start(self) -> None:
        """Begin an interval: enable logging where needed and forget everything written so far."""
        for memslot in self._vm.memslots:
            if not memslot.dirty_logging:
                self._vm.set_memslot_flags(memslot.slot, memslot.flags | MEM_LOG_DIRTY_PAGES)
            self._vm.get_dirty_log(memslot.slot)
        self._memory.start_tracking()
        self.active = True

    def collect_array(self) -> np.ndarray:
        """Sorted unique page numbers written since `start()` or the previous collect."""
        parts = [bitmap_pages(self._vm.get_dirty_log(memslot.slot), memslot.region.gpa // PAGE_SIZE)
                 for memslot in self._vm.memslots if memslot.dirty_logging]
        host = self._memory.take_tracked_pages()
        if host:
            parts.append(np.fromiter(host, dtype=np.int64, count=len(host)))
        if not parts:
            return np.zeros(0, dtype=np.int64)
        return np.unique(np.concatenate(parts))

    def collect(self) -> set[int]:
        return {int(page) for page in self.collect_array()}

    def stop(self) -> None:
        for memslot in self._vm.memslots:
            if memslot.dirty_logging:
                self._vm.set_memslot_flags(memslot.slot, memslot.flags & ~MEM_LOG_DIRTY_PAGES)
        self._memory.stop_tracking()
        self.active = False
