"""The 16550A UART model: registers, FIFOs, interrupts, the probes Linux's 8250 driver makes, state."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pyrovisor.devices import serial as s
from pyrovisor.devices.serial import SerialState, Uart16550


class Recorder:
    def __init__(self) -> None:
        self.levels: list[bool] = []
        self.output = bytearray()

    def set_level(self, high: bool) -> None:
        self.levels.append(high)

    def sink(self, data: bytes) -> None:
        self.output += data


def make() -> tuple[Uart16550, Recorder]:
    recorder = Recorder()
    return Uart16550(recorder.sink, recorder), recorder


def test_transmit_goes_to_output_and_thr_stays_empty() -> None:
    uart, recorder = make()
    for byte in b"hi\n":
        uart.write(s.RBR_THR_DLL, 1, byte)
    assert bytes(recorder.output) == b"hi\n"
    assert uart.read(s.LSR, 1) & (s.LSR_THR_EMPTY | s.LSR_TRANSMITTER_EMPTY) == 0x60


def test_divisor_latch_is_separate_from_data_registers() -> None:
    uart, recorder = make()
    uart.write(s.LCR, 1, 0x83)  # DLAB + 8N1
    uart.write(s.RBR_THR_DLL, 1, 0x01)
    uart.write(s.IER_DLM, 1, 0x00)
    assert (uart.read(s.RBR_THR_DLL, 1), uart.read(s.IER_DLM, 1)) == (1, 0)
    uart.write(s.LCR, 1, 0x03)
    assert uart.read(s.IER_DLM, 1) == 0 and recorder.output == b""
    assert uart.state().divisor == 1


def test_scratch_and_loopback_probes_of_the_8250_driver() -> None:
    uart, _ = make()
    for pattern in (0xA5, 0x5A):
        uart.write(s.SCR, 1, pattern)
        assert uart.read(s.SCR, 1) == pattern
    uart.write(s.MCR, 1, s.MCR_LOOPBACK | 0x0A)  # loop + OUT2 + RTS, as autoconfig does
    assert uart.read(s.MSR, 1) & 0xF0 == 0x90
    uart.write(s.RBR_THR_DLL, 1, 0x42)
    assert uart.read(s.LSR, 1) & s.LSR_DATA_READY
    assert uart.read(s.RBR_THR_DLL, 1) == 0x42


def test_fifo_control_shows_in_iir() -> None:
    uart, _ = make()
    assert uart.read(s.IIR_FCR, 1) == s.IIR_NO_INTERRUPT
    uart.write(s.IIR_FCR, 1, s.FCR_ENABLE | s.FCR_CLEAR_RX | s.FCR_CLEAR_TX | 0xC0)
    assert uart.read(s.IIR_FCR, 1) == s.IIR_FIFO_ENABLED | s.IIR_NO_INTERRUPT


def test_receive_interrupt_follows_data_and_out2() -> None:
    uart, recorder = make()
    uart.write(s.IER_DLM, 1, s.IER_RX_DATA)
    assert uart.receive(b"ab") == 2
    assert recorder.levels == [True]
    assert uart.read(s.IIR_FCR, 1) == s.IIR_RX_DATA
    assert uart.read(s.RBR_THR_DLL, 1) == ord("a")
    assert uart.read(s.RBR_THR_DLL, 1) == ord("b")
    assert recorder.levels == [True, False]
    uart.write(s.MCR, 1, 0)  # OUT2 low: the line stays low even with data
    uart.receive(b"c")
    assert recorder.levels == [True, False]


def test_fifo_trigger_level_reports_timeout_below_it() -> None:
    uart, _ = make()
    uart.write(s.IIR_FCR, 1, s.FCR_ENABLE | 0x80)  # trigger at 8 bytes
    uart.write(s.IER_DLM, 1, s.IER_RX_DATA)
    uart.receive(b"abc")
    assert uart.read(s.IIR_FCR, 1) & 0x0F == s.IIR_RX_TIMEOUT
    uart.receive(b"defgh")
    assert uart.read(s.IIR_FCR, 1) & 0x0F == s.IIR_RX_DATA


def test_thr_empty_interrupt_raised_on_enable_and_cleared_by_iir_read() -> None:
    uart, recorder = make()
    uart.write(s.IER_DLM, 1, s.IER_THR_EMPTY)
    assert recorder.levels == [True]
    assert uart.read(s.IIR_FCR, 1) == s.IIR_THR_EMPTY
    assert recorder.levels == [True, False]
    assert uart.read(s.IIR_FCR, 1) == s.IIR_NO_INTERRUPT
    uart.write(s.RBR_THR_DLL, 1, 0x41)  # transmitting makes THR empty again: interrupt
    assert recorder.levels == [True, False, True]


def test_bounded_fifo_and_overrun_in_loopback() -> None:
    uart, _ = make()
    assert uart.receive(bytes(100)) == s.DEFAULT_RX_CAPACITY
    assert uart.rx_free == 0
    fresh, _ = make()
    fresh.write(s.MCR, 1, s.MCR_LOOPBACK)
    for byte in range(s.HARDWARE_FIFO_SIZE + 1):
        fresh.write(s.RBR_THR_DLL, 1, byte)
    fresh.write(s.IER_DLM, 1, s.IER_LINE_STATUS)
    assert fresh.read(s.LSR, 1) & s.LSR_OVERRUN
    assert not fresh.read(s.LSR, 1) & s.LSR_OVERRUN, "reading LSR clears the overrun"


def test_state_round_trip_preserves_behaviour() -> None:
    uart, _ = make()
    uart.write(s.LCR, 1, 0x83)
    uart.write(s.RBR_THR_DLL, 1, 3)
    uart.write(s.LCR, 1, 0x03)
    uart.write(s.IER_DLM, 1, s.IER_RX_DATA)
    uart.write(s.SCR, 1, 0x77)
    uart.receive(b"xyz")
    state = uart.state()
    recorder = Recorder()
    clone = Uart16550.from_state(state, recorder.sink, recorder)
    assert clone.state() == state
    assert recorder.levels == [True], "a restored pending interrupt is raised again"
    assert bytes(clone.read(s.RBR_THR_DLL, 1) for _ in range(3)) == b"xyz"


def test_wide_reads_float_high_bits() -> None:
    uart, _ = make()
    assert uart.read(s.LSR, 2) == 0xFF00 | 0x60
    assert uart.read(9, 1) == 0xFF


@given(st.lists(st.tuples(st.booleans(), st.integers(-4, 12), st.sampled_from([1, 2, 4]), st.integers(0, 2**32 - 1)),
                max_size=200))
def test_garbage_from_the_guest_never_raises(accesses: list[tuple[bool, int, int, int]]) -> None:
    uart, _ = make()
    for is_write, offset, size, value in accesses:
        if is_write:
            uart.write(offset, size, value)
        else:
            assert 0 <= uart.read(offset, size) < 1 << (8 * size)
    state = uart.state()
    assert isinstance(state, SerialState) and len(state.rx_fifo) <= state.rx_capacity
