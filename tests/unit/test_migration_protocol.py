"""The migration stream and policy without KVM: framing, refusals, page runs, excuses, decisions."""

from __future__ import annotations

import socket
import time
import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyrovisor.errors import ConfigError, MigrationError
from pyrovisor.memory import GuestMemory, MemoryRegion
from pyrovisor.migration.address import parse_address
from pyrovisor.migration.pages import (
    MAX_RUN_PAGES,
    PageReceiver,
    PageSender,
    SendTally,
    excused_frames,
    page_runs,
)
from pyrovisor.migration.policy import Action, PrecopyPolicy, RoundStats
from pyrovisor.migration.protocol import FRAME, MAGIC, Connection, MessageType
from pyrovisor.migration.rate import RateLimiter


@pytest.fixture
def pair():
    left, right = socket.socketpair()
    yield Connection(left), Connection(right)
    left.close()
    right.close()


def test_json_message_round_trip(pair) -> None:
    sender, receiver = pair
    sender.send_json(MessageType.HELLO, {"version": 1, "ram": [[0, 4096]]})
    frame = receiver.receive()
    assert frame.type is MessageType.HELLO and frame.json() == {"version": 1, "ram": [[0, 4096]]}
    assert receiver.bytes_received == sender.bytes_sent


@pytest.mark.parametrize("header, message", [
    (FRAME.pack(b"HTTP", 1, 1, 0, 1, 0), "bad magic"),
    (FRAME.pack(MAGIC, 2, 1, 0, 1, 0), "protocol version 2 is not supported"),
    (FRAME.pack(MAGIC, 1, 99, 0, 1, 0), "unknown message type 99"),
    (FRAME.pack(MAGIC, 1, 1, 1 << 30, 1, 0), "exceeds"),
])
def test_malformed_frames_are_refused(pair, header: bytes, message: str) -> None:
    sender, receiver = pair
    sender.sock.sendall(header)
    with pytest.raises(MigrationError, match=message):
        receiver.receive()


def test_corrupt_payload_and_cut_stream_are_detected(pair) -> None:
    sender, receiver = pair
    payload = b'{"a": 1}'
    sender.sock.sendall(FRAME.pack(MAGIC, 1, int(MessageType.ROUND_END), len(payload), 1, zlib.crc32(payload) ^ 1) + payload)
    with pytest.raises(MigrationError, match="checksum mismatch"):
        receiver.receive()
    sender.sock.sendall(FRAME.pack(MAGIC, 1, int(MessageType.ROUND_END), 100, 2, 0) + b"short")
    sender.sock.close()
    with pytest.raises(MigrationError, match="closed by the peer"):
        receiver.receive()


def test_pages_travel_with_zero_runs_and_compression(pair) -> None:
    sender, receiver = pair
    source = GuestMemory([MemoryRegion.anonymous(0, 2 << 20)])
    target = GuestMemory([MemoryRegion.anonymous(0, 2 << 20)])
    target.write(0x5000, b"stale")  # a page that became zero at the source must be cleared
    source.write(0x1000, b"A" * 4096)
    source.write(0x3000, bytes(range(256)) * 16)
    for compression in (None, "lz4", "zstd"):
        tally = SendTally()
        PageSender(source, sender, RateLimiter(None), compression).send(np.arange(0, 8), tally)
        assert tally.pages == 8 and tally.zero_pages == 6
        incoming = PageReceiver(target, receiver)
        for _ in tally.frames:
            incoming.receive(*receiver.receive_header()[1:])
        incoming.settle(set())
        assert target.read(0, 8 * 4096) == source.read(0, 8 * 4096)


def test_pages_outside_guest_ram_are_refused(pair) -> None:
    sender, receiver = pair
    big = GuestMemory([MemoryRegion.anonymous(0, 4 << 20)])
    small = GuestMemory([MemoryRegion.anonymous(0, 2 << 20)])
    big.write(3 << 20, b"x")
    PageSender(big, sender, RateLimiter(None)).send(np.array([(3 << 20) // 4096]), SendTally())
    with pytest.raises(MigrationError, match="outside guest RAM"):
        PageReceiver(small, receiver).receive(*receiver.receive_header()[1:])


def test_unexcused_mismatch_fails_the_round() -> None:
    receiver = PageReceiver.__new__(PageReceiver)
    receiver.mismatched = {4, 7}
    with pytest.raises(MigrationError, match=r"checksum mismatch in page frame\(s\) \[7\]"):
        receiver.settle({4})


@given(st.lists(st.integers(0, 5000), unique=True))
def test_page_runs_cover_every_page_once_in_bounded_runs(pages: list[int]) -> None:
    ordered = np.array(sorted(pages), dtype=np.int64)
    runs = list(page_runs(ordered))
    covered = [first + i for first, count in runs for i in range(count)]
    assert covered == sorted(pages)
    assert all(0 < count <= MAX_RUN_PAGES for _, count in runs)


def test_frames_holding_rewritten_pages_are_excused() -> None:
    frames = [(1, 0, 10), (2, 10, 5), (3, 100, 1)]
    assert excused_frames(frames, np.array([3, 100])) == [1, 3]
    assert excused_frames(frames, np.array([15, 50])) == []


def test_addresses() -> None:
    assert str(parse_address("127.0.0.1:4444")) == "127.0.0.1:4444"
    assert str(parse_address("unix:/tmp/x.sock")) == "unix:/tmp/x.sock"
    for bad in ("nohost", "host:0", "host:99999", ":80", "unix:"):
        with pytest.raises(ConfigError):
            parse_address(bad)


def test_rate_limiter_holds_the_rate() -> None:
    limiter = RateLimiter(10_000_000)
    started = time.monotonic()
    for _ in range(20):
        limiter.wait(100_000)  # 2 MB at 10 MB/s: about 0.2 s
    assert 0.12 < time.monotonic() - started < 0.6


def stats(round_: int, sent: int, dirty: int, bandwidth: float = 1e9, dirty_rate: float = 0.0,
          throttle: float = 0.0) -> RoundStats:
    return RoundStats(round=round_, pages_sent=sent, zero_pages=0, bytes_on_wire=sent * 4096, duration_s=0.1,
                      dirty_pages=dirty, dirty_rate_bytes_per_s=dirty_rate, bandwidth_bytes_per_s=bandwidth,
                      wws_pages=0, throttle=throttle, throttle_target=throttle)


def test_policy_keeps_iterating_while_rounds_shrink_then_switches() -> None:
    policy = PrecopyPolicy()
    shrinking = [stats(0, 262144, 25600)]  # 100 MB left: would fit 300 ms, but the round cut it tenfold
    assert policy.decide(shrinking, 1.0).action is Action.CONTINUE
    stuck = [*shrinking, stats(1, 25600, 20000)]  # no longer halving: switch
    assert policy.decide(stuck, 1.2).action is Action.SWITCH_OVER
    assert policy.decide([stats(0, 1000, 100)], 0.1).action is Action.SWITCH_OVER, "under 2 ms left: converged"
    qemu_like = PrecopyPolicy(iterate_while_shrinking=False)
    assert qemu_like.decide(shrinking, 1.0).action is Action.SWITCH_OVER


def test_policy_limits_and_auto_converge() -> None:
    slow = stats(0, 100000, 100000, bandwidth=20e6, dirty_rate=60e6)  # 400 MB at 20 MB/s: 20 s
    assert PrecopyPolicy().decide([slow], 1.0).action is Action.CONTINUE
    assert PrecopyPolicy(max_rounds=1, on_limit="cancel").decide([slow], 1.0).action is Action.CANCEL
    assert PrecopyPolicy(max_rounds=1).decide([slow], 1.0).action is Action.SWITCH_OVER
    assert PrecopyPolicy(timeout_s=0.5, on_limit="cancel").decide([slow], 1.0).action is Action.CANCEL
    converge = PrecopyPolicy(auto_converge=True)
    assert converge.decide([slow], 1.0).throttle == pytest.approx(0.2)
    throttled = stats(1, 100000, 100000, bandwidth=20e6, dirty_rate=60e6, throttle=0.95)
    assert converge.decide([slow, throttled], 2.0).throttle == pytest.approx(0.99)
    with pytest.raises(ConfigError):
        PrecopyPolicy(on_limit="maybe")
