"""Dirty-page tracking: KVM's dirty log plus host-side writes, shared by independent subscribers."""

from __future__ import annotations

import numpy as np

from pyrovisor.kvm.vm import MEM_LOG_DIRTY_PAGES
from pyrovisor.memory import GuestMemory
from pyrovisor.memory.region import PAGE_SIZE
from pyrovisor.vstate.vm import Vm

_EMPTY = np.zeros(0, dtype=np.int64)


def bitmap_pages(bitmap: bytes | bytearray, first_page: int = 0) -> np.ndarray:
    """Page numbers of the set bits of a KVM dirty bitmap (bit n of the bitmap = page first_page + n)."""
    bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder="little")
    return np.flatnonzero(bits).astype(np.int64) + first_page


class DirtyLog:
    """One subscriber's view: the pages written since it subscribed or last collected."""

    def __init__(self, tracker: DirtyTracker) -> None:
        self._tracker = tracker
        self._pending: list[np.ndarray] = []
        self.closed = False

    def collect_array(self) -> np.ndarray:
        """Sorted unique page frame numbers written since the previous collect; starts a new interval."""
        self._tracker.harvest()
        pages = np.unique(np.concatenate(self._pending)) if self._pending else _EMPTY
        self._pending = []
        return pages

    def collect(self) -> set[int]:
        return {int(page) for page in self.collect_array()}

    def restart(self) -> None:
        """Forget what was written so far."""
        self._tracker.harvest()
        self._pending = []

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._tracker.unsubscribe(self)

    def _add(self, pages: np.ndarray) -> None:
        if len(pages):
            self._pending.append(pages)


class DirtyTracker:
    """Turns dirty logging on while anyone subscribes (snapshots for diffs, a migration, the sandbox).

    KVM logs the pages the vCPUs write; `GuestMemory` records the pages the VMM itself writes (devices,
    loaders). Each harvest hands the pages to every subscriber, so one subscriber's collect never
    hides pages from another.
    """

    def __init__(self, vm: Vm, memory: GuestMemory) -> None:
        self._vm = vm
        self._memory = memory
        self._subscribers: list[DirtyLog] = []

    @property
    def active(self) -> bool:
        return bool(self._subscribers)

    def subscribe(self) -> DirtyLog:
        if not self._subscribers:
            for memslot in self._vm.memslots:
                if not memslot.dirty_logging:
                    self._vm.set_memslot_flags(memslot.slot, memslot.flags | MEM_LOG_DIRTY_PAGES)
                self._vm.get_dirty_log(memslot.slot)
            self._memory.start_tracking()
        else:
            self.harvest()  # earlier subscribers keep what was written before this one joined
        log = DirtyLog(self)
        self._subscribers.append(log)
        return log

    def harvest(self) -> None:
        """Fetch (and reset) KVM's logs and the host-written pages; give them to every subscriber."""
        parts = [bitmap_pages(self._vm.get_dirty_log(memslot.slot), memslot.region.gpa // PAGE_SIZE)
                 for memslot in self._vm.memslots if memslot.dirty_logging]
        host = self._memory.take_tracked_pages()
        if host:
            parts.append(np.fromiter(host, dtype=np.int64, count=len(host)))
        pages = np.unique(np.concatenate(parts)) if parts else _EMPTY
        for subscriber in self._subscribers:
            subscriber._add(pages)

    def unsubscribe(self, log: DirtyLog) -> None:
        self._subscribers.remove(log)
        if not self._subscribers:
            for memslot in self._vm.memslots:
                if memslot.dirty_logging:
                    self._vm.set_memslot_flags(memslot.slot, memslot.flags & ~MEM_LOG_DIRTY_PAGES)
            self._memory.stop_tracking()
