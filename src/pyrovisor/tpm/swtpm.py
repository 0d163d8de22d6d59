"""One swtpm process per VM: its data channel (raw TPM 2.0 commands) and its control channel (init, state)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from types import TracebackType

from pyrovisor.errors import MissingToolError, TpmError

TRANSMIT_TIMEOUT_S = 30.0  # one TPM command (an RSA key generation in swtpm takes well under a second)
CONTROL_TIMEOUT_S = 30.0  # one control-channel exchange
START_TIMEOUT_S = 10.0  # from spawning swtpm to both sockets accepting connections
STOP_TIMEOUT_S = 5.0  # from asking swtpm to shut down to its exit, before it is killed
LOG_TAIL_BYTES = 600  # how much of swtpm's log an error quotes

TPM_HEADER = struct.Struct(">HII")  # tag, size, command code or response code (TPM 2.0 Part 1 §18)
TPM_ST_NO_SESSIONS = 0x8001
TPM_RC_COMMAND_SIZE = 0x142
MAX_RESPONSE_BYTES = 64 * 1024  # swtpm's I/O buffer is 4 KiB; anything larger is a broken stream


class ControlCommand(IntEnum):
    """swtpm's control-channel command codes (swtpm_ioctls(3), the CMD_* codes of tpm_ioctl.h)."""

    GET_CAPABILITY = 0x01
    INIT = 0x02
    SHUTDOWN = 0x03
    SET_LOCALITY = 0x05
    STORE_VOLATILE = 0x0A
    GET_STATEBLOB = 0x0C
    SET_STATEBLOB = 0x0D
    STOP = 0x0E
    GET_CONFIG = 0x0F
    SET_BUFFERSIZE = 0x11


class BlobKind(IntEnum):
    """The TPM state blobs swtpm's control channel reads and writes (PTM_BLOB_TYPE_*)."""

    PERMANENT = 1
    VOLATILE = 2
    SAVESTATE = 3


# Every control message is big-endian: a 4-byte command code, then the request part of the command's
# structure; the answer is the response part, whose first 4 bytes are a TPM result code (0: success).
_RESULT = struct.Struct(">I")
_INIT_REQUEST = struct.Struct(">I")  # init_flags
_BUFFER_SIZE_REQUEST = struct.Struct(">I")  # buffersize
_BUFFER_SIZE_RESPONSE = struct.Struct(">IIII")  # tpm_result, buffersize, minsize, maxsize
_LOCALITY_REQUEST = struct.Struct(">B")
_GET_BLOB_REQUEST = struct.Struct(">III")  # state_flags, type, offset
_GET_BLOB_RESPONSE = struct.Struct(">IIII")  # result, state_flags, total length, length of the data that follows
_SET_BLOB_REQUEST = struct.Struct(">III")  # state_flags, type, length of the data that follows
PTM_STATE_FLAG_ENCRYPTED = 2  # a blob encrypted with a migration key (pyrovisor never passes one)


@dataclass(frozen=True)
class SwtpmState:
    """Everything a new swtpm needs to continue where another stopped: the TPM's permanent state (seeds,
    NV, persistent keys), its volatile state (PCRs, sessions, loaded objects, clock) and the TPM 1.2-only
    save state (empty for a TPM 2.0)."""

    permanent: bytes
    volatile: bytes
    savestate: bytes = b""


def find_swtpm() -> str:
    """The path of the swtpm program."""
    path = shutil.which("swtpm")
    if path is None:
        raise MissingToolError("the vTPM", "swtpm", "swtpm swtpm-tools")
    return path


class Swtpm:
    """A running `swtpm socket --tpm2`: `transmit` one TPM command at a time from any thread, save its
    state while it keeps running, `close` it (idempotent). Use `Swtpm.start`."""

    def __init__(self, process: subprocess.Popen[bytes], runtime_dir: Path, state_dir: Path,
                 data: socket.socket, control: socket.socket) -> None:
        self._process = process
        self._runtime_dir = runtime_dir
        self.state_dir = state_dir
        self._data = data
        self._control = control
        self._lock = threading.Lock()  # one exchange at a time on either channel
        self._broken = ""  # why the channels can no longer be trusted (a timeout left a half-read answer)
        self._closed = False
        # Never closed (an exception, an exit): at the latest when the interpreter exits, kill and clean up.
        self._finalizer = weakref.finalize(self, _abandon, process, runtime_dir)

    # --- lifetime -------------------------------------------------------------------------------------
    @classmethod
    def start(cls, state_dir: Path | None = None, state: SwtpmState | None = None,
              buffer_size: int | None = None) -> Swtpm:
        """Start swtpm keeping its files in `state_dir` (default: a private temporary directory removed by
        `close`). With `state`, the TPM continues from it (PCRs, keys, counters: no TPM2_Startup needed);
        without, it is initialised but not started (the caller, as the firmware, sends TPM2_Startup).
        `buffer_size` caps the commands and responses the TPM deals in (and reports in its properties) at
        what the interface in front of it can carry, such as a CRB's data buffer."""
        program = find_swtpm()
        runtime_dir = Path(tempfile.mkdtemp(prefix="pyrovisor-swtpm-"))  # 0700: sockets and log
        try:
            if state_dir is None:
                tpm_dir = runtime_dir / "state"
                tpm_dir.mkdir(mode=0o700)
            else:
                tpm_dir = state_dir
                tpm_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            process = cls._spawn(program, runtime_dir, tpm_dir)
        except BaseException:
            shutil.rmtree(runtime_dir, ignore_errors=True)
            raise
        try:
            data, control = cls._connect(process, runtime_dir)
        except BaseException:
            _stop_process(process)
            shutil.rmtree(runtime_dir, ignore_errors=True)
            raise
        swtpm = cls(process, runtime_dir, tpm_dir, data, control)
        try:
            if buffer_size is not None:
                swtpm._set_buffer_size(buffer_size)
            if state is not None:
                swtpm._load_state(state)
            swtpm._init()
        except BaseException:
            swtpm.close()
            raise
        return swtpm

    @staticmethod
    def _spawn(program: str, runtime_dir: Path, tpm_dir: Path) -> subprocess.Popen[bytes]:
        log = runtime_dir / "swtpm.log"
        command = [
            program, "socket", "--tpm2",
            "--tpmstate", f"dir={tpm_dir},mode=0600",
            "--server", f"type=unixio,path={runtime_dir / 'data'},mode=0600",
            "--ctrl", f"type=unixio,path={runtime_dir / 'control'},mode=0600",
            "--log", f"file={log},level=1",
            # Exit when the data connection closes: when this process dies, for any reason, so does swtpm.
            "--terminate",
        ]
        with open(runtime_dir / "stderr", "wb") as errors:
            try:
                return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=errors, stderr=errors,
                                        close_fds=True,
                                        start_new_session=True)  # a terminal's Ctrl-C is the VMM's to handle
            except OSError as exc:
                raise TpmError("start", f"cannot run {program}: {exc.strerror or exc}") from None

    @staticmethod
    def _connect(process: subprocess.Popen[bytes], runtime_dir: Path) -> tuple[socket.socket, socket.socket]:
        deadline = time.monotonic() + START_TIMEOUT_S
        connected: list[socket.socket] = []
        try:
            for name in ("control", "data"):
                path = str(runtime_dir / name)
                while True:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    try:
                        sock.connect(path)
                        break
                    except (FileNotFoundError, ConnectionRefusedError):
                        sock.close()
                    status = process.poll()
                    if status is not None:
                        raise TpmError("start", f"swtpm exited with status {status} before listening"
                                                f"{_log_tail(runtime_dir)}")
                    if time.monotonic() > deadline:
                        raise TpmError("start", f"swtpm did not listen on {path} within {START_TIMEOUT_S:g} s"
                                                f"{_log_tail(runtime_dir)}")
                    time.sleep(0.002)
                connected.append(sock)
        except BaseException:
            for sock in connected:
                sock.close()
            raise
        control, data = connected
        control.settimeout(CONTROL_TIMEOUT_S)
        data.settimeout(TRANSMIT_TIMEOUT_S)
        return data, control

    def close(self) -> None:
        """Shut swtpm down (kill it if it does not go), wait for it, remove its sockets and temporary files."""
        if self._closed:
            return
        self._closed = True
        # A transmit stuck on a hung swtpm holds the lock: then skip the polite shutdown and kill it.
        patient = self._lock.acquire(timeout=1.0)
        if patient:
            try:
                if not self._broken and self._process.poll() is None:
                    with contextlib.suppress(TpmError):
                        self._control_exchange(ControlCommand.SHUTDOWN, b"", _RESULT.size, "shutdown",
                                               timeout=STOP_TIMEOUT_S)
            finally:
                self._lock.release()
        for sock in (self._control, self._data):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        _stop_process(self._process, patient=patient and not self._broken)  # a hung swtpm is killed at once
        shutil.rmtree(self._runtime_dir, ignore_errors=True)  # the sockets, the log, a private state dir
        self._finalizer.detach()

    def __enter__(self) -> Swtpm:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def running(self) -> bool:
        return not self._closed and self._process.poll() is None

    # --- the data channel -------------------------------------------------------------------------------
    def transmit(self, command: bytes) -> bytes:
        """Send one TPM command and return the TPM's whole response. A command whose header size does not
        match its length gets a TPM_RC_COMMAND_SIZE response, as a TPM answers it; a dead, closed or hung
        swtpm raises TpmError (after at most TRANSMIT_TIMEOUT_S)."""
        if len(command) < TPM_HEADER.size or TPM_HEADER.unpack_from(command)[1] != len(command):
            return TPM_HEADER.pack(TPM_ST_NO_SESSIONS, TPM_HEADER.size, TPM_RC_COMMAND_SIZE)
        with self._lock:
            self._check_usable("transmit")
            try:
                self._data.sendall(command)
                header = self._receive(self._data, TPM_HEADER.size, "transmit")
                size = TPM_HEADER.unpack(header)[1]
                if not TPM_HEADER.size <= size <= MAX_RESPONSE_BYTES:
                    self._broken = f"swtpm answered with a response size of {size} bytes"
                    raise TpmError("transmit", self._broken)
                return header + self._receive(self._data, size - TPM_HEADER.size, "transmit")
            except OSError as exc:
                raise self._failure("transmit", exc, TRANSMIT_TIMEOUT_S) from None

    # --- the control channel ----------------------------------------------------------------------------
    def set_locality(self, locality: int) -> None:
        """The locality of the commands that follow (0 to 4; TPM 2.0 CRB localities)."""
        if not 0 <= locality <= 4:
            raise TpmError("set locality", f"locality {locality} is not 0 to 4")
        with self._lock:
            self._control_call(ControlCommand.SET_LOCALITY, _LOCALITY_REQUEST.pack(locality), "set locality")

    def save_state(self) -> SwtpmState:
        """The TPM's three state blobs, read while it keeps running: swtpm serialises the running TPM's
        volatile state on request (CMD_GET_STATEBLOB), so nothing needs stopping or re-initialising."""
        with self._lock:
            return SwtpmState(permanent=self._get_blob(BlobKind.PERMANENT),
                              volatile=self._get_blob(BlobKind.VOLATILE),
                              savestate=self._get_blob(BlobKind.SAVESTATE))

    def _set_buffer_size(self, size: int) -> None:
        """Before CMD_INIT: the largest command and response, which swtpm may round into its own bounds."""
        operation = "set the buffer size"
        with self._lock:
            self._check_usable(operation)
            answer = self._control_exchange(ControlCommand.SET_BUFFERSIZE, _BUFFER_SIZE_REQUEST.pack(size),
                                            _BUFFER_SIZE_RESPONSE.size, operation)
            result, granted, _minimum, _maximum = _BUFFER_SIZE_RESPONSE.unpack(answer)
            if result != 0:
                raise TpmError(operation, "swtpm refused", result)
            if granted > size:
                raise TpmError(operation, f"swtpm keeps a buffer of {granted} bytes, larger than the {size} asked")

    def _init(self) -> None:
        with self._lock:
            self._control_call(ControlCommand.INIT, _INIT_REQUEST.pack(0), "init")

    def _load_state(self, state: SwtpmState) -> None:
        # The permanent blob first (libtpms refuses the others before it); before CMD_INIT, which hands them
        # to the TPM. An empty blob is left unset (a TPM 2.0 has no save state).
        with self._lock:
            for kind, blob in ((BlobKind.PERMANENT, state.permanent), (BlobKind.VOLATILE, state.volatile),
                               (BlobKind.SAVESTATE, state.savestate)):
                if blob:
                    request = _SET_BLOB_REQUEST.pack(0, kind, len(blob)) + blob
                    self._control_call(ControlCommand.SET_STATEBLOB, request, f"load the {kind.name.lower()} state")

    def _get_blob(self, kind: BlobKind) -> bytes:
        operation = f"save the {kind.name.lower()} state"
        self._check_usable(operation)
        blob = bytearray()
        total = 0
        while True:
            request = _GET_BLOB_REQUEST.pack(0, kind, len(blob))
            answer = self._control_exchange(ControlCommand.GET_STATEBLOB, request, _GET_BLOB_RESPONSE.size,
                                            operation)
            result, flags, total, length = _GET_BLOB_RESPONSE.unpack(answer)
            if result != 0:
                if kind is BlobKind.SAVESTATE and total == 0:
                    return b""  # a TPM 2.0 never has one; swtpm answers with an error rather than nothing
                raise TpmError(operation, "swtpm refused", result)
            if flags & PTM_STATE_FLAG_ENCRYPTED:
                raise TpmError(operation, "swtpm returned an encrypted blob (a migration key is set)")
            try:
                blob += self._receive(self._control, length, operation)
            except OSError as exc:
                raise self._failure(operation, exc, CONTROL_TIMEOUT_S) from None
            if len(blob) >= total or length == 0:
                break
        if len(blob) != total:
            self._broken = f"swtpm sent {len(blob)} bytes of a {total}-byte {kind.name.lower()} blob"
            raise TpmError(operation, self._broken)
        return bytes(blob)

    def _control_call(self, command: ControlCommand, request: bytes, operation: str) -> None:
        """A control command whose answer is just a result code; a non-zero code raises TpmError."""
        self._check_usable(operation)
        (result,) = _RESULT.unpack(self._control_exchange(command, request, _RESULT.size, operation))
        if result != 0:
            raise TpmError(operation, f"swtpm refused{_log_tail(self._runtime_dir)}", result)

    def _control_exchange(self, command: ControlCommand, request: bytes, answer_size: int, operation: str,
                          timeout: float = CONTROL_TIMEOUT_S) -> bytes:
        try:
            self._control.settimeout(timeout)
            self._control.sendall(_RESULT.pack(command) + request)
            return self._receive(self._control, answer_size, operation)
        except OSError as exc:
            raise self._failure(operation, exc, timeout) from None

    # --- plumbing ---------------------------------------------------------------------------------------
    def _check_usable(self, operation: str) -> None:
        if self._closed:
            raise TpmError(operation, "swtpm was closed")
        if self._broken:
            raise TpmError(operation, f"swtpm is unusable: {self._broken}")

    def _receive(self, sock: socket.socket, size: int, operation: str) -> bytes:
        buffer = bytearray()
        while len(buffer) < size:
            chunk = sock.recv(min(size - len(buffer), 1 << 20))
            if not chunk:
                self._broken = "swtpm closed the connection"
                raise TpmError(operation, f"{self._describe_death()}{_log_tail(self._runtime_dir)}")
            buffer += chunk
        return bytes(buffer)

    def _failure(self, operation: str, exc: OSError, timeout: float) -> TpmError:
        if isinstance(exc, TimeoutError):
            self._broken = f"swtpm did not answer within {timeout:g} s"
            return TpmError(operation, self._broken)
        self._broken = f"the connection to swtpm failed: {exc.strerror or exc}"
        if self._closed:
            return TpmError(operation, "swtpm was closed")
        return TpmError(operation, f"{self._describe_death()} ({exc.strerror or exc}){_log_tail(self._runtime_dir)}")

    def _describe_death(self) -> str:
        if self._closed:
            return "swtpm was closed"
        try:
            status = self._process.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            return f"swtpm (pid {self._process.pid}) closed the connection"
        if status < 0:
            return f"swtpm (pid {self._process.pid}) was killed by signal {-status}"
        return f"swtpm (pid {self._process.pid}) exited with status {status}"


def _stop_process(process: subprocess.Popen[bytes], patient: bool = True) -> None:
    """Wait for swtpm to exit (closing its data connection made it), then terminate and kill it if it does not;
    not `patient`: kill it now."""
    steps = (None, process.terminate, process.kill) if patient else (process.kill,)
    for action in steps:
        if action is not None:
            with contextlib.suppress(ProcessLookupError):
                action()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
            return
        except subprocess.TimeoutExpired:
            continue
    process.wait()


def _abandon(process: subprocess.Popen[bytes], runtime_dir: Path) -> None:
    """The cleanup of a Swtpm nobody closed."""
    with contextlib.suppress(OSError):
        process.kill()
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        process.wait(timeout=STOP_TIMEOUT_S)
    shutil.rmtree(runtime_dir, ignore_errors=True)


def _log_tail(runtime_dir: Path) -> str:
    """The end of swtpm's log and stderr, on one line, for an error message ('' when both are empty)."""
    text = ""
    for name in ("swtpm.log", "stderr"):
        with contextlib.suppress(OSError), open(runtime_dir / name, "rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - LOG_TAIL_BYTES))
            text += file.read().decode(errors="replace")
    text = " ".join(text.split())
    return f"; swtpm says: {text}" if text else ""
