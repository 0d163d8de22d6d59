"""A 16550A UART as a pure state machine: registers in, bytes and an interrupt level out."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pyrovisor.devices.base import InterruptLine, NoInterrupt
from pyrovisor.errors import DeviceError

# Register offsets (DLAB selects the divisor latch at 0 and 1).
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7
REGISTER_COUNT = 8

IER_RX_DATA = 0x01
IER_THR_EMPTY = 0x02
IER_LINE_STATUS = 0x04
IER_MODEM_STATUS = 0x08
IER_MASK = 0x0F

IIR_NO_INTERRUPT = 0x01
IIR_MODEM_STATUS = 0x00
IIR_THR_EMPTY = 0x02
IIR_RX_DATA = 0x04
IIR_LINE_STATUS = 0x06
IIR_RX_TIMEOUT = 0x0C
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
FCR_TRIGGER_LEVELS = (1, 4, 8, 14)

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOPBACK = 0x10
MCR_MASK = 0x1F

LSR_DATA_READY = 0x01
LSR_OVERRUN = 0x02
LSR_THR_EMPTY = 0x20
LSR_TRANSMITTER_EMPTY = 0x40

MSR_DELTA_CTS = 0x01
MSR_DELTA_DSR = 0x02
MSR_TRAILING_RI = 0x04
MSR_DELTA_DCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_CONNECTED = MSR_DCD | MSR_DSR | MSR_CTS  # a terminal is always attached

DEFAULT_DIVISOR = 12  # 9600 baud from the 1.8432 MHz clock
DEFAULT_RX_CAPACITY = 64
HARDWARE_FIFO_SIZE = 16


@dataclass(frozen=True)
class SerialState:
    """Everything needed to recreate the UART exactly (snapshots, migration)."""

    interrupt_enable: int = 0
    line_control: int = 0x03  # 8N1
    modem_control: int = MCR_OUT2
    modem_status: int = MSR_CONNECTED
    scratch: int = 0
    divisor: int = DEFAULT_DIVISOR
    fifo_control: int = 0
    overrun: bool = False
    thr_interrupt_pending: bool = False
    rx_fifo: bytes = b""
    rx_capacity: int = DEFAULT_RX_CAPACITY


class Uart16550:
    """16550A-compatible UART, complete enough for Linux's 8250 driver.

    Transmission is instantaneous: a byte written to THR goes to `output` at once (or back into the
    receive FIFO in loopback mode) and THR is empty again. The receive FIFO is bounded; `receive()`
    accepts what fits and reports how much. The interrupt output follows the 16550 priority rules
    and, as on a PC, reaches the line only while MCR.OUT2 is set.
    """

    def __init__(self, output: Callable[[bytes], None], interrupt: InterruptLine | None = None,
                 state: SerialState | None = None) -> None:
        state = state or SerialState()
        if state.rx_capacity < 1 or len(state.rx_fifo) > state.rx_capacity:
            raise DeviceError("uart", "receive FIFO content exceeds its capacity")
        self._output = output
        self._interrupt: InterruptLine = interrupt or NoInterrupt()
        self._ier = state.interrupt_enable & IER_MASK
        self._lcr = state.line_control & 0xFF
        self._mcr = state.modem_control & MCR_MASK
        self._msr = state.modem_status & 0xFF
        self._scr = state.scratch & 0xFF
        self._divisor = state.divisor & 0xFFFF
        self._fcr = state.fifo_control & 0xC1
        self._overrun = state.overrun
        self._thr_pending = state.thr_interrupt_pending
        self._rx: deque[int] = deque(state.rx_fifo)
        self._rx_capacity = state.rx_capacity
        self._line_high = False
        self._update_interrupt()

    # --- snapshot -------------------------------------------------------------------------------
    def state(self) -> SerialState:
        return SerialState(
            interrupt_enable=self._ier,
            line_control=self._lcr,
            modem_control=self._mcr,
            modem_status=self._msr,
            scratch=self._scr,
            divisor=self._divisor,
            fifo_control=self._fcr,
            overrun=self._overrun,
            thr_interrupt_pending=self._thr_pending,
            rx_fifo=bytes(self._rx),
            rx_capacity=self._rx_capacity,
        )

    @classmethod
    def from_state(cls, state: SerialState, output: Callable[[bytes], None],
                   interrupt: InterruptLine | None = None) -> Uart16550:
        return cls(output, interrupt, state)

    # --- host side ------------------------------------------------------------------------------
    @property
    def rx_free(self) -> int:
        return self._rx_capacity - len(self._rx)

    @property
    def interrupt_level(self) -> bool:
        return self._line_high

    def receive(self, data: bytes) -> int:
        """Queue bytes from the host (keyboard) for the guest; returns how many fitted."""
        accepted = min(len(data), self.rx_free)
        self._rx.extend(data[:accepted])
        if accepted:
            self._update_interrupt()
        return accepted

    # --- guest side -----------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        value = self._read_register(offset) if 0 <= offset < REGISTER_COUNT else 0xFF
        return value if size == 1 else value | _replicate_high(size)

    def write(self, offset: int, size: int, value: int) -> None:
        if 0 <= offset < REGISTER_COUNT:
            self._write_register(offset, value & 0xFF)

    def _read_register(self, offset: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                return self._divisor & 0xFF
            value = self._rx.popleft() if self._rx else 0
            self._update_interrupt()
            return value
        if offset == IER_DLM:
            return (self._divisor >> 8) if dlab else self._ier
        if offset == IIR_FCR:
            identification = self._pending_interrupt()
            if identification == IIR_THR_EMPTY:
                self._thr_pending = False
                self._update_interrupt()
            fifo_bits = IIR_FIFO_ENABLED if self._fcr & FCR_ENABLE else 0
            return identification | fifo_bits
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            value = LSR_THR_EMPTY | LSR_TRANSMITTER_EMPTY
            if self._rx:
                value |= LSR_DATA_READY
            if self._overrun:
                value |= LSR_OVERRUN
                self._overrun = False
                self._update_interrupt()
            return value
        if offset == MSR:
            value = self._msr
            self._msr &= 0xF0
            if value & 0x0F:
                self._update_interrupt()
            return value
        return self._scr

    def _write_register(self, offset: int, value: int) -> None:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                self._divisor = (self._divisor & 0xFF00) | value
            else:
                self._transmit(value)
        elif offset == IER_DLM:
            if dlab:
                self._divisor = (self._divisor & 0x00FF) | (value << 8)
            else:
                enabling_thr = value & IER_THR_EMPTY and not self._ier & IER_THR_EMPTY
                self._ier = value & IER_MASK
                if enabling_thr:
                    self._thr_pending = True  # THR is always empty: announce it at once
                self._update_interrupt()
        elif offset == IIR_FCR:
            if value & FCR_CLEAR_RX:
                self._rx.clear()
            self._fcr = value & 0xC1
            self._update_interrupt()
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            self._set_modem_control(value & MCR_MASK)
        elif offset == SCR:
            self._scr = value
        # LSR and MSR are read-only; writes to them are ignored like on the real chip.

    def _transmit(self, byte: int) -> None:
        if self._mcr & MCR_LOOPBACK:
            if len(self._rx) < min(self._rx_capacity, HARDWARE_FIFO_SIZE):
                self._rx.append(byte)
            else:
                self._overrun = True
        else:
            self._output(bytes((byte,)))
        self._thr_pending = True
        self._update_interrupt()

    def _set_modem_control(self, value: int) -> None:
        self._mcr = value
        if value & MCR_LOOPBACK:
            lines = 0
            if value & MCR_RTS:
                lines |= MSR_CTS
            if value & MCR_DTR:
                lines |= MSR_DSR
            if value & MCR_OUT1:
                lines |= MSR_RI
            if value & MCR_OUT2:
                lines |= MSR_DCD
        else:
            lines = MSR_CONNECTED
        self._set_modem_lines(lines)
        self._update_interrupt()

    def _set_modem_lines(self, lines: int) -> None:
        old = self._msr
        deltas = old & 0x0F
        changed = (old ^ lines) & 0xF0
        if changed & MSR_CTS:
            deltas |= MSR_DELTA_CTS
        if changed & MSR_DSR:
            deltas |= MSR_DELTA_DSR
        if changed & MSR_DCD:
            deltas |= MSR_DELTA_DCD
        if old & MSR_RI and not lines & MSR_RI:
            deltas |= MSR_TRAILING_RI
        self._msr = lines | deltas

    # --- interrupts -----------------------------------------------------------------------------
    def _trigger_level(self) -> int:
        return FCR_TRIGGER_LEVELS[self._fcr >> 6] if self._fcr & FCR_ENABLE else 1

    def _pending_interrupt(self) -> int:
        if self._ier & IER_LINE_STATUS and self._overrun:
            return IIR_LINE_STATUS
        if self._ier & IER_RX_DATA and self._rx:
            if len(self._rx) >= self._trigger_level():
                return IIR_RX_DATA
            return IIR_RX_TIMEOUT
        if self._ier & IER_THR_EMPTY and self._thr_pending:
            return IIR_THR_EMPTY
        if self._ier & IER_MODEM_STATUS and self._msr & 0x0F:
            return IIR_MODEM_STATUS
        return IIR_NO_INTERRUPT

    def _update_interrupt(self) -> None:
        high = self._pending_interrupt() != IIR_NO_INTERRUPT and bool(self._mcr & MCR_OUT2)
        if high != self._line_high:
            self._line_high = high
            self._interrupt.set_level(high)


def _replicate_high(size: int) -> int:
    """Bits above the first byte for a wide read of an 8-bit register: the bus floats them high."""
    return ((1 << (8 * size)) - 1) & ~0xFF
