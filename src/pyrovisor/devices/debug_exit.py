"""The debug-exit port: a guest writes its exit code there to stop the VM."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pyrovisor.devices.base import all_ones

DEBUG_EXIT_PORT = 0xF4
EXIT_CODE_MASK = 0xFF


@dataclass(frozen=True)
class DebugExitState:
    exit_code: int | None = None


class DebugExit:
    """Any write stops the VM with exit code `value & 0xff`; reads return all ones."""

    def __init__(self, on_exit: Callable[[int], None], state: DebugExitState | None = None) -> None:
        self._on_exit = on_exit
        self.exit_code = (state or DebugExitState()).exit_code

    def save(self) -> DebugExitState:
        return DebugExitState(self.exit_code)

    @classmethod
    def restore(cls, args: Callable[[int], None], state: DebugExitState) -> DebugExit:
        return cls(args, state)

    def read(self, offset: int, size: int) -> int:
        return all_ones(size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.exit_code = value & EXIT_CODE_MASK
        self._on_exit(self.exit_code)
