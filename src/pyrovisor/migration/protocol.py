"""The migration stream (protocol 2): versioned, sequenced frames whose headers a CRC-32 or a session MAC checks."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import socket
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from pyrovisor.errors import MigrationError, PyrovisorError, StateError
from pyrovisor.persist.json_document import parse_json_object

# A frame is a 36-byte header, then `length` bytes of payload. The first `covered` bytes of the payload
# (all of it for control messages; the PAGES header and the per-page digest table for page frames) are
# checked by the header's 16-byte tag together with the header's first 20 bytes: CRC-32 (4 bytes, then
# zeros) without a pre-shared key, HMAC-SHA256 truncated to 16 bytes under the session key with one.
# Page data after the covered part is checked page by page against the digest table (pages.py).
MAGIC = b"PYRM"
PROTOCOL_NAME = "pyrovisor-migration"
PROTOCOL_VERSION = 2
PREFIX = struct.Struct("<4sHHIII")  # magic, version, type, payload length, sequence, covered length
TAG_SIZE = 16
FRAME = struct.Struct(f"<4sHHIII{TAG_SIZE}s")  # the prefix, then the tag
PAGES = struct.Struct("<QIBB2x")  # first guest physical address, page count, encoding, digest size
PAGE_SIZE = 4096
MAX_RUN_PAGES = 256  # pages in one PAGES frame: 1 MiB of data
MAX_DIGEST_SIZE = 16
MAX_PAYLOAD = 8 << 20  # any frame; a control message is parsed whole, so this bounds what parsing allocates
MAX_PAGES_COVERED = PAGES.size + MAX_RUN_PAGES * MAX_DIGEST_SIZE
MAX_PAGES_DATA = MAX_RUN_PAGES * PAGE_SIZE
PEER_TEXT_LIMIT = 300  # characters of a peer's reason or name shown to the user


class MessageType(IntEnum):
    HELLO = 1  # source → destination: who we are, the machine's shape, the CPU it saw (JSON)
    WELCOME = 2  # destination → source: accepted, or refused with a reason (JSON)
    PAGES = 3  # source → destination: a run of guest pages with a digest per page
    ROUND_END = 4  # source → destination: end of a round; pages of it rewritten after they were read (JSON)
    STATE = 5  # source → destination: the machine state, after the last pages (JSON)
    RESUMED = 6  # destination → source: the guest runs on the destination (JSON)
    STOPPED = 7  # source → destination: the source has stopped; the destination owns the guest (JSON)
    ERROR = 8  # either way: the sender gives up, with a reason (JSON)
    AUTH = 9  # both ways, before HELLO: the authentication mode, nonces and proofs (JSON)
    DIRTIED = 10  # source → destination: more rewritten pages of this round, before its ROUND_END (JSON)


class Encoding(IntEnum):
    RAW = 0
    ZERO = 1
    LZ4 = 2
    ZSTD = 3


class Role(IntEnum):
    """Which end sends a frame: part of what a frame's MAC covers, so frames cannot be reflected."""

    SOURCE = 0
    DESTINATION = 1

    @property
    def peer(self) -> Role:
        return Role.DESTINATION if self is Role.SOURCE else Role.SOURCE


Buffer = bytes | bytearray | memoryview


class Integrity:
    """Frame tags and page digests without a key: CRC-32, which catches damage in transit, not forgery."""

    name = "checksum"
    digest_size = 4

    def frame_tag(self, role: Role, prefix: bytes, covered: Sequence[Buffer]) -> bytes:
        crc = zlib.crc32(prefix)
        for part in covered:
            crc = zlib.crc32(part, crc)
        return crc.to_bytes(4, "little") + bytes(TAG_SIZE - 4)

    def page_digests(self, data: Buffer) -> bytes:
        """One digest per 4 KiB page of `data`, concatenated."""
        with memoryview(data) as view:
            crcs = [zlib.crc32(view[offset:offset + PAGE_SIZE]) for offset in range(0, len(view), PAGE_SIZE)]
        return struct.pack(f"<{len(crcs)}I", *crcs)


@dataclass(frozen=True)
class SessionKeys:
    """Keys derived from the pre-shared key and both nonces (auth.py): one per direction, one for pages."""

    source_frames: bytes
    destination_frames: bytes
    pages: bytes


class KeyedIntegrity(Integrity):
    """Frame tags by HMAC-SHA256 and page digests by keyed BLAKE2b (16 bytes), under a session's keys."""

    name = "authentication"
    digest_size = 16

    def __init__(self, keys: SessionKeys) -> None:
        self._frames = {Role.SOURCE: hmac.new(keys.source_frames, digestmod=hashlib.sha256),
                        Role.DESTINATION: hmac.new(keys.destination_frames, digestmod=hashlib.sha256)}
        self._pages = hashlib.blake2b(key=keys.pages, digest_size=self.digest_size)

    def frame_tag(self, role: Role, prefix: bytes, covered: Sequence[Buffer]) -> bytes:
        mac = self._frames[role].copy()
        mac.update(prefix)
        for part in covered:
            mac.update(part)
        return mac.digest()[:TAG_SIZE]

    def page_digests(self, data: Buffer) -> bytes:
        digests = []
        with memoryview(data) as view:
            for offset in range(0, len(view), PAGE_SIZE):
                page = self._pages.copy()
                page.update(view[offset:offset + PAGE_SIZE])
                digests.append(page.digest())
        return b"".join(digests)


@dataclass(frozen=True)
class Header:
    """A frame's header, checked for shape; its tag is checked with the covered payload."""

    type: MessageType
    length: int
    sequence: int
    covered: int
    tag: bytes
    prefix: bytes

    @property
    def data_length(self) -> int:
        return self.length - self.covered


@dataclass(frozen=True)
class Frame:
    type: MessageType
    sequence: int
    payload: bytes | bytearray | memoryview

    def json(self) -> dict[str, Any]:
        try:
            return parse_json_object(self.payload, f"{self.type.name} message")
        except StateError as exc:
            raise MigrationError("stream", str(exc)) from None


class Connection:
    """Frames over a connected stream socket, as `role`. Counts bytes in each direction; frames must arrive
    numbered 1, 2, 3... and pass their tag check."""

    def __init__(self, sock: socket.socket, role: Role = Role.SOURCE) -> None:
        self.sock = sock
        self.role = role
        self.integrity = Integrity()
        self.sequence = 0  # of the last frame sent
        self.received = 0  # sequence of the last frame received
        self.bytes_sent = 0
        self.bytes_received = 0
        self._header = bytearray(FRAME.size)

    def use_keys(self, keys: SessionKeys) -> None:
        """From now on, tag frames with HMAC-SHA256 and digest pages with keyed BLAKE2b."""
        self.integrity = KeyedIntegrity(keys)

    # --- sending ----------------------------------------------------------------------------------
    def send(self, kind: MessageType, *covered: Buffer, data: Sequence[Buffer] = ()) -> int:
        """Send one frame: the `covered` parts, checked by the tag, then `data` (page data, which carries its
        own per-page digests). Scatter-gather: guest memory is never copied. Returns the frame's sequence."""
        covered_length = sum(len(part) for part in covered)
        length = covered_length + sum(len(part) for part in data)
        if length > MAX_PAYLOAD:
            raise MigrationError("stream", f"frame of {length} bytes exceeds {MAX_PAYLOAD}")
        self.sequence += 1
        prefix = PREFIX.pack(MAGIC, PROTOCOL_VERSION, int(kind), length, self.sequence, covered_length)
        tag = self.integrity.frame_tag(self.role, prefix, covered)
        self._send_all([prefix, tag, *covered, *data])
        return self.sequence

    def send_json(self, kind: MessageType, document: dict[str, Any]) -> int:
        return self.send(kind, json.dumps(document, separators=(",", ":"), allow_nan=False).encode())

    def _send_all(self, buffers: list[Buffer]) -> None:
        views = [memoryview(buffer).cast("B") for buffer in buffers if len(buffer)]
        try:
            while views:
                sent = self.sock.sendmsg(views)
                self.bytes_sent += sent
                while sent:
                    if sent >= len(views[0]):
                        sent -= len(views[0])
                        views.pop(0).release()
                    else:
                        rest = views[0][sent:]
                        views[0].release()
                        views[0] = rest
                        sent = 0
        except OSError as exc:
            raise MigrationError("stream", f"connection lost while sending ({exc.strerror or exc})") from None
        finally:
            for view in views:  # views of guest memory must not outlive the call, even on failure
                view.release()

    # --- receiving --------------------------------------------------------------------------------
    def receive_header(self) -> Header:
        """The next frame's header; refuses anything malformed, oversized or out of order."""
        self.receive_into(self._header)
        magic, version, kind, length, sequence, covered, tag = FRAME.unpack(self._header)
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
        if sequence != self.received + 1:
            raise MigrationError("stream", f"{message_type.name} frame numbered {sequence} where frame "
                                 f"{self.received + 1} was due: frames lost, repeated or reordered")
        if message_type is MessageType.PAGES:
            if not PAGES.size <= covered <= min(length, MAX_PAGES_COVERED) or length - covered > MAX_PAGES_DATA:
                raise MigrationError("stream", f"malformed PAGES frame {sequence}: {covered} checked bytes of "
                                     f"{length}")
        elif covered != length:
            raise MigrationError("stream", f"malformed {message_type.name} frame {sequence}: only {covered} of its "
                                 f"{length} bytes are checked")
        self.received = sequence
        return Header(message_type, length, sequence, covered, tag, bytes(self._header[:PREFIX.size]))

    def receive_covered(self, header: Header) -> bytearray:
        """The checked part of a frame's payload, into a new buffer; the frame's tag must match it."""
        payload = bytearray(header.covered)
        self.receive_into(payload)
        expected = self.integrity.frame_tag(self.role.peer, header.prefix, (payload,))
        if not hmac.compare_digest(expected, header.tag):
            if isinstance(self.integrity, KeyedIntegrity):
                raise MigrationError("stream", f"{header.type.name} frame {header.sequence} fails authentication: "
                                     "the peer does not hold the same pre-shared key, or the stream was altered")
            raise MigrationError("stream", f"checksum mismatch in {header.type.name} frame {header.sequence}")
        return payload

    def receive(self) -> Frame:
        """The next control message (not PAGES), its tag checked."""
        return self.receive_frame(self.receive_header())

    def receive_frame(self, header: Header) -> Frame:
        """The control message whose header was just read, its tag checked."""
        if header.type is MessageType.PAGES:
            raise MigrationError("stream", f"unexpected PAGES frame {header.sequence}")
        return Frame(header.type, header.sequence, self.receive_covered(header))

    def receive_into(self, buffer: Buffer) -> None:
        """Fill `buffer` from the socket. Every view taken here is released before returning or raising, so
        guest memory received into can be unmapped whatever happened."""
        with memoryview(buffer) as outer, outer.cast("B") as view:
            position = 0
            try:
                while position < len(view):
                    with view[position:] as rest:
                        count = self.sock.recv_into(rest)
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
            for _ in range(64):
                frame = self.receive()
                if frame.type is MessageType.ERROR:
                    return error_reason(frame)
        except (MigrationError, OSError):
            pass
        return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def peer_text(text: str, limit: int = PEER_TEXT_LIMIT) -> str:
    """Text a peer sent, safe to show on one line: printable characters only, at most `limit` of them."""
    cleaned = "".join(char if char.isprintable() else " " for char in text[:limit])
    return cleaned + ("..." if len(text) > limit else "")


def error_reason(frame: Frame) -> str:
    """The reason an ERROR frame gives (a malformed one still ends the migration)."""
    try:
        reason = frame.json().get("reason")
    except MigrationError:
        return "the peer reported an error (malformed ERROR message)"
    return peer_text(reason) if isinstance(reason, str) else "the peer reported an error"


def send_error(connection: Connection, side: str, error: BaseException) -> None:
    """Tell the peer why `side` gives up, in one line (best effort: the connection may be gone)."""
    if isinstance(error, MigrationError):
        reason = f"{side} failed during {error.phase}: {error.reason}"
    elif isinstance(error, PyrovisorError):
        reason = f"{side}: {error}"
    elif isinstance(error, Exception):
        reason = f"{side}: internal error: {error!r}"
    else:
        reason = f"{side}: interrupted"
    with contextlib.suppress(PyrovisorError):
        connection.send_json(MessageType.ERROR, {"reason": reason})


def expect(frame: Frame, *kinds: MessageType) -> Frame:
    """`frame` if it has one of `kinds`; an ERROR frame or anything else becomes a MigrationError."""
    if frame.type in kinds:
        return frame
    if frame.type is MessageType.ERROR:
        raise MigrationError("transfer", error_reason(frame))
    raise MigrationError("stream", f"unexpected {frame.type.name} message (wanted {', '.join(k.name for k in kinds)})")
