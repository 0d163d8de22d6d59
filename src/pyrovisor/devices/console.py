"""SerialConsole: the UART as the VMM runs it, serialised with a lock and fed from a host input queue."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from pyrovisor.devices.base import InterruptLine
from pyrovisor.devices.serial import RBR_THR_DLL, SerialState, Uart16550

COM1_PORT = 0x3F8
COM1_IRQ = 4
PORT_COUNT = 8
MAX_PENDING_INPUT = 1 << 20


@dataclass(frozen=True)
class SerialConsoleArgs:
    """What a SerialConsole needs besides its state: where output goes and the interrupt it drives."""

    output: Callable[[bytes], None]
    interrupt: InterruptLine | None = None


class SerialConsole:
    """Maps the pure UART onto the port bus for vCPU threads and an input thread at once.

    Host input that does not fit the UART's receive FIFO waits in a queue (bounded; beyond it input
    is dropped and counted) and moves into the FIFO as the guest reads.
    """

    def __init__(self, output: Callable[[bytes], None], interrupt: InterruptLine | None = None,
                 state: SerialState | None = None) -> None:
        self.uart = Uart16550(output, interrupt, state)
        self._lock = threading.Lock()
        self._pending = bytearray()
        self.dropped_input = 0

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            value = self.uart.read(offset, size)
            if offset == RBR_THR_DLL and self._pending:
                self._drain_pending()
            return value

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            self.uart.write(offset, size, value)

    def feed(self, data: bytes) -> None:
        """Queue keyboard input for the guest."""
        with self._lock:
            room = MAX_PENDING_INPUT - len(self._pending)
            if len(data) > room:
                self.dropped_input += len(data) - room
                data = data[:room]
            self._pending += data
            self._drain_pending()

    def save(self) -> SerialState:
        with self._lock:
            return self.uart.state()

    @classmethod
    def restore(cls, args: SerialConsoleArgs, state: SerialState) -> SerialConsole:
        return cls(args.output, args.interrupt, state)

    def _drain_pending(self) -> None:
        accepted = self.uart.receive(bytes(self._pending))
        del self._pending[:accepted]
