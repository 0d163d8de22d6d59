"""A minimal virtio driver in Python for tests: sets up split queues in guest memory, the way a guest would."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pyrovisor.devices.virtio.queue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DESCRIPTOR
from pyrovisor.memory import GuestMemory

MiB = 1 << 20


@dataclass
class DriverQueue:
    """The driver's side of one split queue laid out at `base` in guest memory."""

    memory: GuestMemory
    base: int
    size: int
    next_free: int = 0
    avail_index: int = 0
    used_seen: int = 0
    heads: list[int] = field(default_factory=list)

    @property
    def desc(self) -> int:
        return self.base

    @property
    def avail(self) -> int:
        return self.base + 16 * self.size

    @property
    def used(self) -> int:
        return (self.avail + 6 + 2 * self.size + 3) // 4 * 4

    def write_descriptor(self, table: int, index: int, address: int, length: int, flags: int, following: int) -> None:
        self.memory.write(table + 16 * index, DESCRIPTOR.pack(address, length, flags, following))

    def add_chain(self, readable: list[tuple[int, int]], writable: list[tuple[int, int]],
                  indirect_at: int | None = None) -> int:
        """Put a chain in the table (or an indirect table at `indirect_at`) and make it available."""
        buffers = [(a, n, 0) for a, n in readable] + [(a, n, DESC_F_WRITE) for a, n in writable]
        head = self.next_free
        if indirect_at is None:
            for offset, (address, length, flags) in enumerate(buffers):
                index = (head + offset) % self.size
                last = offset == len(buffers) - 1
                self.write_descriptor(self.desc, index, address, length, flags | (0 if last else DESC_F_NEXT),
                                      (index + 1) % self.size)
            self.next_free = (head + len(buffers)) % self.size
        else:
            for offset, (address, length, flags) in enumerate(buffers):
                last = offset == len(buffers) - 1
                self.write_descriptor(indirect_at, offset, address, length, flags | (0 if last else DESC_F_NEXT),
                                      offset + 1)
            self.write_descriptor(self.desc, head, indirect_at, 16 * len(buffers), DESC_F_INDIRECT, 0)
            self.next_free = (head + 1) % self.size
        self.memory.write_u16(self.avail + 4 + 2 * (self.avail_index % self.size), head)
        self.avail_index = (self.avail_index + 1) & 0xFFFF
        self.memory.write_u16(self.avail + 2, self.avail_index)
        return head

    def used_entries(self) -> list[tuple[int, int]]:
        """(head, written) of the chains the device finished since the last call."""
        index = self.memory.read_u16(self.used + 2)
        entries = []
        while self.used_seen != index:
            slot = self.used + 4 + 8 * (self.used_seen % self.size)
            entries.append(struct.unpack("<II", self.memory.read(slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return entries
