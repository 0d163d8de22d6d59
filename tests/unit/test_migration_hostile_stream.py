"""Hostile or broken streams against the receiver, without KVM: decompression bombs, cut frames, bad JSON."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lz4.block
import pytest
import zstandard

from pyrovisor.config import MachineConfig
from pyrovisor.errors import MigrationError
from pyrovisor.memory import GuestMemory, MemoryRegion
from pyrovisor.migration.auth import authenticate_source
from pyrovisor.migration.destination import Hello, Incoming, receive
from pyrovisor.migration.pages import PageReceiver
from pyrovisor.migration.protocol import (
    MAGIC,
    PAGE_SIZE,
    PAGES,
    PREFIX,
    Connection,
    Encoding,
    Integrity,
    MessageType,
    Role,
)
from pyrovisor.persist.codec import encode

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
BOUND = 8 << 20  # what receiving one page frame may allocate, at most


def zstd_block(last: bool, kind: int, size: int) -> bytes:
    """A zstd block header (RFC 8878 3.1.1.2): last-block flag, type (1: RLE), size."""
    return (int(last) | kind << 1 | size << 3).to_bytes(3, "little")


# 17 bytes: a single-segment frame declaring 1 TiB of content, one RLE block of one byte.
ZSTD_CLAIMS_A_TIB = ZSTD_MAGIC + bytes([0xE0]) + (1 << 40).to_bytes(8, "little") + zstd_block(True, 1, 1) + b"\0"
# 32 KiB: a frame declaring 1 GiB that really holds it, 8192 RLE blocks of 128 KiB of zeros.
ZSTD_BALLOONS_TO_A_GIB = (ZSTD_MAGIC + bytes([0xA0]) + (1 << 30).to_bytes(4, "little")
                          + b"".join(zstd_block(index == 8191, 1, 1 << 17) + b"\0" for index in range(8192)))


def frame(kind: MessageType, covered: bytes, data: bytes = b"", sequence: int = 1, role: Role = Role.SOURCE) -> bytes:
    prefix = PREFIX.pack(MAGIC, 2, int(kind), len(covered) + len(data), sequence, len(covered))
    return prefix + Integrity().frame_tag(role, prefix, (covered,)) + covered + data


def compressed_frame(encoding: Encoding, data: bytes, pages: int = 1, digests: bytes | None = None) -> bytes:
    header = PAGES.pack(0, pages, encoding, 4)
    return frame(MessageType.PAGES, header + (digests if digests is not None else bytes(4 * pages)), data)


@contextlib.contextmanager
def allocation_limit(limit: int = BOUND) -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < limit, f"receiving allocated {peak >> 20} MiB"


@pytest.fixture
def receiver_side():
    left, right = socket.socketpair()
    right.settimeout(10)
    memory = GuestMemory([MemoryRegion.anonymous(0, 2 << 20)])
    yield left, PageReceiver(memory, Connection(right, Role.DESTINATION))
    memory.close()
    left.close()
    right.close()


def one_page_zstd_then(blocks: int) -> bytes:
    """A frame declaring one page (a 2-byte size field holds the size less 256), then `blocks` pages of blocks."""
    descriptor = (1 << 6) | (1 << 5)  # size field of 2 bytes, single segment
    return (ZSTD_MAGIC + bytes([descriptor]) + (PAGE_SIZE - 256).to_bytes(2, "little")
            + b"".join(zstd_block(index == blocks - 1, 1, PAGE_SIZE) + b"\0" for index in range(blocks)))


@pytest.mark.parametrize("data, pages, reason", [
    (ZSTD_CLAIMS_A_TIB, 1, "zstd frame declares 1099511627776 bytes, the frame header 4096"),
    (ZSTD_BALLOONS_TO_A_GIB, 9, "zstd frame declares 1073741824 bytes, the frame header 36864"),
    (one_page_zstd_then(1000), 1, "cannot decompress"),  # an honest size in the header, 4 MB of blocks behind it
    (zstandard.ZstdCompressor().compress(bytes(PAGE_SIZE)) * 2, 1, "cannot decompress"),  # a second frame
    (zstandard.ZstdCompressor().compress(bytes(PAGE_SIZE)) + b"junk", 1, "cannot decompress"),  # trailing data
    (zstandard.ZstdCompressor(write_content_size=False).compress(bytes(PAGE_SIZE)), 1, "declares no size"),
    (b"\0" * 64, 1, "cannot decompress"),
], ids=["claims-1TiB", "balloons-to-1GiB", "more-than-declared", "two-frames", "trailing-data", "no-size",
        "garbage"])
def test_zstd_is_bounded_by_the_announced_page_count(receiver_side, data: bytes, pages: int, reason: str) -> None:
    """Before protocol 2 the first frame raised MemoryError and the second allocated 1 GiB."""
    sender, receiver = receiver_side
    threading.Thread(target=sender.sendall, args=(compressed_frame(Encoding.ZSTD, data, pages),), daemon=True).start()
    with allocation_limit(), pytest.raises(MigrationError, match=reason):
        receiver.receive(receiver.connection.receive_header())


@pytest.mark.parametrize("data", [
    lz4.block.compress(bytes(1 << 20), store_size=False),  # a whole MiB where one page is announced
    lz4.block.compress(bytes(PAGE_SIZE // 2), store_size=False),  # less than announced
    b"\xff" * 64,
], ids=["expands-past-the-pages", "too-short", "garbage"])
def test_lz4_is_bounded_by_the_announced_page_count(receiver_side, data: bytes) -> None:
    sender, receiver = receiver_side
    sender.sendall(compressed_frame(Encoding.LZ4, data))
    with allocation_limit(), pytest.raises(MigrationError, match="PAGES frame 1"):
        receiver.receive(receiver.connection.receive_header())


def test_a_valid_compressed_frame_still_arrives(receiver_side) -> None:
    sender, receiver = receiver_side
    page = bytes(range(256)) * 16
    digest = zlib.crc32(page).to_bytes(4, "little")
    sender.sendall(compressed_frame(Encoding.ZSTD, zstandard.ZstdCompressor().compress(page), digests=digest))
    receiver.receive(receiver.connection.receive_header())
    receiver.finish()
    assert receiver.memory.read(0, PAGE_SIZE) == page


# --- the destination's stream, over real sockets --------------------------------------------------------------
def hello_document(memory: int = 2 << 20, **changes: Any) -> dict[str, Any]:
    config = MachineConfig(kernel=Path("/nonexistent/os.elf"), memory_size=memory, huge_pages=False)
    document = {"protocol": "pyrovisor-migration", "version": 2, "pyrovisor": "test", "source": "test", "pid": 1,
                "page_size": PAGE_SIZE, "config": encode(config), "ram": [[0, memory]], "cpuid": [], "tsc_khz": 0}
    document.update(changes)
    return document


def accept_anything(hello: Hello) -> None:
    return None


class FakeSource:
    """The source's side of the stream, driven by a test, against `receive()` in a thread."""

    def __init__(self, tmp_path: Path, psk: bytes | None = None) -> None:
        self.address = tmp_path / "migrate.sock"
        self.outcome: dict[str, BaseException | None] = {}
        listening = threading.Event()
        self.thread = threading.Thread(target=self._receive, args=(psk, listening.set), daemon=True)
        self.thread.start()
        assert listening.wait(10)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(self.address))
        self.connection = Connection(sock, Role.SOURCE)

    def _receive(self, psk: bytes | None, listening: Callable[[], None]) -> None:
        try:
            receive(f"unix:{self.address}", lambda data: None, accept_timeout=10, io_timeout_s=10, psk=psk,
                    on_listening=listening, check_host=accept_anything)
            self.outcome["error"] = None
        except BaseException as exc:
            self.outcome["error"] = exc

    def error(self) -> BaseException | None:
        self.thread.join(20)
        assert not self.thread.is_alive()
        return self.outcome["error"]


def test_a_cut_inside_a_page_frame_is_reported_as_it_is(tmp_path: Path) -> None:
    """A stream cut while raw pages are being received into guest memory: the destination's error is the cut
    itself, not a failure to unmap memory that a traceback still held views of."""
    source = FakeSource(tmp_path)
    authenticate_source(source.connection, None)
    source.connection.send_json(MessageType.HELLO, hello_document())
    assert source.connection.receive().json()["accepted"] is True
    pages = bytes(range(256)) * 16 * 8
    whole = frame(MessageType.PAGES, PAGES.pack(0, 8, Encoding.RAW, 4) + bytes(32), pages, sequence=3)
    source.connection.sock.sendall(whole[:len(whole) - 5000])
    source.connection.close()
    error = source.error()
    assert isinstance(error, MigrationError) and str(error) == ("migration failed during stream: connection closed by "
                                                               "the peer"), repr(error)


def test_incoming_memory_is_unmapped_after_a_cut_page_frame() -> None:
    left, right = socket.socketpair()
    right.settimeout(10)
    incoming = Incoming(Connection(right, Role.DESTINATION), check_host=accept_anything)
    body = frame(MessageType.HELLO, json.dumps(hello_document()).encode())
    left.sendall(body + frame(MessageType.PAGES, PAGES.pack(0, 8, Encoding.RAW, 4) + bytes(32), bytes(8 * PAGE_SIZE),
                              sequence=2)[:-100])
    left.shutdown(socket.SHUT_WR)
    incoming.handshake()
    memory = incoming.memory
    assert memory is not None
    with pytest.raises(MigrationError, match="closed by the peer"):
        incoming.receive_memory()
    incoming.close()
    assert all(region.closed for region in memory.regions), "the guest memory was unmapped"
    left.close()
    right.close()


def test_the_destinations_error_reaches_the_source(tmp_path: Path) -> None:
    source = FakeSource(tmp_path)
    authenticate_source(source.connection, None)
    source.connection.send_json(MessageType.HELLO, hello_document())
    source.connection.receive()
    source.connection.send(MessageType.PAGES, PAGES.pack(64 << 20, 1, Encoding.RAW, 4), bytes(4),
                           data=(bytes(PAGE_SIZE),))
    reply = source.connection.receive()
    assert reply.type is MessageType.ERROR
    reason = reply.json()["reason"]
    assert reason == ("destination failed during stream: PAGES frame 3: 1 pages at 0x4000000 lie outside guest RAM "
                      "(2 MiB)"), reason
    assert isinstance(source.error(), MigrationError)


NESTED = b"[" * 100_000 + b"]" * 100_000
HUGE_INTEGER = b'{"round": ' + b"9" * 5000 + b"}"
WRONG_TYPES = b'{"round": 0, "rewritten": {"a": 1}, "machine": [], "config": 7}'


@pytest.mark.parametrize("kind", [MessageType.HELLO, MessageType.ROUND_END, MessageType.STATE])
@pytest.mark.parametrize("payload, reason", [
    (NESTED, "nested too deeply|not valid JSON"),
    (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply|not valid JSON"),
    (HUGE_INTEGER, "digits"),
    (b"[1, 2]", "expected a JSON object"),
    (b"\xff\xfe", "UTF-8"),
    (WRONG_TYPES, "malformed|expected|must|not match|for round"),
], ids=["deep", "deep-inside", "huge-integer", "array", "not-utf8", "wrong-types"])
def test_hostile_json_is_a_migration_error(kind: MessageType, payload: bytes, reason: str) -> None:
    left, right = socket.socketpair()
    right.settimeout(10)
    incoming = Incoming(Connection(right, Role.DESTINATION), check_host=accept_anything)
    frames = b"" if kind is MessageType.HELLO else frame(MessageType.HELLO, json.dumps(hello_document()).encode())
    if kind is MessageType.HELLO and payload == WRONG_TYPES:  # wrong types, in an otherwise valid HELLO
        payload = json.dumps(hello_document(config={"kernel": 7}, tsc_khz="fast")).encode()
    left.sendall(frames + frame(kind, payload, sequence=1 if kind is MessageType.HELLO else 2))
    left.shutdown(socket.SHUT_WR)
    try:
        with pytest.raises(MigrationError, match=reason):
            incoming.handshake()
            incoming.receive_memory()
    finally:
        incoming.close()
        left.close()
        right.close()
