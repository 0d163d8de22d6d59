"""Every frame type fuzzed against its receiver: success or MigrationError, bounded memory, no hang."""

from __future__ import annotations

import json
import socket
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lz4.block
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyrovisor.config import MachineConfig
from pyrovisor.errors import MigrationError
from pyrovisor.memory import GuestMemory, MemoryRegion
from pyrovisor.migration.auth import authenticate_destination
from pyrovisor.migration.destination import Hello, Incoming, read_stopped
from pyrovisor.migration.pages import PageReceiver
from pyrovisor.migration.protocol import (
    FRAME,
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
from pyrovisor.migration.source import read_resumed, read_welcome
from pyrovisor.persist.codec import encode

ALLOCATION_LIMIT = 64 << 20
TIME_LIMIT_S = 5.0
MEMORY = 2 << 20
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.data_too_large])


def frame(kind: MessageType | int, covered: bytes, data: bytes = b"", sequence: int = 1, role: Role = Role.SOURCE,
          covered_length: int | None = None) -> bytes:
    length = len(covered) + len(data)
    prefix = PREFIX.pack(MAGIC, 2, int(kind), length, sequence, len(covered) if covered_length is None else covered_length)
    return prefix + Integrity().frame_tag(role, prefix, (covered,)) + covered + data


def deliver(stream: bytes, consume: Callable[[Connection], object], role: Role = Role.DESTINATION) -> None:
    """`stream` into one end of a socketpair, then end-of-stream; `consume` reads the other end as `role`."""
    left, right = socket.socketpair()
    right.settimeout(2 * TIME_LIMIT_S)

    def write() -> None:
        try:
            left.sendall(stream)
            left.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the consumer gave up and closed first

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    started = time.monotonic()
    tracemalloc.start()
    try:
        consume(Connection(right, role))
    except MigrationError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        right.close()
        writer.join(TIME_LIMIT_S)
        left.close()
    assert peak < ALLOCATION_LIMIT, f"{peak >> 20} MiB allocated"
    assert time.monotonic() - started < TIME_LIMIT_S, "the receiver hung"


# --- documents -------------------------------------------------------------------------------------------------
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=25,
)
REMOVE = object()


def documents(base: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """Payloads near `base`: it with a field changed, removed or added; any JSON object; any bytes."""
    keys = st.sampled_from([*sorted(base), "unexpected"])

    def change(item: tuple[str, Any]) -> bytes:
        key, value = item
        document = dict(base)
        if value is REMOVE:
            document.pop(key, None)
        else:
            document[key] = value
        return json.dumps(document).encode()

    return st.one_of(
        st.just(json.dumps(base).encode()),
        st.tuples(keys, JSON_VALUES | st.just(REMOVE)).map(change),
        st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=6).map(lambda d: json.dumps(d).encode()),
        JSON_VALUES.map(lambda value: json.dumps(value).encode()),
        st.binary(max_size=300),
        st.sampled_from([b"[" * 50_000, b'{"a":' + b"1" * 5000 + b"}", b"\xff\xfe{}", b"{" * 3000]),
    )


def hello_document() -> dict[str, Any]:
    config = MachineConfig(kernel=Path("/nonexistent/os.elf"), memory_size=MEMORY, huge_pages=False)
    return {"protocol": "pyrovisor-migration", "version": 2, "pyrovisor": "fuzz", "source": "fuzz", "pid": 1,
            "page_size": PAGE_SIZE, "config": encode(config), "ram": [[0, MEMORY]],
            "cpuid": [[1, 0, 0, 0, 0, 0, 1]], "tsc_khz": 1000}


HELLO_FRAME = frame(MessageType.HELLO, json.dumps(hello_document()).encode())


def accept_anything(hello: Hello) -> None:
    return None


def after_hello(connection: Connection) -> None:
    """The destination from a valid HELLO on: page rounds up to STATE."""
    incoming = Incoming(connection, check_host=accept_anything)
    try:
        incoming.handshake()
        incoming.receive_memory()
    finally:
        incoming.close()


def with_damage(stream: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Streams from `stream`, sometimes cut short or with a byte changed (header or payload)."""

    def damage(item: tuple[bytes, int, int, int]) -> bytes:
        data, how, position, value = item
        if not data or how == 0:
            return data
        position %= len(data)
        if how == 1:
            return data[:position]
        changed = bytearray(data)
        changed[position] ^= value or 1
        return bytes(changed)

    return st.tuples(stream, st.integers(0, 3), st.integers(0, 1 << 20), st.integers(0, 255)).map(damage)


# --- control messages -----------------------------------------------------------------------------------------
@FUZZ
@given(payload=documents(hello_document()))
def test_hello(payload: bytes) -> None:
    def consume(connection: Connection) -> None:
        incoming = Incoming(connection, check_host=accept_anything)
        try:
            incoming.handshake()
        finally:
            incoming.close()

    deliver(frame(MessageType.HELLO, payload), consume)


@FUZZ
@given(payload=documents({"protocol": "pyrovisor-migration", "version": 2, "auth": "psk", "nonce": "ab" * 32}),
       then=documents({"proof": "cd" * 32}), keyed=st.booleans())
def test_auth(payload: bytes, then: bytes, keyed: bool) -> None:
    stream = frame(MessageType.AUTH, payload) + frame(MessageType.AUTH, then, sequence=2)
    deliver(stream, lambda connection: authenticate_destination(connection, b"k" * 32 if keyed else None))


@FUZZ
@given(payload=documents({"accepted": True}), stream=with_damage(st.just(b"")))
def test_welcome(payload: bytes, stream: bytes) -> None:
    deliver(frame(MessageType.WELCOME, payload, role=Role.DESTINATION) + stream, read_welcome, Role.SOURCE)


@FUZZ
@given(stream=with_damage(st.tuples(
    documents({"round": 0, "rewritten": [[0, 1], [5, 2]]}), st.integers(0, 2)).map(
    lambda item: frame(MessageType.ROUND_END, item[0], sequence=2) + frame(MessageType.ROUND_END, item[0], sequence=3)
    if item[1] == 2 else frame(MessageType.ROUND_END, item[0], sequence=2))))
def test_round_end(stream: bytes) -> None:
    deliver(HELLO_FRAME + stream, after_hello)


@FUZZ
@given(stream=with_damage(documents({"round": 0, "rewritten": [[0, 1]]}).map(
    lambda payload: frame(MessageType.DIRTIED, payload, sequence=2))))
def test_dirtied(stream: bytes) -> None:
    deliver(HELLO_FRAME + stream, after_hello)


@FUZZ
@given(stream=with_damage(documents({"machine": {"config": hello_document()["config"]}, "paused_at": 1.5,
                                     "memory_sha256": None}).map(
    lambda payload: frame(MessageType.STATE, payload, sequence=2))))
def test_state(stream: bytes) -> None:
    deliver(HELLO_FRAME + stream, after_hello)


@FUZZ
@given(stream=with_damage(documents({"resumed_at": 1.5, "memory_sha256": "0" * 64}).map(
    lambda payload: frame(MessageType.RESUMED, payload, role=Role.DESTINATION))))
def test_resumed(stream: bytes) -> None:
    deliver(stream, read_resumed, Role.SOURCE)


@FUZZ
@given(stream=with_damage(documents({"stopped": True}).map(lambda payload: frame(MessageType.STOPPED, payload))))
def test_stopped(stream: bytes) -> None:
    deliver(stream, read_stopped)


@FUZZ
@given(payload=documents({"reason": "the peer gave up"}), side=st.sampled_from(["source", "destination", "pages"]))
def test_error(payload: bytes, side: str) -> None:
    """An ERROR frame wherever the other side may send one: always a MigrationError, never a success."""
    if side == "source":
        consume, role, stream = read_welcome, Role.SOURCE, frame(MessageType.ERROR, payload, role=Role.DESTINATION)
    elif side == "destination":
        consume, role, stream = after_hello, Role.DESTINATION, frame(MessageType.ERROR, payload)
    else:
        consume, role, stream = after_hello, Role.DESTINATION, HELLO_FRAME + frame(MessageType.ERROR, payload, sequence=2)

    def must_fail(connection: Connection) -> None:
        consume(connection)
        pytest.fail("an ERROR frame was accepted")

    deliver(stream, must_fail, role)


@FUZZ
@given(garbage=st.one_of(
    st.binary(max_size=200),
    st.builds(lambda fields, tail: FRAME.pack(*fields) + tail,
              st.tuples(st.sampled_from([MAGIC, b"PYRX"]), st.sampled_from([2, 1, 65535]), st.integers(0, 65535),
                        st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                        st.binary(min_size=16, max_size=16)),
              st.binary(max_size=200))),
    after=st.booleans())
def test_garbage_header(garbage: bytes, after: bool) -> None:
    if after:
        deliver(HELLO_FRAME + garbage, after_hello)
    else:
        deliver(garbage, lambda connection: Incoming(connection, check_host=accept_anything).handshake())


# --- page frames ----------------------------------------------------------------------------------------------
def compress(encoding: int, data: bytes) -> bytes:
    if encoding == Encoding.LZ4:
        return bytes(lz4.block.compress(data, store_size=False))
    if encoding == Encoding.ZSTD:
        return zstandard.ZstdCompressor(level=1).compress(data)
    return data


@st.composite
def page_frames(draw: st.DrawFn, encoding: Encoding) -> bytes:
    """One to three PAGES frames of `encoding`, mostly valid, with fields, digests or data changed at random."""
    frames = []
    for sequence in range(1, draw(st.integers(1, 3)) + 1):
        count = draw(st.integers(1, 4) | st.integers(0, 2**32 - 1))
        first = draw(st.integers(0, MEMORY // PAGE_SIZE - 1))
        gpa = draw(st.just(first * PAGE_SIZE) | st.integers(0, 2**64 - 1))
        kind = draw(st.just(int(encoding)) | st.integers(0, 255))
        digest_size = draw(st.just(4) | st.integers(0, 255))
        pages = b"".join(bytes([draw(st.integers(0, 255))]) * PAGE_SIZE for _ in range(min(count, 4)))
        table = b"".join(zlib.crc32(pages[offset:offset + PAGE_SIZE]).to_bytes(4, "little")
                         for offset in range(0, len(pages), PAGE_SIZE))
        table = draw(st.just(table) | st.binary(max_size=40))
        data = compress(encoding, pages) if encoding != Encoding.ZERO else b""
        data = draw(st.just(data) | st.binary(max_size=64) | st.just(data[:len(data) // 2]) | st.just(data + b"x"))
        header = PAGES.pack(gpa, count, kind, digest_size)
        covered = header + (table if encoding != Encoding.ZERO or draw(st.booleans()) else b"")
        covered_length = draw(st.none() | st.integers(0, 5000))
        frames.append(frame(MessageType.PAGES, covered, data, sequence, covered_length=covered_length))
    return draw(with_damage(st.just(b"".join(frames))))


def apply_pages(connection: Connection) -> None:
    memory = GuestMemory([MemoryRegion.anonymous(0, MEMORY, huge_pages=False)])
    try:
        receiver = PageReceiver(memory, connection)
        try:
            while True:
                header = connection.receive_header()
                if header.type is not MessageType.PAGES:
                    break
                receiver.receive(header)
        except MigrationError as exc:
            if "closed by the peer" not in str(exc):
                raise
        receiver.end_round()
        receiver.finish()
    finally:
        memory.close()  # raises if a view of it leaked


@pytest.mark.parametrize("encoding", list(Encoding), ids=[encoding.name for encoding in Encoding])
def test_pages(encoding: Encoding) -> None:
    @FUZZ
    @given(stream=page_frames(encoding))
    def fuzz(stream: bytes) -> None:
        deliver(stream, apply_pages)

    fuzz()
