"""What a device is to the buses: reads and writes at an offset, and how it raises interrupts."""

from __future__ import annotations

from typing import Protocol


class BusDevice(Protocol):
    """A device mapped on the port or MMIO bus. Offsets are relative to the device's base.

    Reads return an integer of `size` bytes; a guest may access any offset with any size, so
    implementations must accept garbage without raising.
    """

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class InterruptLine(Protocol):
    """An interrupt output: the VM wires it to KVM_IRQ_LINE (or irqfd); tests wire it to a recorder."""

    def set_level(self, high: bool) -> None: ...


class NoInterrupt:
    """An unconnected interrupt output."""

    def set_level(self, high: bool) -> None:
        return None


def all_ones(size: int) -> int:
    """What a read from nothing returns on a PC bus: all bits set."""
    return (1 << (8 * size)) - 1
