"""Buffers for KVM structs that end in a flexible array (kvm_msrs, kvm_cpuid2, kvm_msr_list)."""

from __future__ import annotations

import ctypes
from typing import Any, Generic, TypeVar

H = TypeVar("H", bound=ctypes.Structure)


class FlexibleBuffer(Generic[H]):
    """A header struct followed by `capacity` entries, in one ctypes buffer KVM can read and write."""

    def __init__(self, header: type[H], entry: type[Any], capacity: int) -> None:
        self.capacity = capacity
        self._storage = ctypes.create_string_buffer(ctypes.sizeof(header) + ctypes.sizeof(entry) * capacity)
        self.header: H = header.from_buffer(self._storage)
        self.entries: ctypes.Array[Any] = (entry * capacity).from_buffer(self._storage, ctypes.sizeof(header))

    @property
    def address(self) -> int:
        return ctypes.addressof(self._storage)
