"""SplitQueue: a virtio split virtqueue (virtio 1.2 §2.7) read and written through GuestMemory, with every
guest-supplied index, address and length checked, so a hostile driver can only break its own device."""

from __future__ import annotations

import array
import functools
import struct
import threading
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from pyrovisor.errors import GuestMemoryError
from pyrovisor.memory import GuestMemory

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
_NOT_ALONE = DESC_F_NEXT | DESC_F_INDIRECT  # a descriptor that is not a whole request by itself
_NOTHING = memoryview(b"")
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

DESCRIPTOR = struct.Struct("<QIHH")  # addr, len, flags, next
USED_ELEMENT = struct.Struct("<II")  # id, len
MAX_QUEUE_SIZE = 32768
MAX_INDIRECT = 1024  # descriptors in one indirect table (an indirect table is at most 16 KiB)
MAX_CHAIN_BYTES = 1 << 32  # a chain's buffers together: anything larger is not a real request


class QueueError(Exception):
    """The driver broke the queue's rules; the device must stop using it (DEVICE_NEEDS_RESET)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Buffer(NamedTuple):
    """One descriptor's buffer: guest-physical address and length, checked to lie in guest RAM (a tuple: one
    is made per descriptor, on the hot path)."""

    address: int
    length: int


class DescriptorChain(NamedTuple):
    """A request popped from the available ring: the buffers the device reads, then those it writes."""

    head: int
    readable: tuple[Buffer, ...]
    writable: tuple[Buffer, ...]

    @property
    def readable_length(self) -> int:
        return sum(buffer.length for buffer in self.readable)

    @property
    def writable_length(self) -> int:
        return sum(buffer.length for buffer in self.writable)


# The named tuples' constructors without their Python-level __new__ (a function call less per request).
_new_buffer = functools.partial(tuple.__new__, Buffer)
_new_chain = functools.partial(tuple.__new__, DescriptorChain)
_unpack_descriptor = DESCRIPTOR.unpack_from


@dataclass(frozen=True)
class QueueState:
    """A queue as the driver configured it and as far as the device has got (snapshots, migration)."""

    size: int = 0
    ready: bool = False
    desc: int = 0
    avail: int = 0
    used: int = 0
    next_avail: int = 0  # the device's position in the available ring
    next_used: int = 0  # the index the device last published in the used ring
    signalled_used: int = 0  # next_used when the driver was last interrupted (EVENT_IDX)
    event_idx: bool = False  # VIRTIO_F_EVENT_IDX negotiated
    indirect: bool = False  # VIRTIO_F_INDIRECT_DESC negotiated


_FENCE = threading.Lock()


def memory_fence() -> None:
    """A full barrier between this thread's stores and its later loads (x86 may reorder exactly those).

    Taking and releasing a lock is a locked read-modify-write, which orders them; the virtio rules need it
    wherever the device publishes an index and then reads the driver's (used idx → used_event, avail_event →
    avail idx), or a notification or an interrupt can be lost.
    """
    with _FENCE:
        pass


def need_event(event: int, new: int, old: int) -> bool:
    """The virtio rule for EVENT_IDX: did the index pass `event` when it moved from old to new?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


class SplitQueue:
    """The device's side of one split virtqueue.

    The transport sets `size`, the three ring addresses and the negotiated `event_idx` and `indirect` from
    the driver's writes, then
    `activate()` checks them. `pop()` returns the next chain or None; `add_used()` publishes a finished
    one; `needs_interrupt()` says whether the driver asked to hear about it.
    """

    def __init__(self, memory: GuestMemory, max_size: int, state: QueueState | None = None) -> None:
        if not 0 < max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of two up to {MAX_QUEUE_SIZE}")
        self.memory = memory
        self.max_size = max_size
        # The RAM check of every buffer, inlined on the hot path: a buffer lies in RAM when it ends at or before
        # the end of the last region starting at or below it. A first, empty region at 0 catches addresses
        # below the real first one (descriptor addresses and lengths are unsigned).
        starts, ends = memory.bounds
        self._starts, self._ends = (0, *starts), (0, *ends)
        self._views = (_NOTHING, *memory.region_views())  # take_direct() slices these
        # Views of the three rings while the queue is active (checked to lie in RAM): indexing a memoryview
        # cast to 16 or 32 bits is one load or store of that width, and avoids a bounds check per access.
        self._table: memoryview | None = None
        self._avail16: memoryview | None = None
        self._used16: memoryview | None = None
        self._used32: memoryview | None = None
        self._published = False  # the used ring changed since it was last reported to dirty tracking
        # take_direct()'s items by head, each with the descriptor it was made from: drivers keep reusing the same
        # descriptor for the same buffer, and an unchanged descriptor needs no new checks and no new view.
        self._direct: list[tuple[tuple[int, int, int, int], tuple[int, int, memoryview, int]] | None] = []
        self.load(state or QueueState())

    # --- configuration --------------------------------------------------------------------------------
    def load(self, state: QueueState) -> None:
        self.size = state.size
        self.ready = state.ready
        self.desc, self.avail, self.used = state.desc, state.avail, state.used
        self.next_avail, self.next_used = state.next_avail & 0xFFFF, state.next_used & 0xFFFF
        self.signalled_used = state.signalled_used & 0xFFFF
        self.event_idx = state.event_idx
        self.indirect = state.indirect

    def save(self) -> QueueState:
        return QueueState(self.size, self.ready, self.desc, self.avail, self.used, self.next_avail, self.next_used,
                          self.signalled_used, self.event_idx, self.indirect)

    def reset(self) -> None:
        self.release()
        self.load(QueueState())

    def release(self) -> None:
        """Drop the views of the rings (before guest memory can be unmapped, and on reset)."""
        for view in (self._table, self._avail16, self._used16, self._used32):
            if view is not None:
                view.release()
        self._table = self._avail16 = self._used16 = self._used32 = None
        self._direct = []  # its views of guest memory go too

    def activate(self) -> None:
        """Check the driver's configuration before the queue is used (QueueReady, or after a restore)."""
        size = self.size
        if not 0 < size <= self.max_size or size & (size - 1):
            raise QueueError(f"queue size {size} is not a power of two up to {self.max_size}")
        for name, address, length, alignment in (
                ("descriptor table", self.desc, DESCRIPTOR.size * size, 16),
                ("available ring", self.avail, 6 + 2 * size, 2),
                ("used ring", self.used, 6 + USED_ELEMENT.size * size, 4)):
            if address % alignment:
                raise QueueError(f"{name} at {address:#x} is not {alignment}-byte aligned")
            if not self.memory.contains(address, length):
                raise QueueError(f"{name} at {address:#x} (+{length:#x}) is not in guest RAM")
        self.release()
        used_bytes = 8 + USED_ELEMENT.size * size  # flags, idx, the ring, avail_event, 2 bytes of padding
        if not self.memory.contains(self.used, used_bytes):
            used_bytes -= 2  # at the very end of RAM: avail_event is the last field
        self._table = self.memory.view(self.desc, DESCRIPTOR.size * size)
        self._avail16 = self.memory.view(self.avail, 6 + 2 * size).cast("H")
        used = self.memory.view(self.used, used_bytes - used_bytes % 4)
        self._used32 = used.cast("I")
        self._used16 = self.memory.view(self.used, 6 + USED_ELEMENT.size * size).cast("H")
        used.release()
        self._direct = [None] * size

    # --- the available ring ----------------------------------------------------------------------------
    def pending(self) -> int:
        """Chains the driver has made available and the device has not taken yet."""
        rings = self._avail16
        index = rings[1] if rings is not None else self.memory.read_u16(self.avail + 2)
        available = (index - self.next_avail) & 0xFFFF
        if available > self.size:
            raise QueueError(f"available index moved {available} entries ahead of a {self.size}-entry queue")
        return available

    def pop(self) -> DescriptorChain | None:
        """The next available chain, fully checked, or None when the driver has made none available."""
        try:
            if not self.pending():
                return None
            rings = self._avail16
            slot = self.next_avail % self.size
            head = rings[2 + slot] if rings is not None else self.memory.read_u16(self.avail + 4 + 2 * slot)
            chain = self._walk(head)
        except GuestMemoryError as exc:  # the rings themselves were checked: only a bad buffer gets here
            raise QueueError(f"guest memory access failed: {exc}") from None
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return chain

    def _walk(self, head: int) -> DescriptorChain:
        if head >= self.size:
            raise QueueError(f"chain head {head} is outside the {self.size}-entry descriptor table")
        direct = self._table
        if direct is not None:  # the common request, one direct descriptor, in as few steps as possible
            address, length, flags, _ = DESCRIPTOR.unpack_from(direct, head << 4)
            if not flags & _NOT_ALONE:
                if length and address + length > self._ends[bisect_right(self._starts, address) - 1]:
                    raise QueueError(f"buffer at {address:#x} (+{length:#x}) is not in guest RAM")
                buffer = (_new_buffer((address, length)),)
                return _new_chain((head, (), buffer) if flags & DESC_F_WRITE else (head, buffer, ()))
        readable: list[Buffer] = []
        writable: list[Buffer] = []
        starts, ends, unpack = self._starts, self._ends, _unpack_descriptor
        table, table_size, index = self.desc, self.size, head
        # Where the descriptors are read from: the table's view, or (a queue not activated) a copy of it.
        source: memoryview | bytes = direct if direct is not None else self.memory.read(table, DESCRIPTOR.size * table_size)
        indirect = False
        total = 0
        seen = 0
        while True:
            seen += 1
            if seen > table_size:
                raise QueueError(f"descriptor chain from {head} loops or is longer than its table ({table_size})")
            address, length, flags, following = unpack(source, index << 4)
            if flags & DESC_F_INDIRECT:
                if indirect:
                    raise QueueError("an indirect table points to another indirect table")
                if flags & DESC_F_NEXT:
                    raise QueueError("a descriptor is both indirect and chained")
                if not self.indirect:
                    raise QueueError("indirect descriptor used but VIRTIO_F_INDIRECT_DESC was not negotiated")
                if length == 0 or length % DESCRIPTOR.size or length // DESCRIPTOR.size > MAX_INDIRECT:
                    raise QueueError(f"indirect table of {length} bytes (a multiple of 16, at most "
                                     f"{MAX_INDIRECT} descriptors)")
                if address % 16 or not self.memory.contains(address, length):
                    raise QueueError(f"indirect table at {address:#x} (+{length:#x}) is not aligned in guest RAM")
                table, table_size, index, indirect, seen = address, length // DESCRIPTOR.size, 0, True, 0
                source = self.memory.read(address, length)  # read once, walked from this copy
                continue
            if length and address + length > ends[bisect_right(starts, address) - 1]:
                raise QueueError(f"buffer at {address:#x} (+{length:#x}) is not in guest RAM")
            total += length
            if total > MAX_CHAIN_BYTES:
                raise QueueError(f"descriptor chain from {head} holds more than {MAX_CHAIN_BYTES} bytes")
            if flags & DESC_F_WRITE:
                writable.append(_new_buffer((address, length)))
            elif writable:
                raise QueueError("a device-readable buffer follows a device-writable one")
            else:
                readable.append(_new_buffer((address, length)))
            if not flags & DESC_F_NEXT:
                return _new_chain((head, tuple(readable), tuple(writable)))
            if following >= table_size:
                raise QueueError(f"descriptor {index} chains to {following}, outside its {table_size}-entry table")
            index = following

    # --- the used ring ---------------------------------------------------------------------------------------
    def add_used(self, head: int, written: int) -> None:
        """Publish a finished chain and how many bytes the device wrote into it."""
        used32, used16 = self._used32, self._used16
        slot = self.next_used % self.size
        self.next_used = (self.next_used + 1) & 0xFFFF
        if used32 is None or used16 is None:
            self.memory.write(self.used + 4 + USED_ELEMENT.size * slot, USED_ELEMENT.pack(head, written))
            self.memory.write_u16(self.used + 2, self.next_used)
            return
        used32[1 + 2 * slot] = head
        used32[2 + 2 * slot] = written
        used16[1] = self.next_used  # after the element: the driver reads it next
        self._published = True

    def add_used_many(self, finished: list[int]) -> None:
        """`add_used` for a batch, given flat: head, bytes written, head, bytes written... The elements go in with
        one copy (the driver reads none before the index, which is stored once, after them)."""
        used32, used16 = self._used32, self._used16
        count = len(finished) // 2
        if used32 is None or used16 is None:
            for index in range(count):
                self.add_used(finished[2 * index], finished[2 * index + 1])
            return
        size, position = self.size, self.next_used
        slot = position & (size - 1)
        first = min(count, size - slot)  # the ring wraps after this many
        used32[1 + 2 * slot:1 + 2 * (slot + first)] = array.array("I", finished[:2 * first])
        if first < count:
            used32[1:1 + 2 * (count - first)] = array.array("I", finished[2 * first:])
        position = (position + count) & 0xFFFF
        self.next_used = position
        used16[1] = position  # after the elements: the driver reads it next
        self._published = True

    def report_writes(self) -> None:
        """Tell dirty tracking about the used ring the device wrote through its view (once per batch)."""
        if self._published:
            self._published = False
            self.memory.mark_written(self.used, 6 + USED_ELEMENT.size * self.size + 2)

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for what was published since the last one."""
        self.report_writes()
        memory_fence()  # the used index written above must be visible before the driver's flag is read
        rings = self._avail16
        if self.event_idx:
            used_event = rings[2 + self.size] if rings is not None else self.memory.read_u16(self.avail + 4 + 2 * self.size)
            wanted = need_event(used_event, self.next_used, self.signalled_used)
        else:
            flags = rings[0] if rings is not None else self.memory.read_u16(self.avail)
            wanted = not flags & AVAIL_F_NO_INTERRUPT
        self.signalled_used = self.next_used
        return wanted

    def want_notifications(self) -> None:
        """With EVENT_IDX, ask the driver to notify again as soon as it adds beyond what was taken."""
        if not self.event_idx:
            return
        used16, size = self._used16, self.size
        address = self.used + 4 + USED_ELEMENT.size * size  # avail_event, right after the used ring
        if used16 is not None:  # the view covers it (activate() checked the ring with avail_event in RAM)
            used16[2 + 4 * size] = self.next_avail
            self.memory.mark_written(address, 2)
        else:
            self.memory.write_u16(address, self.next_avail)  # tracked

    def take(self, limit: int) -> list[DescriptorChain]:
        """Pop up to `limit` available chains at once (the hot devices' batch). Only an empty list means the
        ring is empty: then the device has asked to be notified again and looked once more (as
        `available_chains` does), so nothing made available meanwhile waits for a notification that never
        comes. Devices take until they get an empty list: asking for notifications only then, after serving,
        spares a polling driver that queues while the device works the notification (an exit) for it."""
        chains: list[DescriptorChain] = []
        while True:
            for _ in range(min(self.pending(), limit)):
                chain = self.pop()
                if chain is None:
                    break
                chains.append(chain)
            if chains:
                return chains
            self.want_notifications()
            memory_fence()
            if not self.pending():
                return chains

    def take_direct(self, limit: int) -> list[tuple[int, int, memoryview, int]]:
        """The hot path of devices whose requests are one buffer (a frame, a datagram): `(head, address, buffer,
        flags)` of up to `limit` available chains that are one direct descriptor, `buffer` a memoryview of the
        guest memory at `address` (checked to lie in RAM; writes through it are the device's to `mark_written`).
        The queue keeps each item for its head until the descriptor changes or the queue is released, so a
        device must not keep one beyond the request: the mapping cannot go while views of it live. It stops,
        without popping it, before a chain of any other form (`take()` serves that one, and refuses it if it
        breaks a rule). A list shorter than `limit` means the ring holds nothing more now or such a chain is
        next: `take()` tells which, and asks for notifications if empty."""
        items: list[tuple[int, int, memoryview, int]] = []
        append = items.append
        rings, table = self._avail16, self._table
        if rings is None or table is None:
            return items
        size = self.size
        mask, starts, ends, views, unpack = size - 1, self._starts, self._ends, self._views, _unpack_descriptor
        position = self.next_avail
        known = self._direct
        for _ in range(min(self.pending(), limit)):
            head = rings[2 + (position & mask)]
            if head >= size:
                break
            descriptor = unpack(table, head << 4)
            entry = known[head]
            if entry is not None and entry[0] == descriptor:  # the same buffer as last time: checked already
                append(entry[1])
                position += 1
                continue
            address, length, flags, _ = descriptor
            if flags & _NOT_ALONE:
                break
            region = bisect_right(starts, address) - 1
            end = address + length
            if length and end > ends[region]:
                break
            start = starts[region]
            item = (head, address, views[region][address - start:end - start] if length else _NOTHING, flags)
            known[head] = (descriptor, item)
            append(item)
            position += 1
        self.next_avail = position & 0xFFFF
        return items

    def give_back(self, count: int) -> None:
        """Return the last `count` chains taken and not used: they are popped again next time, unchanged."""
        self.next_avail = (self.next_avail - count) & 0xFFFF

    def available_chains(self) -> Iterator[DescriptorChain]:
        """Every chain the driver makes available until it has to notify again.

        After the ring looks empty, the device asks for a notification and looks once more: a chain added
        between the last look and the request would otherwise wait for a notification the driver, seeing the
        old request, never sends.
        """
        while True:
            rings = self._avail16
            if rings is None:
                while (chain := self.pop()) is not None:
                    yield chain
            else:  # pop() inlined: one pass per batch the driver made available
                mask = self.size - 1
                while available := self.pending():
                    for _ in range(available):
                        head = rings[2 + (self.next_avail & mask)]
                        try:
                            chain = self._walk(head)
                        except GuestMemoryError as exc:  # only an indirect table's read can get here
                            raise QueueError(f"guest memory access failed: {exc}") from None
                        self.next_avail = (self.next_avail + 1) & 0xFFFF
                        yield chain  # the consumer may step next_avail back (a chain it could not serve yet)
            self.want_notifications()
            memory_fence()
            if not self.pending():
                return
