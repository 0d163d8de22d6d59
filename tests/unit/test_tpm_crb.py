"""The TPM CRB interface: the locality and command handshake, commands through a fake and a real swtpm,
malformed commands, a failing TPM, hostile accesses, snapshots mid-sequence and the event-log window."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyrovisor.devices.tpm_crb import (
    CMD_HADDR,
    CMD_LADDR,
    CMD_SIZE,
    CTRL_CANCEL,
    CTRL_REQ,
    CTRL_START,
    CTRL_STS,
    CTRL_STS_ERROR,
    CTRL_STS_IDLE,
    DATA_BUFFER_OFFSET,
    DATA_BUFFER_SIZE,
    INT_ENABLE,
    INT_STS,
    INTERFACE_ID,
    INTF_ID,
    LOC_CTRL,
    LOC_STATE,
    LOC_STS,
    LOG_DATA_OFFSET,
    LOG_MAX,
    LOG_WINDOW_OFFSET,
    RSP_ADDR,
    RSP_SIZE,
    TPM_CRB_BASE,
    TPM_RC_COMMAND_SIZE,
    TPM_RC_FAILURE,
    TPM_WINDOW_SIZE,
    TpmCrb,
    TpmCrbState,
)
from pyrovisor.errors import DeviceError, TpmError
from pyrovisor.persist.codec import decode, encode

HEADER = struct.Struct(">HII")
TPM2_STARTUP = 0x144
TPM2_GET_RANDOM = 0x17B
TPM_SU_CLEAR = 0


def command(code: int, body: bytes = b"", tag: int = 0x8001) -> bytes:
    return HEADER.pack(tag, HEADER.size + len(body), code) + body


class Driver:
    """What a guest driver does, through read/write calls (the C driver in guests/programs/ulib/tpm.c)."""

    def __init__(self, device: TpmCrb) -> None:
        self.device = device
        self.accesses = 0

    def read(self, offset: int, size: int = 4) -> int:
        self.accesses += 1
        return self.device.read(offset, size)

    def write(self, offset: int, value: int, size: int = 4) -> None:
        self.accesses += 1
        self.device.write(offset, size, value)

    def open(self) -> None:
        self.write(LOC_CTRL, 1)  # requestAccess
        assert self.read(LOC_STS) & 1, "locality 0 granted"
        self.write(CTRL_REQ, 1)  # cmdReady
        assert not self.read(CTRL_STS) & CTRL_STS_IDLE

    def put(self, data: bytes) -> None:
        padded = data.ljust(-(-len(data) // 8) * 8, b"\0")
        for index in range(0, len(padded), 8):
            self.write(DATA_BUFFER_OFFSET + index, int.from_bytes(padded[index:index + 8], "little"), 8)

    def get(self) -> bytes:
        head = self.read(DATA_BUFFER_OFFSET, 8).to_bytes(8, "little")
        size = min(max(struct.unpack_from(">I", head, 2)[0], 8), DATA_BUFFER_SIZE)
        data = bytearray(head)
        for index in range(8, size, 8):
            data += self.read(DATA_BUFFER_OFFSET + index, 8).to_bytes(8, "little")
        return bytes(data[:size])

    def execute(self, data: bytes) -> bytes:
        self.put(data)
        self.write(CTRL_START, 1)
        assert self.read(CTRL_START) == 0, "the command completed within the START write"
        return self.get()


class Recorder:
    """A fake TPM that records commands and answers with a fixed response."""

    def __init__(self, response: bytes) -> None:
        self.response = response
        self.commands: list[bytes] = []

    def __call__(self, data: bytes) -> bytes:
        self.commands.append(data)
        return self.response


def rc(response: bytes) -> int:
    return int(HEADER.unpack_from(response)[2])


def test_the_registers_describe_a_crb_interface_at_qemus_address() -> None:
    device = TpmCrb(Recorder(b""))
    assert TPM_CRB_BASE == 0xFED40000 and TPM_WINDOW_SIZE == 0x20000
    interface = device.read(INTF_ID, 8)
    assert interface == INTERFACE_ID
    assert interface & 0xF == 1 and (interface >> 4) & 0xF == 1, "InterfaceType and InterfaceVersion: CRB"
    assert not interface & (1 << 8) and not interface & (1 << 13) and interface & (1 << 14), "locality 0, no FIFO"
    assert (interface >> 17) & 3 == 1, "InterfaceSelector: CRB"
    assert device.read(INTF_ID, 4) == interface & 0xFFFFFFFF and device.read(INTF_ID + 4, 4) == interface >> 32
    assert device.read(INTF_ID + 1, 2) == (interface >> 8) & 0xFFFF, "narrow reads take the register's bytes"
    assert device.read(LOC_STATE, 4) == 0x80, "tpmRegValidSts, no locality assigned"
    assert device.read(CTRL_STS, 4) == CTRL_STS_IDLE
    buffer = TPM_CRB_BASE + DATA_BUFFER_OFFSET
    assert device.read(CMD_SIZE, 4) == device.read(RSP_SIZE, 4) == DATA_BUFFER_SIZE == 3968
    assert device.read(CMD_LADDR, 4) == buffer and device.read(CMD_HADDR, 4) == 0 and device.read(RSP_ADDR, 8) == buffer
    assert device.read(INT_ENABLE, 4) == device.read(INT_STS, 4) == 0
    device.write(INT_ENABLE, 4, 0xFFFFFFFF)
    device.write(INTF_ID, 8, 0)
    assert device.read(INT_ENABLE, 4) == 0 and device.read(INTF_ID, 8) == INTERFACE_ID, "read-only"
    assert device.read(0x1000, 4) == 0xFFFFFFFF and device.read(0xFFF8, 8) == (1 << 64) - 1, "nothing there"


def test_the_full_handshake_runs_a_command_and_returns_its_response() -> None:
    response = command(0, b"\x00\x04abcd")
    fake = Recorder(response)
    device = TpmCrb(fake)
    driver = Driver(device)
    driver.open()
    assert device.read(LOC_STATE, 4) == 0x82 and device.read(LOC_STS, 4) == 1
    sent = command(TPM2_GET_RANDOM, b"\x00\x04")
    assert driver.execute(sent) == response
    assert fake.commands == [sent], "exactly the header's size went to the TPM"
    assert device.commands == 1 and device.errors == 0 and device.read(CTRL_STS, 4) == 0
    assert device.read(DATA_BUFFER_OFFSET + len(response), 8) == 0, "the rest of the buffer is cleared"
    driver.write(CTRL_REQ, 2)  # goIdle
    assert device.read(CTRL_STS, 4) == CTRL_STS_IDLE
    driver.write(LOC_CTRL, 2)  # relinquish
    assert device.read(LOC_STATE, 4) == 0x80 and device.read(LOC_STS, 4) == 0


def test_start_needs_the_locality_and_a_ready_tpm() -> None:
    fake = Recorder(command(0))
    device = TpmCrb(fake)
    driver = Driver(device)
    driver.put(command(TPM2_GET_RANDOM, b"\x00\x04"))
    driver.write(CTRL_REQ, 1)
    driver.write(CTRL_START, 1)
    assert device.read(CTRL_STS, 4) == CTRL_STS_IDLE and not fake.commands, "no locality: control writes ignored"
    driver.write(LOC_CTRL, 1)
    driver.write(CTRL_START, 1)
    assert not fake.commands, "idle: START ignored"
    driver.write(CTRL_REQ, 1)
    device.write(CTRL_START, 1, 1)  # a one-byte write of the START bit works too
    assert len(fake.commands) == 1
    device.write(CTRL_START + 1, 1, 1)  # bit 8 is not START
    assert len(fake.commands) == 1
    driver.write(CTRL_CANCEL, 1)
    assert device.read(CTRL_CANCEL, 4) == 1
    driver.write(CTRL_CANCEL, 0)
    assert device.read(CTRL_CANCEL, 4) == 0


@pytest.mark.parametrize("size", [0, 9, DATA_BUFFER_SIZE + 1, 0xFFFFFFFF])
def test_a_bad_command_size_gets_a_tpm_error_response(size: int) -> None:
    fake = Recorder(command(0))
    device = TpmCrb(fake)
    driver = Driver(device)
    driver.open()
    driver.put(HEADER.pack(0x8001, size, TPM2_GET_RANDOM))
    driver.write(CTRL_START, 1)
    assert rc(driver.get()) == TPM_RC_COMMAND_SIZE
    assert not fake.commands and device.malformed == 1 and device.commands == 0


def test_the_largest_command_fits_the_buffer() -> None:
    fake = Recorder(command(0))
    driver = Driver(TpmCrb(fake))
    driver.open()
    big = command(0x1234, bytes(range(256)) * 15 + bytes(DATA_BUFFER_SIZE - 10 - 256 * 15))
    assert len(big) == DATA_BUFFER_SIZE
    assert rc(driver.execute(big)) == 0 and fake.commands == [big]


def test_a_failing_tpm_sets_the_error_bit_and_answers_tpm_rc_failure(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    def dead(data: bytes) -> bytes:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise TpmError("transmit", "swtpm is not running")
        return command(0)

    device = TpmCrb(dead)
    driver = Driver(device)
    driver.open()
    assert rc(driver.execute(command(TPM2_GET_RANDOM, b"\x00\x04"))) == TPM_RC_FAILURE
    assert device.read(CTRL_STS, 4) & CTRL_STS_ERROR and device.errors == 1
    assert "swtpm is not running" in caplog.text
    assert rc(driver.execute(command(TPM2_GET_RANDOM, b"\x00\x04"))) == TPM_RC_FAILURE
    assert rc(driver.execute(command(TPM2_GET_RANDOM, b"\x00\x04"))) == 0
    assert not device.read(CTRL_STS, 4) & CTRL_STS_ERROR, "the error bit describes the last command"
    assert (device.commands, device.errors) == (3, 2)


@pytest.mark.parametrize("response", [b"", b"\x80\x01", b"\x80\x01" + bytes(DATA_BUFFER_SIZE)],
                         ids=["empty", "short", "too-long"])
def test_responses_that_do_not_fit_are_refused(response: bytes) -> None:
    device = TpmCrb(Recorder(response))
    driver = Driver(device)
    driver.open()
    assert rc(driver.execute(command(TPM2_GET_RANDOM, b"\x00\x04"))) == TPM_RC_FAILURE
    assert device.errors == 1 and device.read(CTRL_STS, 4) & CTRL_STS_ERROR


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(-16, TPM_WINDOW_SIZE + 16) | st.sampled_from(
    [0, 8, 0x40, 0x44, 0x4C, 0x7C, 0xFFC, 0xFFF, 0xFFFC, 0x10000, 0x1000C, LOG_DATA_OFFSET, 0x1FFFC]),
    st.sampled_from([1, 2, 4, 8]), st.integers(-(1 << 70), 1 << 70)), max_size=40))
def test_hostile_accesses_never_raise_and_reads_fit(accesses: list[tuple[bool, int, int, int]]) -> None:
    def fragile(data: bytes) -> bytes:
        if len(data) % 3 == 0:
            raise ValueError("a transmit that fails")
        return data[: len(data) // 2] if len(data) % 3 == 1 else command(0, data[10:])

    device = TpmCrb(fragile, log=b"log" * 100)
    for is_write, offset, size, value in accesses:
        if is_write:
            device.write(offset, size, value)
        else:
            assert 0 <= device.read(offset, size) < 1 << (8 * size)
        if offset == CTRL_START and is_write:  # and sometimes a real START
            device.write(LOC_CTRL, 4, 1)
            device.write(CTRL_REQ, 4, 1)
            device.write(CTRL_START, 4, 1)
    assert device.read(INTF_ID, 8) == INTERFACE_ID
    state = device.save()
    assert len(state.buffer) == DATA_BUFFER_SIZE and state.log == b"log" * 100
    assert TpmCrb(fragile, decode(TpmCrbState, encode(state))).save() == state


def test_odd_sizes_are_harmless() -> None:
    device = TpmCrb(Recorder(command(0)))
    assert device.read(0, 0) == 0 and device.read(0, -1) == 0 and device.read(0x80, 3) < 1 << 24
    device.write(0x80, 0, 5)
    device.write(0x80, 16, 5)
    device.write(0x80, -4, 5)
    assert device.save() == TpmCrbState()


def test_save_and_restore_in_the_middle_of_a_command() -> None:
    response = command(0, b"\x00\x02hi")
    first = Recorder(response)
    device = TpmCrb(first, log=b"\x01\x02")
    driver = Driver(device)
    driver.open()
    sent = command(TPM2_GET_RANDOM, b"\x00\x02")
    driver.put(sent)  # written, not started
    state = decode(TpmCrbState, encode(device.save()))  # as a snapshot stores it
    assert state.locality_assigned and not state.idle and state.buffer.startswith(sent)
    second = Recorder(response)
    restored = TpmCrb.restore(second, state)
    again = Driver(restored)
    again.write(CTRL_START, 1)
    assert again.get() == response and second.commands == [sent] and not first.commands
    assert restored.read(LOG_WINDOW_OFFSET, 4) == 2 and restored.save().log == b"\x01\x02"
    assert restored.save().commands == 1


def test_restoring_an_inconsistent_state_is_refused() -> None:
    with pytest.raises(DeviceError):
        TpmCrb(Recorder(b""), TpmCrbState(buffer=b"short"))
    with pytest.raises(DeviceError):
        TpmCrb(Recorder(b""), TpmCrbState(cancel=7))
    with pytest.raises(DeviceError):
        TpmCrb(Recorder(b""), TpmCrbState(log=bytes(LOG_MAX + 1)))


def test_the_event_log_window() -> None:
    event_log = bytes(range(256)) * 3 + b"tail"
    device = TpmCrb(Recorder(b""), log=event_log)
    assert device.read(LOG_WINDOW_OFFSET, 4) == len(event_log)
    assert device.read(LOG_WINDOW_OFFSET + 4, 8) == 0 and device.read(LOG_WINDOW_OFFSET + 12, 4) == 0
    read = b"".join(device.read(LOG_DATA_OFFSET + index, 8).to_bytes(8, "little")
                    for index in range(0, len(event_log) + 8, 8))
    assert read[:len(event_log)] == event_log and read[len(event_log):] == bytes(len(read) - len(event_log))
    assert device.read(LOG_DATA_OFFSET + 1, 2) == 0x0201
    assert device.read(TPM_WINDOW_SIZE - 8, 8) == 0, "zeros past the log up to the window's end"
    assert device.read(LOG_WINDOW_OFFSET - 2, 4) == 0x0000FFFF | (len(event_log) & 0xFFFF) << 16
    device.write(LOG_DATA_OFFSET, 8, 0)
    assert device.read(LOG_DATA_OFFSET, 1) == 0, "read-only"
    assert device.read(LOG_DATA_OFFSET + 1, 1) == 1
    device.set_log(bytes(LOG_MAX))
    assert device.read(LOG_WINDOW_OFFSET, 4) == LOG_MAX and device.save().log == bytes(LOG_MAX)
    with pytest.raises(DeviceError):
        device.set_log(bytes(LOG_MAX + 1))
    with pytest.raises(DeviceError):
        TpmCrb(Recorder(b""), log=bytes(LOG_MAX + 1))


def test_an_empty_log_reads_zero() -> None:
    device = TpmCrb(Recorder(b""))
    assert device.read(LOG_WINDOW_OFFSET, 8) == 0 and device.read(LOG_DATA_OFFSET, 8) == 0


# --- a real TPM: swtpm with a raw command socket (a test helper; the VMM's own is pyrovisor.tpm.swtpm) ---

def _receive(connection: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = connection.recv(count - len(data))
        if not chunk:
            raise ConnectionError("swtpm closed the connection")
        data += chunk
    return bytes(data)


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[socket.socket]:
    program = shutil.which("swtpm")
    if program is None:
        pytest.skip("swtpm is not installed (apt-get install swtpm)")
    server, control = tmp_path / "tpm.sock", tmp_path / "ctrl.sock"
    process = subprocess.Popen([program, "socket", "--tpm2", "--server", f"type=unixio,path={server}",
                                "--ctrl", f"type=unixio,path={control}", "--flags", "not-need-init",
                                "--tpmstate", f"dir={tmp_path}"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(10)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                connection.connect(str(server))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"swtpm did not start: {process.stderr.read() if process.stderr else ''!r}") from None
                time.sleep(0.02)
        yield connection
    finally:
        connection.close()
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


def test_startup_and_get_random_through_a_real_swtpm(swtpm: socket.socket) -> None:
    def transmit(data: bytes) -> bytes:
        swtpm.sendall(data)
        head = _receive(swtpm, HEADER.size)
        return head + _receive(swtpm, HEADER.unpack(head)[1] - HEADER.size)

    device = TpmCrb(transmit)
    driver = Driver(device)
    driver.open()
    assert rc(driver.execute(command(TPM2_STARTUP, struct.pack(">H", TPM_SU_CLEAR)))) == 0
    response = driver.execute(command(TPM2_GET_RANDOM, struct.pack(">H", 16)))
    assert rc(response) == 0
    (count,) = struct.unpack_from(">H", response, 10)
    assert count == 16 and len(response) == 12 + 16 and response[12:] != bytes(16)
    assert device.commands == 2 and device.errors == 0
    driver.write(CTRL_REQ, 2)
    driver.write(LOC_CTRL, 2)
