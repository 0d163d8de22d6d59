"""Port and MMIO buses: mapping, overlap refusal, dispatch, unclaimed accesses."""

from __future__ import annotations

import pytest

from pyrovisor.devices.bus import Bus, PortBus
from pyrovisor.devices.debug_exit import DebugExit
from pyrovisor.errors import DeviceError


class Register:
    def __init__(self) -> None:
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        return 0x10 + offset

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


@pytest.mark.parametrize("bus", [PortBus(), Bus("MMIO")])
def test_dispatch_uses_offsets_within_the_device(bus: Bus) -> None:
    device = Register()
    bus.insert(0x3F8, 8, device, "uart")
    bus.write(0x3FB, 1, 0x83)
    assert device.writes == [(3, 1, 0x83)]
    assert bus.read(0x3FD, 1) == 0x15


def test_overlaps_are_refused_and_removal_frees_the_range() -> None:
    bus = PortBus()
    bus.insert(0x100, 0x10, Register(), "a")
    for base, length in ((0x10F, 1), (0xF0, 0x11), (0x104, 2), (0x0, 0x1000)):
        with pytest.raises(DeviceError, match="overlaps a"):
            bus.insert(base, length, Register(), "b")
    bus.insert(0x110, 1, Register(), "adjacent")
    bus.remove(0x100)
    bus.insert(0x104, 2, Register(), "b")
    with pytest.raises(DeviceError):
        bus.remove(0x100)
    with pytest.raises(DeviceError):
        bus.insert(0xFFFF, 2, Register(), "too far")


def test_unclaimed_accesses_read_all_ones_and_are_counted() -> None:
    bus = PortBus()
    assert bus.read(0x80, 1) == 0xFF
    assert bus.read(0x80, 4) == 0xFFFFFFFF
    bus.write(0x81, 2, 7)
    assert (bus.stats.unhandled_reads, bus.stats.unhandled_writes, bus.stats.last_unhandled) == (2, 1, 0x81)


def test_port_cache_is_invalidated_when_the_map_changes() -> None:
    bus = PortBus()
    first, second = Register(), Register()
    bus.insert(0x60, 1, first, "first")
    bus.write(0x60, 1, 1)
    bus.remove(0x60)
    bus.insert(0x60, 1, second, "second")
    bus.write(0x60, 1, 2)
    assert first.writes == [(0, 1, 1)] and second.writes == [(0, 1, 2)]


def test_debug_exit_reports_the_low_byte() -> None:
    codes: list[int] = []
    device = DebugExit(codes.append)
    device.write(0, 4, 0x1234_5601)
    assert codes == [1] and device.save().exit_code == 1
    assert device.read(0, 2) == 0xFFFF
