"""The migration stream: versioned, framed, checksummed messages, and page frames sent without copies.

Frame: magic "PYRM", protocol version (u16), type (u16), payload length (u32), sequence (u32),
CRC-32 of the payload (u32), then the payload. Control messages carry JSON; PAGES frames carry a
16-byte header (first guest physical address, page count, encoding) and the pages, raw or compressed,
or nothing for a run of zero pages.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from pyrovisor.errors import MigrationError

MAGIC = b"PYRM"
PROTOCOL_VERSION = 1
FRAME = struct.Struct("<4sHHIII")  # magic, version, type, length, sequence, crc32
PAGES = struct.Struct("<QIB3x")  # first gpa, page count, encoding
MAX_PAYLOAD = 64 << 20
PAGE_SIZE = 4096


class MessageType(IntEnum):
    HELLO = 1  # source → destination: who we are, the machine's shape (JSON)
    WELCOME = 2  # destination → source: accepted, or refused with a reason (JSON)
    PAGES = 3  # source → destination: a run of guest pages
    ROUND_END = 4  # source → destination: end of a round, frames whose checksums may be stale (JSON)
    STATE = 5  # source → destination: the machine state, after the last pages (JSON)
    RESUMED = 6  # destination → source: the guest runs on the destination (JSON)
    STOPPED = 7  # source → destination: the source has stopped; the destination owns the guest (JSON)
    ERROR = 8  # either way: the sender gives up, with a reason (JSON)


class Encoding(IntEnum):
    RAW = 0
    ZERO = 1
    LZ4 = 2
    ZSTD = 3


@dataclass(frozen=True)
class Frame:
    type: MessageType
    sequence: int
    payload: bytes | bytearray | memoryview
    checksum_ok: bool = True

    def json(self) -> dict[str, Any]:
        try:
            document = json.loads(bytes(self.payload))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise MigrationError("stream", f"{self.type.name} message is not valid JSON") from None
        if not isinstance(document, dict):
            raise MigrationError("stream", f"{self.type.name} message is not a JSON object")
        return document


class Connection:
    """Frames over a connected stream socket. Counts bytes in each direction."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sequence = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self._header = bytearray(FRAME.size)

    # --- sending ----------------------------------------------------------------------------------
    def send(self, kind: MessageType, *parts: bytes | bytearray | memoryview) -> int:
        """Send one frame made of `parts` (scatter-gather: guest memory is never copied); returns its sequence."""
        length = sum(len(part) for part in parts)
        if length > MAX_PAYLOAD:
            raise MigrationError("stream", f"frame of {length} bytes exceeds {MAX_PAYLOAD}")
        checksum = 0
        for part in parts:
            checksum = zlib.crc32(part, checksum)
        self.sequence += 1
        header = FRAME.pack(MAGIC, PROTOCOL_VERSION, int(kind), length, self.sequence, checksum)
        self._send_all([header, *parts])
        return self.sequence

    def send_json(self, kind: MessageType, document: dict[str, Any]) -> int:
        return self.send(kind, json.dumps(document, separators=(",", ":")).encode())

    def _send_all(self, buffers: list[bytes | bytearray | memoryview]) -> None:
        views = [memoryview(buffer).cast("B") for buffer in buffers if len(buffer)]
        try:
            while views:
                sent = self.sock.sendmsg(views)
                self.bytes_sent += sent
                while sent:
                    if sent >= len(views[0]):
                        sent -= len(views[0])
                        views.pop(0)
                    else:
                        views[0] = views[0][sent:]
                        sent = 0
        except OSError as exc:
            raise MigrationError("stream", f"connection lost while sending ({exc.strerror or exc})") from None

    # --- receiving --------------------------------------------------------------------------------
    def receive_header(self) -> tuple[MessageType, int, int, int]:
        """The next frame's (type, length, sequence, checksum); refuses anything malformed."""
        self.receive_into(memoryview(self._header))
        magic, version, kind, length, sequence, checksum = FRAME.unpack(self._header)
        if magic != MAGIC:
            raise MigrationError("stream", "malformed frame (bad magic): not a pyrovisor migration stream")
        if version != PROTOCOL_VERSION:
            raise MigrationError("stream", f"protocol version {version} is not supported (this pyrovisor speaks "
                                 f"{PROTOCOL_VERSION})")
        try:
            message_type = MessageType(kind)
        except ValueError:
            raise MigrationError("stream", f"malformed frame: unknown message type {kind}") from None
        if length > MAX_PAYLOAD:
            raise MigrationError("stream", f"malformed frame: {length} byte payload exceeds {MAX_PAYLOAD}")
        return message_type, length, sequence, checksum

    def receive(self) -> Frame:
        """A whole frame into a new buffer (control messages); its checksum must match."""
        return self.receive_payload(*self.receive_header())

    def receive_payload(self, kind: MessageType, length: int, sequence: int, checksum: int) -> Frame:
        """The payload of a frame whose header was just read, into a new buffer; its checksum must match."""
        payload = bytearray(length)
        self.receive_into(memoryview(payload))
        if zlib.crc32(payload) != checksum:
            raise MigrationError("stream", f"checksum mismatch in {kind.name} frame {sequence}")
        return Frame(kind, sequence, payload)

    def receive_into(self, view: memoryview) -> None:
        view = view.cast("B") if view.format != "B" else view
        position = 0
        try:
            while position < len(view):
                count = self.sock.recv_into(view[position:])
                if count == 0:
                    raise MigrationError("stream", "connection closed by the peer")
                position += count
                self.bytes_received += count
        except TimeoutError:
            raise MigrationError("stream", "timed out waiting for the peer") from None
        except OSError as exc:
            raise MigrationError("stream", f"connection lost while receiving ({exc.strerror or exc})") from None

    def peer_error(self, timeout: float = 1.0) -> str | None:
        """After a failure: the reason in an ERROR message the peer sent before closing, if there is one."""
        try:
            self.sock.settimeout(timeout)
            while True:
                frame = self.receive()
                if frame.type is MessageType.ERROR:
                    return str(frame.json().get("reason", "the peer reported an error"))
        except (MigrationError, OSError):
            return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def expect(frame: Frame, *kinds: MessageType) -> Frame:
    """`frame` if it has one of `kinds`; an ERROR frame or anything else becomes a MigrationError."""
    if frame.type in kinds:
        return frame
    if frame.type is MessageType.ERROR:
        raise MigrationError("peer", str(frame.json().get("reason", "the peer reported an error")))
    raise MigrationError("stream", f"unexpected {frame.type.name} message (wanted {', '.join(k.name for k in kinds)})")
