"""A TPM 2.0 Command Response Buffer (CRB) interface as a pure state machine, with a read-only event-log window."""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pyrovisor.devices.base import all_ones
from pyrovisor.errors import DeviceError

log = logging.getLogger(__name__)

# The window: locality 0's CRB page, then (at 64 KiB) the event log. QEMU's tpm-crb sits at the same address.
TPM_CRB_BASE = 0xFED40000
TPM_WINDOW_SIZE = 0x20000
CRB_PAGE_SIZE = 0x1000
DATA_BUFFER_OFFSET = 0x80  # TPM_CRB_DATA_BUFFER_0: command and response share it
DATA_BUFFER_SIZE = CRB_PAGE_SIZE - DATA_BUFFER_OFFSET  # 3968 bytes
LOG_WINDOW_OFFSET = 0x10000  # a 32-bit little-endian log length, 12 bytes of zeros, then the log
LOG_DATA_OFFSET = 0x10010
LOG_MAX = TPM_WINDOW_SIZE - LOG_DATA_OFFSET  # 0xFFF0 bytes

# Locality 0's registers (TCG PC Client Platform TPM Profile, CRB interface), offsets in the page.
LOC_STATE = 0x00
LOC_CTRL = 0x08
LOC_STS = 0x0C
INTF_ID = 0x30  # 64 bits
CTRL_EXT = 0x38  # 64 bits
CTRL_REQ = 0x40
CTRL_STS = 0x44
CTRL_CANCEL = 0x48
CTRL_START = 0x4C
INT_ENABLE = 0x50
INT_STS = 0x54
CMD_SIZE = 0x58
CMD_LADDR = 0x5C
CMD_HADDR = 0x60
RSP_SIZE = 0x64
RSP_ADDR = 0x68  # 64 bits

LOC_STATE_ESTABLISHED = 1 << 0  # tpmEstablished: reads 0, no H-CRTM or DRTM sequence ever runs here
LOC_STATE_ASSIGNED = 1 << 1  # locAssigned
LOC_STATE_ACTIVE_SHIFT = 2  # activeLocality, bits 4:2 (always 0)
LOC_STATE_REG_VALID = 1 << 7  # tpmRegValidSts
LOC_CTRL_REQUEST_ACCESS = 1 << 0
LOC_CTRL_RELINQUISH = 1 << 1
LOC_STS_GRANTED = 1 << 0
CTRL_REQ_CMD_READY = 1 << 0
CTRL_REQ_GO_IDLE = 1 << 1
CTRL_STS_ERROR = 1 << 0  # tpmSts: the last command could not reach the TPM
CTRL_STS_IDLE = 1 << 1  # tpmIdle
CTRL_CANCEL_BIT = 1 << 0
CTRL_START_BIT = 1 << 0

# TPM_CRB_INTF_ID_0: InterfaceType 1 (CRB), InterfaceVersion 1 (CRB), CapLocality 0 (locality 0 only),
# CapCRBIdleBypass 0, CapDataXferSizeSupport 3 (64 bytes), CapFIFO 0, CapCRB 1, InterfaceSelector 1 (CRB),
# IntfSelLock 1 (the selector cannot be changed: there is only CRB), RID 1, VID 0x1014 (IBM, whose libtpms
# swtpm runs the commands), DID 0x5056 ("PV").
INTERFACE_TYPE_CRB = 1
INTERFACE_VERSION_CRB = 1
INTERFACE_VID = 0x1014
INTERFACE_DID = 0x5056
INTERFACE_RID = 0x01
INTERFACE_ID = (INTERFACE_TYPE_CRB | INTERFACE_VERSION_CRB << 4 | 3 << 11 | 1 << 14 | 1 << 17 | 1 << 19
                | INTERFACE_RID << 24 | INTERFACE_VID << 32 | INTERFACE_DID << 48)

# TPM 2.0 wire format (big-endian): tag, size, command code or response code.
TPM_HEADER = struct.Struct(">HII")
TPM_ST_NO_SESSIONS = 0x8001
TPM_RC_FAILURE = 0x101
TPM_RC_COMMAND_SIZE = 0x142


def error_response(code: int) -> bytes:
    """A TPM response carrying only a response code."""
    return TPM_HEADER.pack(TPM_ST_NO_SESSIONS, TPM_HEADER.size, code)


@dataclass(frozen=True)
class TpmCrbState:
    """Locality 0's registers, the data buffer and the event log. CTRL_START is not kept: a command runs
    within the write that starts it, so START always reads 0 between accesses."""

    log: bytes = b""
    locality_assigned: bool = False
    idle: bool = True
    error: bool = False
    cancel: int = 0
    buffer: bytes = bytes(DATA_BUFFER_SIZE)
    commands: int = 0  # commands passed to the TPM
    errors: int = 0  # commands the TPM could not answer (transmit raised, or answered with a bad size)
    malformed: int = 0  # commands refused for their size field, answered TPM_RC_COMMAND_SIZE


class TpmCrb:
    """The CRB interface of locality 0 (TCG PC Client Platform TPM Profile), in one MMIO window of
    TPM_WINDOW_SIZE bytes, in front of `transmit` (a command's bytes in, the TPM's response out).

    - 0x000-0x07F: the registers; 0x080-0xFFF: the data buffer, shared by command and response (CMD_LADDR,
      RSP_ADDR point at it: `base` + 0x80). Any access of 1 to 8 bytes reads or writes those bytes,
      little-endian; a narrow access to a register reads or writes its bytes in place.
    - 0x10000: the event log's length (32 bits), the log itself from 0x10010; read-only, zeros past the log.
    - Everything else reads all ones and ignores writes.

    Writing 1 to CTRL_START, with the locality assigned and the TPM out of idle (cmdReady), runs the command
    now: its length comes from the size field of its header (10 to 3968 bytes, else TPM_RC_COMMAND_SIZE),
    `transmit` answers synchronously, the response replaces the buffer's contents, and START reads 0 again.
    When `transmit` raises (a dead swtpm) or returns fewer than 10 or more than 3968 bytes, the answer is
    TPM_RC_FAILURE with tpmSts (CTRL_STS bit 0) set until the next START. Nothing a guest does raises.

    `log` replaces the state's event log when given (set_log() replaces it later, e.g. after the boot was
    measured); `base` is where the window sits, for CMD_LADDR and RSP_ADDR.
    """

    def __init__(self, transmit: Callable[[bytes], bytes], state: TpmCrbState | None = None,
                 log: bytes | None = None, *, base: int = TPM_CRB_BASE) -> None:
        state = state or TpmCrbState()
        if len(state.buffer) != DATA_BUFFER_SIZE:
            raise DeviceError("tpm-crb", f"a data buffer of {len(state.buffer)} bytes, not {DATA_BUFFER_SIZE}")
        if state.cancel not in (0, 1) or min(state.commands, state.errors, state.malformed) < 0:
            raise DeviceError("tpm-crb", "inconsistent register or counter values in the saved state")
        self._transmit = transmit
        self._base = base
        self._lock = threading.Lock()
        self._log = b""
        self._log_window = b""
        self.set_log(state.log if log is None else log)
        self.locality_assigned = state.locality_assigned
        self.idle = state.idle
        self.error = state.error
        self.cancel = state.cancel
        self._buffer = bytearray(state.buffer)
        self.commands = state.commands
        self.errors = state.errors
        self.malformed = state.malformed

    @classmethod
    def restore(cls, transmit: Callable[[bytes], bytes], state: TpmCrbState) -> TpmCrb:
        return cls(transmit, state)

    def save(self) -> TpmCrbState:
        with self._lock:
            return TpmCrbState(log=self._log, locality_assigned=self.locality_assigned, idle=self.idle,
                               error=self.error, cancel=self.cancel, buffer=bytes(self._buffer),
                               commands=self.commands, errors=self.errors, malformed=self.malformed)

    @property
    def log(self) -> bytes:
        return self._log

    def set_log(self, data: bytes) -> None:
        """What the event-log window serves from now on; longer than LOG_MAX bytes is a DeviceError."""
        if len(data) > LOG_MAX:
            raise DeviceError("tpm-crb", f"an event log of {len(data)} bytes does not fit the window ({LOG_MAX})")
        header = struct.pack("<I", len(data)).ljust(LOG_DATA_OFFSET - LOG_WINDOW_OFFSET, b"\0")
        with self._lock:
            self._log = bytes(data)
            self._log_window = header + self._log

    # --- the bus side ---
    def read(self, offset: int, size: int) -> int:
        if not 1 <= size <= 8:
            return all_ones(size) if size > 0 else 0
        end = offset + size
        with self._lock:
            if offset >= DATA_BUFFER_OFFSET and end <= CRB_PAGE_SIZE:
                start = offset - DATA_BUFFER_OFFSET
                return int.from_bytes(self._buffer[start:start + size], "little")
            if offset >= LOG_WINDOW_OFFSET and end <= TPM_WINDOW_SIZE:
                start = offset - LOG_WINDOW_OFFSET
                return int.from_bytes(self._log_window[start:start + size].ljust(size, b"\0"), "little")
            value = 0
            for index in range(size):
                value |= self._byte(offset + index) << (8 * index)
            return value

    def write(self, offset: int, size: int, value: int) -> None:
        if not 1 <= size <= 8:
            return
        data = (value & all_ones(size)).to_bytes(size, "little")
        with self._lock:
            if offset >= DATA_BUFFER_OFFSET and offset + size <= CRB_PAGE_SIZE:
                start = offset - DATA_BUFFER_OFFSET
                self._buffer[start:start + size] = data
                return
            registers: dict[int, int] = {}  # dword offset -> the bits this write puts there
            for index, byte in enumerate(data):
                position = offset + index
                if 0 <= position < DATA_BUFFER_OFFSET:
                    dword = position & ~3
                    registers[dword] = registers.get(dword, 0) | byte << (8 * (position & 3))
                elif DATA_BUFFER_OFFSET <= position < CRB_PAGE_SIZE:
                    self._buffer[position - DATA_BUFFER_OFFSET] = byte
            for dword in sorted(registers):
                self._write_register(dword, registers[dword])

    # --- registers ---
    def _byte(self, position: int) -> int:
        if 0 <= position < DATA_BUFFER_OFFSET:
            return (self._register(position & ~3) >> (8 * (position & 3))) & 0xFF
        if DATA_BUFFER_OFFSET <= position < CRB_PAGE_SIZE:
            return self._buffer[position - DATA_BUFFER_OFFSET]
        if LOG_WINDOW_OFFSET <= position < TPM_WINDOW_SIZE:
            index = position - LOG_WINDOW_OFFSET
            return self._log_window[index] if index < len(self._log_window) else 0
        return 0xFF

    def _register(self, dword: int) -> int:
        """The 32-bit value at a dword offset of the register area (64-bit registers as two halves)."""
        if dword == LOC_STATE:
            assigned = LOC_STATE_ASSIGNED if self.locality_assigned else 0
            return LOC_STATE_REG_VALID | assigned  # activeLocality 0, tpmEstablished 0
        if dword == LOC_STS:
            return LOC_STS_GRANTED if self.locality_assigned else 0
        if dword in (INTF_ID, INTF_ID + 4):
            return (INTERFACE_ID >> (8 * (dword - INTF_ID))) & 0xFFFFFFFF
        if dword == CTRL_STS:
            return (CTRL_STS_ERROR if self.error else 0) | (CTRL_STS_IDLE if self.idle else 0)
        if dword == CTRL_CANCEL:
            return self.cancel
        if dword in (CMD_SIZE, RSP_SIZE):
            return DATA_BUFFER_SIZE
        buffer_address = self._base + DATA_BUFFER_OFFSET
        if dword == CMD_LADDR:
            return buffer_address & 0xFFFFFFFF
        if dword == CMD_HADDR:
            return buffer_address >> 32
        if dword in (RSP_ADDR, RSP_ADDR + 4):
            return (buffer_address >> (8 * (dword - RSP_ADDR))) & 0xFFFFFFFF
        # LOC_CTRL, CTRL_REQ and START read 0 (requests complete at once), as do CTRL_EXT, the interrupt
        # registers (no interrupts) and the reserved dwords.
        return 0

    def _write_register(self, dword: int, bits: int) -> None:
        if dword == LOC_CTRL:
            request, relinquish = bits & LOC_CTRL_REQUEST_ACCESS, bits & LOC_CTRL_RELINQUISH
            if request and not relinquish:
                self.locality_assigned = True
            elif relinquish and not request:
                self.locality_assigned = False
            return
        if not self.locality_assigned:
            return  # the control registers belong to the active locality
        if dword == CTRL_REQ:
            ready, go_idle = bits & CTRL_REQ_CMD_READY, bits & CTRL_REQ_GO_IDLE
            if ready and not go_idle:
                self.idle = False
            elif go_idle and not ready:
                self.idle = True
        elif dword == CTRL_CANCEL:
            self.cancel = bits & CTRL_CANCEL_BIT
        elif dword == CTRL_START and bits & CTRL_START_BIT and not self.idle:
            self._execute()

    def _execute(self) -> None:
        """Runs the command in the buffer; the response (or an error response) replaces it."""
        self.error = False
        _, size, code = TPM_HEADER.unpack_from(self._buffer)
        if not TPM_HEADER.size <= size <= DATA_BUFFER_SIZE:
            self.malformed += 1
            self._respond(error_response(TPM_RC_COMMAND_SIZE))
            return
        self.commands += 1
        try:
            response = self._transmit(bytes(self._buffer[:size]))
            if not TPM_HEADER.size <= len(response) <= DATA_BUFFER_SIZE:
                raise ValueError(f"a response of {len(response)} bytes (the buffer holds {DATA_BUFFER_SIZE})")
        except Exception as exc:  # the guest gets TPM_RC_FAILURE; the vCPU loop never sees the error
            self.errors += 1
            self.error = True
            emit = log.warning if self.errors == 1 or self.errors % 1000 == 0 else log.debug
            emit("tpm-crb: command %#x failed (%d failures so far): %s", code, self.errors, exc)
            response = error_response(TPM_RC_FAILURE)
        self._respond(bytes(response))

    def _respond(self, response: bytes) -> None:
        self._buffer[:] = response.ljust(DATA_BUFFER_SIZE, b"\0")
