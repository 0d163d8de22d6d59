"""The coalesced MMIO/PIO ring: writes KVM buffered instead of exiting, read back in order."""

from __future__ import annotations

import ctypes
import struct
import threading
from dataclasses import dataclass

from pyrovisor.kvm import uapi

_HEADER = struct.Struct("<II")  # first (ours), last (KVM's)
_ENTRY = struct.Struct("<QII8s")  # phys_addr, len, pio, data
ENTRIES_OFFSET = ctypes.sizeof(uapi.kvm_coalesced_mmio_ring)
PAGE_SIZE = 4096
CAPACITY = (PAGE_SIZE - ENTRIES_OFFSET) // ctypes.sizeof(uapi.kvm_coalesced_mmio)


@dataclass(frozen=True, slots=True)
class CoalescedWrite:
    address: int
    data: bytes
    pio: bool


class CoalescedRing:
    """The VM-wide ring (mapped in every vCPU's run area). Any vCPU thread may drain it; a lock keeps order."""

    def __init__(self, page: memoryview) -> None:
        self._page = page
        self._first = page[:4].cast("I")  # ours: stored with one 4-byte write (KVM reads it concurrently)
        self._lock = threading.Lock()

    def drain(self) -> list[CoalescedWrite]:
        """Take every buffered write, oldest first, and hand the slots back to KVM."""
        with self._lock:
            first, last = _HEADER.unpack_from(self._page, 0)
            writes = []
            while first != last:
                address, length, pio, data = _ENTRY.unpack_from(self._page, ENTRIES_OFFSET + first * _ENTRY.size)
                writes.append(CoalescedWrite(address, data[:min(length, 8)], bool(pio)))
                first = (first + 1) % CAPACITY
            self._first[0] = first  # struct.pack_into would clear the field first: KVM could see 0 and overrun
            return writes

    def pending(self) -> bool:
        first, last = _HEADER.unpack_from(self._page, 0)
        return bool(first != last)

    def close(self) -> None:
        self._first.release()
        self._page.release()
