"""Dirty-page tracking: KVM's dirty bitmap or dirty rings, plus host-side writes, for independent subscribers."""

from __future__ import annotations

import mmap
import struct
import threading
from array import array
from collections.abc import Sequence
from typing import Protocol

from pyrovisor.kvm.vm import DIRTY_GFN_DIRTY, DIRTY_GFN_RESET, MEM_LOG_DIRTY_PAGES
from pyrovisor.memory import GuestMemory, PageSet
from pyrovisor.memory.region import PAGE_SIZE
from pyrovisor.vstate.vm import Vm

DIRTY_GFN = struct.Struct("<IIQ")  # struct kvm_dirty_gfn: u32 flags, u32 slot, u64 offset (pages into the slot)
_DIRTY_BIT = bytes(value & DIRTY_GFN_DIRTY for value in range(256))  # the low byte of `flags` -> its DIRTY bit
_RESET = array("I", [DIRTY_GFN_RESET])


class DirtyLog:
    """One subscriber's view: the pages written since it subscribed or last collected."""

    def __init__(self, tracker: DirtyTracker) -> None:
        self._tracker = tracker
        self._pending = PageSet()
        self.closed = False

    def collect_pages(self) -> PageSet:
        """The page frame numbers written since the previous collect; starts a new interval."""
        with self._tracker.lock:  # a vCPU thread harvesting a full dirty ring must not add in between
            self._tracker.harvest()
            pending, self._pending = self._pending, PageSet()
        return pending

    def collect(self) -> set[int]:
        return set(self.collect_pages())

    def give_back(self, pages: PageSet) -> None:
        """Return pages from a collect whose consumer failed, so the next collect reports them again."""
        with self._tracker.lock:
            self._add(pages)

    def restart(self) -> None:
        """Forget what was written so far."""
        with self._tracker.lock:
            self._tracker.harvest()
            self._pending = PageSet()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._tracker.unsubscribe(self)

    def _add(self, pages: PageSet) -> None:
        self._pending |= pages


class DirtySource(Protocol):
    """Where KVM reports pages the vCPUs wrote."""

    def reset(self) -> None: ...

    def harvest(self) -> PageSet: ...

    def release(self) -> None: ...


class BitmapSource:
    """KVM_GET_DIRTY_LOG per memslot: cost grows with the size of guest memory."""

    def __init__(self, vm: Vm) -> None:
        self._vm = vm

    def reset(self) -> None:
        for memslot in self._vm.memslots:
            self._vm.get_dirty_log(memslot.slot)

    def harvest(self) -> PageSet:
        bits = 0
        for memslot in self._vm.memslots:
            if memslot.dirty_logging:
                bitmap = self._vm.get_dirty_log(memslot.slot)
                bits |= PageSet.from_bitmap(bitmap, memslot.region.gpa // PAGE_SIZE).bits
        return PageSet(bits)

    def release(self) -> None:
        return None


class RingSource:
    """Per-vCPU dirty rings (KVM_CAP_DIRTY_LOG_RING): cost grows with the number of pages written."""

    def __init__(self, vm: Vm, rings: Sequence[mmap.mmap]) -> None:
        self._vm = vm
        self._rings = [_Ring(ring) for ring in rings]

    def reset(self) -> None:
        self.harvest()

    def harvest(self) -> PageSet:
        slot_base = {memslot.slot: memslot.region.gpa // PAGE_SIZE for memslot in self._vm.memslots}
        pages: list[int] = []
        harvested = False
        for ring in self._rings:
            count = ring.dirty_count()
            if count == 0:
                continue
            start = ring.next  # oldest unread entry first; the entries may wrap around the end
            for begin, end in ((start, min(start + count, ring.size)), (0, start + count - ring.size)):
                if end > begin:
                    _add_pages(pages, slot_base, ring.words[4 * begin + 1:4 * end:4].tolist(),
                               ring.quads[2 * begin + 1:2 * end:2].tolist())
                    # handed back to KVM, which recycles them on reset
                    ring.words[4 * begin:4 * end:4] = _RESET * (end - begin)
            ring.next = (start + count) % ring.size
            harvested = True
        if harvested:
            self._vm.fd.reset_dirty_rings()
        return PageSet.of(pages)

    def release(self) -> None:
        """Drop the views on the ring mappings so that they can be unmapped."""
        for ring in self._rings:
            ring.release()
        self._rings = []


class _Ring:
    """Views on one vCPU's ring of struct kvm_dirty_gfn entries, and where the next unread entry is."""

    def __init__(self, mapping: mmap.mmap) -> None:
        self.raw = memoryview(mapping)
        self.words = self.raw.cast("I")  # entry i: flags at 4i, slot at 4i + 1
        self.quads = self.raw.cast("Q")  # entry i: offset at 2i + 1
        self.size = len(self.raw) // DIRTY_GFN.size
        self.next = 0

    def dirty_count(self) -> int:
        """How many entries from `next` on (around the end if need be) KVM has filled: the run of DIRTY flags."""
        raw, start, entry = self.raw, self.next, DIRTY_GFN.size
        if not raw[start * entry] & DIRTY_GFN_DIRTY:
            return 0
        tail = raw[start * entry::entry].tobytes().translate(_DIRTY_BIT).find(0)
        if tail >= 0:
            return tail
        head = raw[:start * entry:entry].tobytes().translate(_DIRTY_BIT).find(0)
        return self.size - start + (start if head < 0 else head)

    def release(self) -> None:
        for view in (self.quads, self.words, self.raw):
            view.release()


def _add_pages(pages: list[int], slot_base: dict[int, int], slots: list[int], offsets: list[int]) -> None:
    """Append the guest page of each (slot, offset) entry; those of a slot that no longer exists are dropped."""
    if slots.count(slots[0]) == len(slots):  # the usual case: every entry is in one memslot
        base = slot_base.get(slots[0])
        if base is not None:
            pages.extend([base + offset for offset in offsets])
        return
    for slot, offset in zip(slots, offsets, strict=True):
        base = slot_base.get(slot)
        if base is not None:
            pages.append(base + offset)


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
            pages = self.source.harvest()
            if self._subscribers:
                pages |= self._memory.take_tracked_pages()
            if pages:
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
