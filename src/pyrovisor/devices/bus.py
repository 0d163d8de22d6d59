"""Port and MMIO buses: map address ranges to devices and dispatch accesses to them."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from pyrovisor.devices.base import BusDevice, all_ones
from pyrovisor.errors import DeviceError


@dataclass(frozen=True)
class Mapping:
    base: int
    length: int
    device: BusDevice
    name: str

    @property
    def end(self) -> int:
        return self.base + self.length


@dataclass
class BusStats:
    unhandled_reads: int = 0
    unhandled_writes: int = 0
    last_unhandled: int | None = field(default=None)


class Bus:
    """Ranges [base, base+length) of an address space, each owned by one device.

    An access that no device claims reads as all ones and is otherwise ignored, as on real hardware;
    it is counted in `stats` so a misbehaving guest is visible without disturbing the host.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._mappings: list[Mapping] = []
        self._starts: list[int] = []
        self.stats = BusStats()

    def insert(self, base: int, length: int, device: BusDevice, name: str) -> None:
        if length <= 0 or base < 0:
            raise DeviceError(name, f"invalid {self.name} range {base:#x}+{length:#x}")
        new = Mapping(base, length, device, name)
        index = bisect.bisect_left(self._starts, base)
        for neighbour in self._mappings[max(0, index - 1):index + 1]:
            if neighbour.base < new.end and new.base < neighbour.end:
                raise DeviceError(name, f"{self.name} range {base:#x}+{length:#x} overlaps {neighbour.name}")
        self._mappings.insert(index, new)
        self._starts.insert(index, base)

    def remove(self, base: int) -> None:
        index = bisect.bisect_left(self._starts, base)
        if index == len(self._starts) or self._starts[index] != base:
            raise DeviceError(self.name, f"nothing mapped at {base:#x}")
        del self._mappings[index]
        del self._starts[index]

    def lookup(self, address: int) -> Mapping | None:
        index = bisect.bisect_right(self._starts, address) - 1
        if index >= 0:
            mapping = self._mappings[index]
            if address < mapping.end:
                return mapping
        return None

    @property
    def mappings(self) -> tuple[Mapping, ...]:
        return tuple(self._mappings)

    def read(self, address: int, size: int) -> int:
        mapping = self.lookup(address)
        if mapping is None:
            self.stats.unhandled_reads += 1
            self.stats.last_unhandled = address
            return all_ones(size)
        return mapping.device.read(address - mapping.base, size)

    def write(self, address: int, size: int, value: int) -> None:
        mapping = self.lookup(address)
        if mapping is None:
            self.stats.unhandled_writes += 1
            self.stats.last_unhandled = address
            return
        mapping.device.write(address - mapping.base, size, value)


class PortBus(Bus):
    """The 64 KiB x86 I/O port space, with a per-port cache in front of the range search."""

    def __init__(self) -> None:
        super().__init__("port I/O")
        self._cache: dict[int, tuple[BusDevice, int]] = {}

    def insert(self, base: int, length: int, device: BusDevice, name: str) -> None:
        if base + length > 0x10000:
            raise DeviceError(name, f"port range {base:#x}+{length:#x} exceeds the 64 KiB port space")
        super().insert(base, length, device, name)
        self._cache.clear()

    def remove(self, base: int) -> None:
        super().remove(base)
        self._cache.clear()

    def read(self, address: int, size: int) -> int:
        hit = self._cache.get(address)
        if hit is None:
            mapping = self.lookup(address)
            if mapping is None:
                return super().read(address, size)
            hit = self._cache[address] = (mapping.device, mapping.base)
        return hit[0].read(address - hit[1], size)

    def write(self, address: int, size: int, value: int) -> None:
        hit = self._cache.get(address)
        if hit is None:
            mapping = self.lookup(address)
            if mapping is None:
                super().write(address, size, value)
                return
            hit = self._cache[address] = (mapping.device, mapping.base)
        hit[0].write(address - hit[1], size, value)
