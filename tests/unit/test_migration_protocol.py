"""The migration stream and policy without KVM: framing, refusals, page runs, per-page checks, decisions."""

from __future__ import annotations

import struct
import threading
import time
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyrovisor.errors import ConfigError, MigrationError
from pyrovisor.memory import GuestMemory, MemoryRegion, PageSet
from pyrovisor.migration.address import parse_address
from pyrovisor.migration.pages import (
    MAX_RUN_PAGES,
    PageReceiver,
    PageSender,
    SendTally,
    page_runs,
    parse_runs,
    rewritten_runs,
)
from pyrovisor.migration.policy import Action, PrecopyPolicy, RoundStats
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
from pyrovisor.migration.rate import RateLimiter
from pyrovisor.migration.source import send_round_end


def raw_frame(kind: MessageType, covered: bytes, data: bytes = b"", sequence: int = 1, version: int = 2,
              tag: bytes | None = None) -> bytes:
    """A frame as the source sends it without a key (tag: CRC-32 of the header's prefix and the covered bytes)."""
    prefix = PREFIX.pack(MAGIC, version, int(kind), len(covered) + len(data), sequence, len(covered))
    return prefix + (tag if tag is not None else Integrity().frame_tag(Role.SOURCE, prefix, (covered,))) + covered + data


def crc_table(data: bytes) -> bytes:
    return b"".join(zlib.crc32(data[offset:offset + PAGE_SIZE]).to_bytes(4, "little")
                    for offset in range(0, len(data), PAGE_SIZE))


def pages_frame(first_page: int, data: bytes, digests: bytes | None = None, sequence: int = 1) -> bytes:
    count = len(data) // PAGE_SIZE
    header = PAGES.pack(first_page * PAGE_SIZE, count, Encoding.RAW, 4)
    return raw_frame(MessageType.PAGES, header + (digests if digests is not None else crc_table(data)), data,
                     sequence)


def test_json_message_round_trip(pair) -> None:
    sender, receiver = pair
    sender.send_json(MessageType.HELLO, {"version": 2, "ram": [[0, 4096]]})
    frame = receiver.receive()
    assert frame.type is MessageType.HELLO and frame.json() == {"version": 2, "ram": [[0, 4096]]}
    assert receiver.bytes_received == sender.bytes_sent == FRAME.size + len(frame.payload)


@pytest.mark.parametrize("header, message", [
    (FRAME.pack(b"HTTP", 2, 1, 0, 1, 0, bytes(16)), "bad magic"),
    (FRAME.pack(MAGIC, 1, 1, 0, 1, 0, bytes(16)), "protocol version 1 is not supported"),
    (FRAME.pack(MAGIC, 2, 99, 0, 1, 0, bytes(16)), "unknown message type 99"),
    (FRAME.pack(MAGIC, 2, 1, 1 << 30, 1, 1 << 30, bytes(16)), "exceeds"),
    (FRAME.pack(MAGIC, 2, 1, 0, 7, 0, bytes(16)), "numbered 7 where frame 1 was due"),
    (FRAME.pack(MAGIC, 2, 1, 10, 1, 4, bytes(16)), "only 4 of its 10 bytes are checked"),
    (FRAME.pack(MAGIC, 2, 3, 100, 1, 8, bytes(16)), "malformed PAGES frame"),
    (FRAME.pack(MAGIC, 2, 3, (1 << 20) + 100, 1, 16, bytes(16)), "malformed PAGES frame"),
])
def test_malformed_frames_are_refused(pair, header: bytes, message: str) -> None:
    sender, receiver = pair
    sender.sock.sendall(header)
    with pytest.raises(MigrationError, match=message):
        receiver.receive()


def test_damaged_header_or_payload_and_cut_stream_are_detected(pair) -> None:
    sender, receiver = pair
    payload = b'{"a": 1}'
    good = raw_frame(MessageType.ROUND_END, payload)
    damaged_payload = good[:-1] + b"]"
    sender.sock.sendall(damaged_payload)
    with pytest.raises(MigrationError, match="checksum mismatch in ROUND_END frame 1"):
        receiver.receive()
    # The tag covers the header too: a frame relabelled as another type fails its check.
    relabelled = bytearray(raw_frame(MessageType.ROUND_END, payload, sequence=2))
    struct.pack_into("<H", relabelled, 6, int(MessageType.STATE))
    sender.sock.sendall(relabelled)
    with pytest.raises(MigrationError, match="checksum mismatch in STATE frame 2"):
        receiver.receive()
    sender.sock.sendall(raw_frame(MessageType.ROUND_END, b"x" * 100, sequence=3)[:-95])
    sender.sock.close()
    with pytest.raises(MigrationError, match="closed by the peer"):
        receiver.receive()


def test_replayed_or_reordered_frames_are_refused(pair) -> None:
    sender, receiver = pair
    frame = raw_frame(MessageType.ROUND_END, b"{}")
    sender.sock.sendall(frame + frame)
    receiver.receive()
    with pytest.raises(MigrationError, match="numbered 1 where frame 2 was due"):
        receiver.receive()


def send_and_apply(sender: Connection, receiver: Connection, source: GuestMemory, target: GuestMemory,
                   pages: PageSet, compression: str | None = None) -> tuple[SendTally, PageReceiver]:
    tally = SendTally()

    def send() -> None:
        PageSender(source, sender, RateLimiter(None), compression).send(pages, tally)
        send_round_end(sender, 0, [])

    thread = threading.Thread(target=send)
    thread.start()
    incoming = PageReceiver(target, receiver)
    while (header := receiver.receive_header()).type is MessageType.PAGES:
        incoming.receive(header)
    incoming.rewritten(receiver.receive_frame(header).json()["rewritten"], "ROUND_END")
    incoming.end_round()
    thread.join()
    return tally, incoming


@pytest.mark.parametrize("compression", [None, "lz4", "zstd"])
def test_pages_travel_with_zero_runs_and_compression(pair, compression: str | None) -> None:
    sender, receiver = pair
    source = GuestMemory([MemoryRegion.anonymous(0, 2 << 20)])
    target = GuestMemory([MemoryRegion.anonymous(0, 2 << 20)])
    target.write(0x5000, b"stale")  # a page that became zero at the source must be cleared
    source.write(0x1000, b"A" * 4096)
    source.write(0x3000, bytes(range(256)) * 16)
    tally, incoming = send_and_apply(sender, receiver, source, target, PageSet.span(0, 8), compression)
    assert tally.pages == 8 and tally.zero_pages == 6
    incoming.finish()
    assert target.read(0, 8 * 4096) == source.read(0, 8 * 4096)
    if compression is not None:
        assert tally.data_bytes < 2 * 4096, "compressed"
    source.close()
    target.close()


def test_pages_outside_guest_ram_are_refused(pair) -> None:
    sender, receiver = pair
    big = GuestMemory([MemoryRegion.anonymous(0, 4 << 20)])
    small = GuestMemory([MemoryRegion.anonymous(0, 2 << 20)])
    big.write(3 << 20, b"x")
    PageSender(big, sender, RateLimiter(None)).send(PageSet.of([(3 << 20) // 4096]), SendTally())
    with pytest.raises(MigrationError, match="outside guest RAM"):
        PageReceiver(small, receiver).receive(receiver.receive_header())


# --- per-page integrity ------------------------------------------------------------------------------------
@pytest.fixture
def guest():
    memory = GuestMemory([MemoryRegion.anonymous(0, 2 << 20)])
    yield memory
    memory.close()


def page(byte: int) -> bytes:
    return bytes([byte]) * PAGE_SIZE


def test_a_damaged_page_is_caught_even_beside_a_rewritten_one(pair, guest) -> None:
    """Page 0 changed after the source digested it (it names it); page 1 was damaged in transit. Protocol 1
    excused the whole frame for page 0's sake and let page 1 through; now only page 0 is tolerated."""
    sender, receiver = pair
    digests = crc_table(page(1) + page(2))
    sender.sock.sendall(pages_frame(0, page(9) + page(3), digests))
    incoming = PageReceiver(guest, receiver)
    incoming.receive(receiver.receive_header())
    assert incoming.suspect == {0, 1}
    incoming.rewritten([[0, 1]], "ROUND_END")
    with pytest.raises(MigrationError, match=r"checksum mismatch in 1 page\(s\) the source did not rewrite \(first at 0x1000\)"):
        incoming.end_round()


def test_a_rewritten_page_must_arrive_again_intact(pair, guest) -> None:
    sender, receiver = pair
    incoming = PageReceiver(guest, receiver)
    sender.sock.sendall(pages_frame(0, page(9) + page(2), crc_table(page(1) + page(2)), sequence=1))
    incoming.receive(receiver.receive_header())
    incoming.rewritten([[0, 1]], "ROUND_END")
    incoming.end_round()  # named: tolerated for now
    with pytest.raises(MigrationError, match=r"1 page\(s\) never arrived intact \(first at 0x0\)"):
        incoming.finish()  # ...but STATE with the page still damaged is refused
    sender.sock.sendall(pages_frame(0, page(5), sequence=2))
    incoming.receive(receiver.receive_header())
    incoming.end_round()
    incoming.finish()
    assert guest.read(0, 2 * PAGE_SIZE) == page(5) + page(2)


def test_a_page_damaged_again_must_be_named_again(pair, guest) -> None:
    sender, receiver = pair
    incoming = PageReceiver(guest, receiver)
    for sequence in (1, 2):
        sender.sock.sendall(pages_frame(0, page(9), crc_table(page(1)), sequence=sequence))
        incoming.receive(receiver.receive_header())
    with pytest.raises(MigrationError, match="did not rewrite"):
        incoming.end_round()  # named in round 0 only: round 1 must name it again


def test_a_zero_run_clears_a_damaged_page(pair, guest) -> None:
    sender, receiver = pair
    incoming = PageReceiver(guest, receiver)
    sender.sock.sendall(pages_frame(3, page(9), crc_table(page(1)), sequence=1))
    incoming.receive(receiver.receive_header())
    sender.sock.sendall(raw_frame(MessageType.PAGES, PAGES.pack(3 * PAGE_SIZE, 1, Encoding.ZERO, 0), sequence=2))
    incoming.receive(receiver.receive_header())
    incoming.finish()
    assert guest.read(3 * PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)


def test_digest_table_must_fit_the_page_count(pair, guest) -> None:
    sender, receiver = pair
    header = PAGES.pack(0, 2, Encoding.RAW, 4)
    sender.sock.sendall(raw_frame(MessageType.PAGES, header + bytes(4), page(1) + page(2)))
    with pytest.raises(MigrationError, match="digest table of 4 bytes for 2 pages"):
        PageReceiver(guest, receiver).receive(receiver.receive_header())


def test_rewritten_pages_are_named_in_runs_and_split_across_messages(pair) -> None:
    sender, receiver = pair
    sent = PageSet.span(0, 1000)
    dirtied = PageSet.of([5, 6, 7, 100, 2000])
    assert rewritten_runs(sent, dirtied) == [[5, 3], [100, 1]]
    many = [[2 * index, 1] for index in range(250_001)]  # more runs than one message carries
    thread = threading.Thread(target=send_round_end, args=(sender, 4, many))
    thread.start()
    frames = [receiver.receive() for _ in range(3)]
    thread.join()
    assert [frame.type for frame in frames] == [MessageType.DIRTIED, MessageType.DIRTIED, MessageType.ROUND_END]
    assert [run for frame in frames for run in frame.json()["rewritten"]] == many
    assert all(frame.json()["round"] == 4 for frame in frames)


@pytest.mark.parametrize("runs", [
    "all", [[0]], [[0, 0]], [[-1, 2]], [[5, 1], [3, 1]], [[0, 2], [1, 1]], [[510, 3]], [[True, 1]], [[1.0, 1]],
])
def test_malformed_runs_are_refused(runs: object) -> None:
    with pytest.raises(MigrationError, match="malformed"):
        parse_runs(runs, 512, "ROUND_END message")


@given(st.lists(st.integers(0, 5000), unique=True))
def test_page_runs_cover_every_page_once_in_bounded_runs(pages: list[int]) -> None:
    runs = page_runs(PageSet.of(pages))
    covered = [first + i for first, count in runs for i in range(count)]
    assert covered == sorted(pages)
    assert all(0 < count <= MAX_RUN_PAGES for _, count in runs)


def test_addresses() -> None:
    assert str(parse_address("127.0.0.1:4444")) == "127.0.0.1:4444"
    assert str(parse_address("unix:/tmp/x.sock")) == "unix:/tmp/x.sock"
    assert str(parse_address("[::1]:4444")) == "[::1]:4444"
    for bad in ("nohost", "host:0", "host:99999", ":80", "unix:"):
        with pytest.raises(ConfigError):
            parse_address(bad)
    assert all(parse_address(local).is_local for local in ("127.0.0.1:1", "127.8.0.3:1", "[::1]:1", "localhost:1",
                                                           "unix:/tmp/x"))
    assert not any(parse_address(remote).is_local for remote in ("0.0.0.0:1", "10.1.2.3:1", "[::]:1", "example.org:1"))


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
