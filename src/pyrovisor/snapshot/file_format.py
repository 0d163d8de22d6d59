"""The state file: magic, format version, length, a JSON payload and a SHA-256 over all of it."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import struct
from pathlib import Path
from types import TracebackType

from pyrovisor.errors import StateError
from pyrovisor.persist.codec import decode, encode, prepare_decoder
from pyrovisor.persist.json_document import parse_json
from pyrovisor.snapshot.state import SnapshotState

MAGIC = b"PYRVSNAP"
FORMAT_VERSION = 2  # 2: devices as records of the device manager, vCPUs with their TSC frequency
SUPPORTED_VERSIONS = (2,)
HEADER = struct.Struct("<8sHHIQQ")  # magic, version, flags, reserved, payload length, reserved
DIGEST_SIZE = 32
MAX_PAYLOAD = 64 << 20
MAX_STATE_FILE = HEADER.size + MAX_PAYLOAD + DIGEST_SIZE
PAYLOAD_KIND = "pyrovisor-machine-state"
FILE_MODE = 0o600  # snapshot files hold guest memory and registers: readable by their owner only
READ_CHUNK = 1 << 20

prepare_decoder(SnapshotState)  # resolve the type hints now, not during a restore

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


def special_file_kind(mode: int) -> str | None:
    """What a file that is not a regular file is, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), f"a special file (mode {mode:#o})")


def _os_failure(action: str, what: str, exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return f"{what} is missing"
    if exc.errno == errno.ELOOP:
        return f"cannot {action} the {what}: too many levels of symbolic links (a symlink loop?)"
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return f"cannot {action} the {what}: {reason}"


class SnapshotFile:
    """A snapshot file opened read-only once it is known to be a regular file (`open_snapshot_file`)."""

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self.path = path
        self.source = str(path)
        self.fd = fd
        self.size = size  # at the time it was opened

    def __enter__(self) -> SnapshotFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def reopen_path(self) -> Path:
        """A path naming exactly the inode that was checked (for code that opens files by path)."""
        magic = Path(f"/proc/self/fd/{self.fd}")
        return magic if magic.exists() else self.path

    def read_at_most(self, limit: int) -> bytes:
        """The file's bytes from the start, but never more than `limit` (the file may be growing)."""
        chunks = []
        total = 0
        while total < limit:
            try:
                chunk = os.pread(self.fd, min(READ_CHUNK, limit - total), total)
            except OSError as exc:
                raise StateError(self.source, _os_failure("read", "file", exc)) from None
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)

    def read_into(self, into: memoryview, offset: int) -> None:
        """Fill `into` with the bytes at `offset`; a file that ends early is a StateError.

        Every view made here is released before an error is raised: a traceback that kept one alive
        would keep the guest memory behind it from being unmapped."""
        failure = None
        with memoryview(into) as base, base.cast("B") as view:
            position = 0
            while position < len(view):
                try:
                    with view[position:] as rest:
                        count = os.preadv(self.fd, [rest], offset + position)
                except OSError as exc:
                    failure = _os_failure("read", "file", exc)
                    break
                if not count:
                    failure = "file ended early"
                    break
                position += count
        if failure is not None:
            raise StateError(self.source, failure)

    def sha256(self, chunk: int = 8 << 20) -> str:
        digest = hashlib.sha256()
        buffer = bytearray(chunk)
        offset = 0
        while True:
            try:
                count = os.preadv(self.fd, [buffer], offset)
            except OSError as exc:
                raise StateError(self.source, _os_failure("read", "file", exc)) from None
            if not count:
                return digest.hexdigest()
            digest.update(memoryview(buffer)[:count])
            offset += count


def open_snapshot_file(path: Path, what: str) -> SnapshotFile:
    """Open a file a snapshot reads; anything but a regular file, and any failure, is a one-line StateError.

    The path is first opened with O_PATH, which opens no device and never blocks on a FIFO; only once
    its inode is known to be a regular file is that same inode opened for reading (through
    /proc/self/fd, so it cannot be swapped in between).
    """
    source = str(path)
    try:
        probe = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:
        reason = _os_failure("open", what, exc) if isinstance(exc, OSError) else f"invalid path for the {what}"
        raise StateError(source, reason) from None
    try:
        kind = special_file_kind(os.fstat(probe).st_mode)
        if kind is not None:
            raise StateError(source, f"{what} is {kind}, not a regular file")
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
        try:
            fd = os.open(f"/proc/self/fd/{probe}", flags)
        except FileNotFoundError:  # no /proc: open the path itself; the check below still holds
            fd = os.open(path, flags)
    except OSError as exc:
        raise StateError(source, _os_failure("open", what, exc)) from None
    finally:
        os.close(probe)
    try:
        status = os.fstat(fd)
        kind = special_file_kind(status.st_mode)
        if kind is not None:
            raise StateError(source, f"{what} is {kind}, not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return SnapshotFile(path, fd, status.st_size)


def create_private_file(path: Path, what: str) -> int:
    """A new file, writable, mode 0600 whatever the umask; refuses to replace or follow anything there."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:
        raise StateError(str(path), f"cannot create the {what}: something is already there") from None
    except OSError as exc:
        raise StateError(str(path), _os_failure("create", what, exc)) from None
    try:
        os.fchmod(fd, FILE_MODE)  # the umask may have removed bits from FILE_MODE
    except BaseException:
        os.close(fd)
        raise
    return fd


def dump_state(state: SnapshotState) -> bytes:
    payload = json.dumps({"kind": PAYLOAD_KIND, "state": encode(state)}, separators=(",", ":")).encode()
    if len(payload) > MAX_PAYLOAD:
        raise StateError("state file", f"payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD} byte cap")
    header = HEADER.pack(MAGIC, FORMAT_VERSION, 0, 0, len(payload), 0)
    return header + payload + hashlib.sha256(header + payload).digest()


def load_state(data: bytes, source: str) -> SnapshotState:
    """Parse and check a state file's bytes; every defect is a StateError saying what is wrong."""
    if len(data) < HEADER.size + DIGEST_SIZE:
        raise StateError(source, f"truncated: {len(data)} bytes is shorter than an empty state file")
    magic, version, _flags, _reserved, length, _reserved2 = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise StateError(source, "not a pyrovisor state file (bad magic)")
    if version not in SUPPORTED_VERSIONS:
        advice = "; take the snapshot again with this pyrovisor" if version < min(SUPPORTED_VERSIONS) else ""
        raise StateError(source, f"format version {version} is not supported (this pyrovisor reads "
                         f"{', '.join(map(str, SUPPORTED_VERSIONS))}){advice}")
    if length > MAX_PAYLOAD:
        raise StateError(source, f"declared payload of {length} bytes exceeds the {MAX_PAYLOAD} byte cap")
    expected = HEADER.size + length + DIGEST_SIZE
    if len(data) < expected:
        raise StateError(source, f"truncated: {len(data)} of {expected} bytes")
    if len(data) > expected:
        raise StateError(source, f"{len(data) - expected} unexpected bytes after the checksum")
    body, digest = data[:HEADER.size + length], data[HEADER.size + length:]
    if hashlib.sha256(body).digest() != digest:
        raise StateError(source, "checksum mismatch: the file is corrupt")
    document = parse_json(memoryview(body)[HEADER.size:], f"{source}: payload")
    if not isinstance(document, dict) or document.get("kind") != PAYLOAD_KIND or "state" not in document:
        raise StateError(source, f"payload is not a {PAYLOAD_KIND} document")
    try:
        return decode(SnapshotState, document["state"], where=f"{source}: state")
    except ValueError as exc:  # the decoder's own checks raise StateError; this is a value it did not foresee
        raise StateError(f"{source}: state", str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None




def write_state_file(path: Path, state: SnapshotState) -> None:
    """Write atomically: a reader sees the old file or the complete new one, never a partial one.

    The file (and its temporary `.partial`) is created with mode 0600; an existing `.partial` (or a
    symbolic link by that name) is refused, never followed or overwritten."""
    data = dump_state(state)
    temporary = path.with_name(path.name + ".partial")
    fd = create_private_file(temporary, "temporary state file")
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(exc, OSError):
            raise StateError(str(path), _os_failure("write", "state file", exc)) from None
        raise


def read_state_file(path: Path) -> SnapshotState:
    """Read and check a state file; a missing, special, unreadable or oversized file is a StateError."""
    with open_snapshot_file(path, "state file") as file:
        if file.size > MAX_STATE_FILE:
            raise StateError(file.source, f"{file.size} bytes is larger than any valid state file")
        data = file.read_at_most(MAX_STATE_FILE + 1)
    if len(data) > MAX_STATE_FILE:
        raise StateError(str(path), f"{len(data)}+ bytes is larger than any valid state file")
    return load_state(data, str(path))
