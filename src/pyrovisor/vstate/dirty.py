"""Dirty-page tracking: KVM's dirty bitmap or dirty rings, plus host-side writes, for independent subscribers."""

from __future__ import annotations

import mmap
import threading
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from pyrovisor.kvm.vm import DIRTY_GFN_DIRTY, DIRTY_GFN_RESET, MEM_LOG_DIRTY_PAGES
from pyrovisor.memory import GuestMemory
from pyrovisor.memory.region import PAGE_SIZE
from pyrovisor.vstate.vm import Vm

_EMPTY = np.zeros(0, dtype=np.int64)
DIRTY_GFN = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])  # struct kvm_dirty_gfn


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
        with self._tracker.lock:  # a vCPU thread harvesting a full dirty ring must not add in between
            self._tracker.harvest()
            pending, self._pending = self._pending, []
        return np.unique(np.concatenate(pending)) if pending else _EMPTY

    def collect(self) -> set[int]:
        return {int(page) for page in self.collect_array()}

    def give_back(self, pages: np.ndarray) -> None:
        """Return pages from a collect whose consumer failed, so the next collect reports them again."""
        with self._tracker.lock:
            self._add(pages)

    def restart(self) -> None:
        """Forget what was written so far."""
        with self._tracker.lock:
            self._tracker.harvest()
            self._pending = []

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._tracker.unsubscribe(self)

    def _add(self, pages: np.ndarray) -> None:
        if len(pages):
            self._pending.append(pages)


class DirtySource(Protocol):
    """Where KVM reports pages the vCPUs wrote."""

    def reset(self) -> None: ...

    def harvest(self) -> list[np.ndarray]: ...

    def release(self) -> None: ...


class BitmapSource:
    """KVM_GET_DIRTY_LOG per memslot: cost grows with the size of guest memory."""

    def __init__(self, vm: Vm) -> None:
        self._vm = vm

    def reset(self) -> None:
        for memslot in self._vm.memslots:
            self._vm.get_dirty_log(memslot.slot)

    def harvest(self) -> list[np.ndarray]:
        return [bitmap_pages(self._vm.get_dirty_log(memslot.slot), memslot.region.gpa // PAGE_SIZE)
                for memslot in self._vm.memslots if memslot.dirty_logging]

    def release(self) -> None:
        return None


class RingSource:
    """Per-vCPU dirty rings (KVM_CAP_DIRTY_LOG_RING): cost grows with the number of pages written."""

    def __init__(self, vm: Vm, rings: Sequence[mmap.mmap]) -> None:
        self._vm = vm
        self._rings = [np.frombuffer(ring, dtype=DIRTY_GFN) for ring in rings]
        self._next = [0] * len(rings)

    def reset(self) -> None:
        self.harvest()

    def harvest(self) -> list[np.ndarray]:
        slot_base = {memslot.slot: memslot.region.gpa // PAGE_SIZE for memslot in self._vm.memslots}
        parts = []
        for index, ring in enumerate(self._rings):
            size = len(ring)
            order = (np.arange(size) + self._next[index]) % size  # oldest unread entry first
            dirty = (ring["flags"][order] & DIRTY_GFN_DIRTY) != 0
            count = size if dirty.all() else int(np.argmin(dirty))
            if count == 0:
                continue
            taken = order[:count]
            entries = ring[taken]
            bases = np.fromiter((slot_base.get(int(slot), -1) for slot in entries["slot"]), dtype=np.int64,
                                count=count)
            parts.append((bases + entries["offset"].astype(np.int64))[bases >= 0])
            flags = ring["flags"]
            flags[taken] = DIRTY_GFN_RESET  # handed back to KVM, which recycles them on reset
            self._next[index] = (self._next[index] + count) % size
        if parts:
            self._vm.fd.reset_dirty_rings()
        return parts

    def release(self) -> None:
        """Drop the views on the ring mappings so that they can be unmapped."""
        self._rings = []


class DirtyTracker:
    """Turns dirty logging on while anyone subscribes (snapshots for diffs, a migration, the sandbox).

    KVM logs the pages the vCPUs write; `GuestMemory` records the pages the VMM itself writes (devices,
    loaders). Each harvest hands the pages to every subscriber, so one subscriber's collect never
    hides pages from another.
    """

    def __init__(self, vm: Vm, memory: GuestMemory, source: DirtySource | None = None) -> None:
        self._vm = vm
        self._memory = memory
        self.source: DirtySource = source or BitmapSource(vm)
        self._subscribers: list[DirtyLog] = []
        self.lock = threading.RLock()  # vCPU threads harvest too, when their dirty ring fills up

    @property
    def active(self) -> bool:
        return bool(self._subscribers)

    def subscribe(self) -> DirtyLog:
        with self.lock:
            if not self._subscribers:
                for memslot in self._vm.memslots:
                    if not memslot.dirty_logging:
                        self._vm.set_memslot_flags(memslot.slot, memslot.flags | MEM_LOG_DIRTY_PAGES)
                self.source.reset()
                self._memory.start_tracking()
            else:
                self.harvest()  # earlier subscribers keep what was written before this one joined
            log = DirtyLog(self)
            self._subscribers.append(log)
            return log

    def harvest(self) -> None:
        """Fetch (and reset) KVM's record and the host-written pages; give them to every subscriber."""
        with self.lock:
            parts = self.source.harvest()
            if self._subscribers:
                host = self._memory.take_tracked_pages()
                if len(host):
                    parts.append(host)
            pages = np.unique(np.concatenate(parts)) if parts else _EMPTY
            for subscriber in self._subscribers:
                subscriber._add(pages)

    def unsubscribe(self, log: DirtyLog) -> None:
        with self.lock:
            self._subscribers.remove(log)
            if not self._subscribers:
                for memslot in self._vm.memslots:
                    if memslot.dirty_logging:
                        self._vm.set_memslot_flags(memslot.slot, memslot.flags & ~MEM_LOG_DIRTY_PAGES)
                self.source.harvest()  # drain entries logged before logging stopped
                self._memory.stop_tracking()
