"""The state file: magic, format version, length, a JSON payload and a SHA-256 over all of it."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from pyrovisor.errors import StateError
from pyrovisor.snapshot.codec import decode, encode, prepare_decoder
from pyrovisor.snapshot.state import SnapshotState

MAGIC = b"PYRVSNAP"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
HEADER = struct.Struct("<8sHHIQQ")  # magic, version, flags, reserved, payload length, reserved
DIGEST_SIZE = 32
MAX_PAYLOAD = 64 << 20
PAYLOAD_KIND = "pyrovisor-machine-state"

prepare_decoder(SnapshotState)  # resolve the type hints now, not during a restore


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
        raise StateError(source, f"format version {version} is not supported (this pyrovisor reads "
                         f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
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
    try:
        document = json.loads(body[HEADER.size:])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateError(source, f"payload is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("kind") != PAYLOAD_KIND or "state" not in document:
        raise StateError(source, f"payload is not a {PAYLOAD_KIND} document")
    return decode(SnapshotState, document["state"], where=f"{source}: state")


def write_state_file(path: Path, state: SnapshotState) -> None:
    """Write atomically: a reader sees the old file or the complete new one, never a partial one."""
    data = dump_state(state)
    temporary = path.with_name(path.name + ".partial")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def read_state_file(path: Path) -> SnapshotState:
    source = str(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise StateError(source, "no such file") from None
    if size > HEADER.size + MAX_PAYLOAD + DIGEST_SIZE:
        raise StateError(source, f"{size} bytes is larger than any valid state file")
    return load_state(path.read_bytes(), source)
