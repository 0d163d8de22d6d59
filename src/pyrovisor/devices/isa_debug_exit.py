"""QEMU's isa-debug-exit: a write of v stops the VM with exit code (v << 1) | 1, as QEMU's own process does."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pyrovisor.devices.base import all_ones

ISA_DEBUG_EXIT_PORT = 0xF4  # where QEMU users put it (-device isa-debug-exit,iobase=0xf4,iosize=4)
ISA_DEBUG_EXIT_PORTS = 4
EXIT_STATUS_MASK = 0xFF  # a process exit status has 8 bits, so QEMU's (v << 1) | 1 is seen modulo 256


@dataclass(frozen=True)
class IsaDebugExitState:
    exit_code: int | None = None


def qemu_exit_code(value: int) -> int:
    """The exit status QEMU's process ends with when the guest writes `value`: always odd, so it never
    looks like success."""
    return ((value << 1) | 1) & EXIT_STATUS_MASK


class IsaDebugExit:
    """Any write stops the VM with QEMU's exit code for the value; reads return all ones."""

    def __init__(self, on_exit: Callable[[int], None], state: IsaDebugExitState | None = None) -> None:
        self._on_exit = on_exit
        self.exit_code = (state or IsaDebugExitState()).exit_code

    def save(self) -> IsaDebugExitState:
        return IsaDebugExitState(self.exit_code)

    @classmethod
    def restore(cls, args: Callable[[int], None], state: IsaDebugExitState) -> IsaDebugExit:
        return cls(args, state)

    def read(self, offset: int, size: int) -> int:
        return all_ones(size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.exit_code = qemu_exit_code(value)
        self._on_exit(self.exit_code)
