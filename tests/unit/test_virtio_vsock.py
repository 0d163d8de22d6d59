"""virtio-vsock driven through its queues by a Python driver, with real Unix sockets on a real I/O thread: streams
both ways, RST where nobody listens, credit kept in both directions, shutdown and reset, the listening socket's
rules, what a restored device tells the guest, and random packet headers that only ever earn RSTs."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtio_driver import DriverQueue, MiB

from pyrovisor.devices.virtio import mmio
from pyrovisor.devices.virtio.device import F_VERSION_1
from pyrovisor.devices.virtio.mmio import MmioWiring, VirtioMmio
from pyrovisor.devices.virtio.queue import QueueError, QueueState, SplitQueue
from pyrovisor.devices.virtio.vsock import (
    BUF_ALLOC,
    F_STREAM,
    HEADER,
    MAX_CONNECTIONS,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    SHUTDOWN_BOTH,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    TYPE_STREAM,
    VirtioVsock,
    VirtioVsockState,
    listen_unix,
    parse_connect,
)
from pyrovisor.errors import DeviceError
from pyrovisor.events.eventfd import EventFd
from pyrovisor.events.loop import EventLoop
from pyrovisor.memory import GuestMemory, MemoryRegion

BASE = 0xD0000000
CID = 3
RINGS = (0x10000, 0x20000, 0x30000)  # rx, tx, event
SIZES = (64, 64, 8)
RX_BUFFERS_AT, RX_STRIDE, RX_BUFFER = 0x100000, 0x1100, 44 + 4096
TX_BUFFER_AT = 0x200000
EVENT_BUFFERS_AT = 0x50000
FEATURES = (1 << F_VERSION_1) | (1 << F_STREAM)
WAIT_S = 5.0


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.0005)


@dataclass
class Packet:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    op: int
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0
    payload: bytes = b""
    type: int = TYPE_STREAM

    def pack(self, length: int | None = None) -> bytes:
        return HEADER.pack(self.src_cid, self.dst_cid, self.src_port, self.dst_port,
                           len(self.payload) if length is None else length, self.type, self.op, self.flags,
                           self.buf_alloc, self.fwd_cnt) + self.payload

    @classmethod
    def unpack(cls, data: bytes) -> Packet:
        src_cid, dst_cid, src_port, dst_port, length, kind, op, flags, buf_alloc, fwd_cnt = HEADER.unpack_from(data)
        assert len(data) == HEADER.size + length, "the used length is the header and the payload exactly"
        return cls(src_cid, dst_cid, src_port, dst_port, op, flags, buf_alloc, fwd_cnt, data[HEADER.size:], kind)


@dataclass
class FakeKvm:
    doorbells: dict[int, EventFd] = field(default_factory=dict)
    interrupt: EventFd | None = None

    def ioeventfd(self, eventfd: EventFd, address: int, length: int, datamatch: int) -> None:
        self.doorbells[datamatch] = eventfd

    def irqfd(self, eventfd: EventFd, gsi: int) -> None:
        self.interrupt = eventfd

    def gone(self, *args: object) -> None:
        return None


class VsockDriver:
    """The guest's side: rx buffers posted, one packet at a time on tx, event buffers, and the stream
    bookkeeping of a well-behaved peer (what it consumed, what credit it was given)."""

    def __init__(self, transport: VirtioMmio, kvm: FakeKvm, memory: GuestMemory, rx_posted: int = 32) -> None:
        self.transport, self.kvm, self.memory = transport, kvm, memory
        self.queues = [DriverQueue(memory, ring, size) for ring, size in zip(RINGS, SIZES, strict=True)]
        self.rx_address: dict[int, int] = {}
        self.event_address: dict[int, int] = {}
        self.inbox: list[Packet] = []
        self.events: list[int] = []
        self.bring_up()
        for index in range(rx_posted):
            self.post_rx(RX_BUFFERS_AT + index * RX_STRIDE)
        for index in range(4):
            self.post_event(EVENT_BUFFERS_AT + 8 * index)
        self.notify(0)
        self.notify(2)

    def bring_up(self) -> None:
        transport = self.transport
        transport.write(mmio.STATUS, 4, 0)
        transport.write(mmio.STATUS, 4, mmio.ACKNOWLEDGE | mmio.DRIVER)
        for select in (0, 1):
            transport.write(mmio.DRIVER_FEATURES_SEL, 4, select)
            transport.write(mmio.DRIVER_FEATURES, 4, (FEATURES >> (32 * select)) & 0xFFFFFFFF)
        transport.write(mmio.STATUS, 4, mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK)
        assert transport.read(mmio.STATUS, 4) & mmio.FEATURES_OK
        for index, queue in enumerate(self.queues):
            transport.write(mmio.QUEUE_SEL, 4, index)
            transport.write(mmio.QUEUE_NUM, 4, queue.size)
            for low, address in ((mmio.QUEUE_DESC_LOW, queue.desc), (mmio.QUEUE_DRIVER_LOW, queue.avail),
                                 (mmio.QUEUE_DEVICE_LOW, queue.used)):
                transport.write(low, 4, address & 0xFFFFFFFF)
                transport.write(low + 4, 4, address >> 32)
            transport.write(mmio.QUEUE_READY, 4, 1)
        transport.write(mmio.STATUS, 4, mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK | mmio.DRIVER_OK)

    def notify(self, index: int) -> None:
        self.kvm.doorbells[index].signal()  # what KVM does when the guest writes QueueNotify

    def post_rx(self, address: int, length: int = RX_BUFFER) -> None:
        head = self.queues[0].add_chain([], [(address, length)])
        self.rx_address[head] = address

    def post_event(self, address: int) -> None:
        head = self.queues[2].add_chain([], [(address, 4)])
        self.event_address[head] = address

    def send(self, packet: Packet, length: int | None = None, raw: bytes | None = None) -> None:
        """One packet on tx; returns once the device has taken it."""
        data = raw if raw is not None else packet.pack(length)
        self.memory.write(TX_BUFFER_AT, data)
        tx = self.queues[1]
        target = (tx.used_seen + 1) & 0xFFFF
        tx.add_chain([(TX_BUFFER_AT, len(data))], [])
        self.notify(1)
        wait_for(lambda: self.memory.read_u16(tx.used + 2) == target or self.broken, "the device to take a packet")
        tx.used_entries()

    def collect(self) -> list[Packet]:
        """Packets the device delivered since the last call (their buffers go back at once)."""
        fresh = []
        for head, written in self.queues[0].used_entries():
            address = self.rx_address.pop(head)
            fresh.append(Packet.unpack(self.memory.read(address, written)))
            self.post_rx(address)
        if fresh:
            self.notify(0)
        for head, written in self.queues[2].used_entries():
            assert written == 4
            address = self.event_address.pop(head)
            self.events.append(self.memory.read_u32(address))
            self.post_event(address)
        self.inbox += fresh
        return fresh

    def expect(self, predicate: Callable[[Packet], bool], what: str, timeout: float = WAIT_S) -> Packet:
        """Wait for a delivered packet matching `predicate` (earlier others stay in the inbox)."""
        found: list[Packet] = []

        def look() -> bool:
            self.collect()
            for packet in self.inbox:
                if predicate(packet):
                    self.inbox.remove(packet)
                    found.append(packet)
                    return True
            return False

        wait_for(look, what, timeout)
        return found[0]

    @property
    def broken(self) -> bool:
        return bool(self.transport.read(mmio.STATUS, 4) & mmio.NEEDS_RESET)


@dataclass
class Rig:
    transport: VirtioMmio
    device: VirtioVsock
    kvm: FakeKvm
    memory: GuestMemory
    loop: EventLoop
    uds: Path
    driver: VsockDriver


def make_device(uds: Path, memory: GuestMemory, loop: EventLoop,
                state: VirtioVsockState | None = None) -> tuple[VirtioMmio, VirtioVsock, FakeKvm]:
    kvm = FakeKvm()
    wiring = MmioWiring(memory, BASE, 5, loop, kvm.ioeventfd, kvm.gone, kvm.irqfd, kvm.gone)
    device = VirtioVsock(CID, uds, state, "vsock0")
    transport = VirtioMmio("vsock0", device, wiring, state.transport if state is not None else None)
    device.start(transport)
    return transport, device, kvm


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (Unix socket paths are limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="vs", dir="/tmp") as name:
        yield Path(name)


@pytest.fixture
def rig(short_dir: Path) -> Iterator[Rig]:
    memory = GuestMemory([MemoryRegion.anonymous(0, 8 * MiB, huge_pages=False)])
    loop = EventLoop("test-io")
    loop.start()
    uds = short_dir / "v.sock"
    transport, device, kvm = make_device(uds, memory, loop)
    driver = VsockDriver(transport, kvm, memory)
    rig = Rig(transport, device, kvm, memory, loop, uds, driver)
    yield rig
    rig.transport.close()  # a test may have replaced it
    loop.close()
    memory.close()


def server(path: Path) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(MAX_CONNECTIONS + 8)
    listener.settimeout(WAIT_S)
    return listener


def from_device(port: int, guest_port: int, op: int) -> Callable[[Packet], bool]:
    return lambda p: (p.src_cid, p.dst_cid, p.src_port, p.dst_port, p.op) == (2, CID, port, guest_port, op)


def guest(src_port: int, dst_port: int, op: int, **fields: object) -> Packet:
    return Packet(CID, 2, src_port, dst_port, op, **fields)  # type: ignore[arg-type]


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        piece = sock.recv(count - len(data))
        assert piece, f"end of stream after {len(data)} of {count} bytes"
        data += piece
    return bytes(data)


# --- guest → host ---------------------------------------------------------------------------------------------

def connected(rig: Rig, guest_port: int, host_port: int) -> tuple[socket.socket, socket.socket]:
    """The guest connects from `guest_port` to a host listener on `host_port`: (the listener, the accepted socket)."""
    listener = server(Path(f"{rig.uds}_{host_port}"))
    rig.driver.send(guest(guest_port, host_port, OP_REQUEST, buf_alloc=65536))
    rig.driver.expect(from_device(host_port, guest_port, OP_RESPONSE), "RESPONSE")
    host, _ = listener.accept()
    return listener, host

def test_guest_connects_echoes_and_shuts_down(rig: Rig) -> None:
    driver = rig.driver
    assert rig.transport.read(mmio.DEVICE_ID, 4) == 19
    assert rig.transport.read(mmio.CONFIG_OFFSET, 4) == CID and rig.transport.read(mmio.CONFIG_OFFSET + 4, 4) == 0
    listener = server(Path(f"{rig.uds}_5000"))
    driver.send(guest(1025, 5000, OP_REQUEST, buf_alloc=65536))
    response = driver.expect(from_device(5000, 1025, OP_RESPONSE), "RESPONSE")
    assert response.buf_alloc == BUF_ALLOC and response.fwd_cnt == 0
    host, _ = listener.accept()
    host.settimeout(WAIT_S)
    driver.send(guest(1025, 5000, OP_RW, buf_alloc=65536, payload=b"hello\n"))
    assert recv_exactly(host, 6) == b"hello\n"
    host.sendall(b"pong: hello\n")
    reply = driver.expect(from_device(5000, 1025, OP_RW), "the reply")
    assert reply.payload == b"pong: hello\n"
    driver.send(guest(1025, 5000, OP_SHUTDOWN, flags=SHUTDOWN_BOTH, buf_alloc=65536, fwd_cnt=12))
    driver.expect(from_device(5000, 1025, OP_RST), "the RST answering a full SHUTDOWN")
    assert host.recv(16) == b"", "the host program reads end of file"
    wait_for(lambda: rig.device.connections == 0, "the connection to go")
    assert rig.device.stats.guest_connections == 1 and not driver.broken
    host.close()
    listener.close()


def test_nobody_listening_and_unknown_streams_get_rst(rig: Rig) -> None:
    driver = rig.driver
    driver.send(guest(1026, 5001, OP_REQUEST, buf_alloc=4096))
    driver.expect(from_device(5001, 1026, OP_RST), "RST for a port nobody listens on")
    for op in (OP_RW, OP_CREDIT_REQUEST, OP_SHUTDOWN, OP_RESPONSE):
        driver.send(guest(1027, 7000, op, payload=b"x" if op == OP_RW else b""))
        driver.expect(from_device(7000, 1027, OP_RST), f"RST for op {op} on no stream")
    driver.send(guest(1027, 7000, OP_RST))
    Path(f"{rig.uds}_5002").write_text("not a socket")
    driver.send(guest(1028, 5002, OP_REQUEST, buf_alloc=4096))
    driver.expect(from_device(5002, 1028, OP_RST), "RST when the path is not a socket")
    time.sleep(0.05)
    assert not driver.collect(), "an RST for no stream is not answered"
    assert rig.device.stats.refused == 2 and not driver.broken


def test_guest_half_close_reaches_the_host_and_host_eof_reaches_the_guest(rig: Rig) -> None:
    driver = rig.driver
    listener, host = connected(rig, 1030, 5003)
    host.settimeout(WAIT_S)
    driver.send(guest(1030, 5003, OP_RW, buf_alloc=65536, payload=b"last words"))
    driver.send(guest(1030, 5003, OP_SHUTDOWN, flags=SHUTDOWN_SEND, buf_alloc=65536))
    assert recv_exactly(host, 10) == b"last words" and host.recv(16) == b"", "EOF after the guest's SEND shutdown"
    host.sendall(b"still talking")
    assert driver.expect(from_device(5003, 1030, OP_RW), "data after the half close").payload == b"still talking"
    host.close()
    shutdown = driver.expect(from_device(5003, 1030, OP_SHUTDOWN), "SHUTDOWN after the host's EOF")
    assert shutdown.flags == SHUTDOWN_BOTH, "the host sends no more, and the guest will send nothing either"
    driver.send(guest(1030, 5003, OP_RST, buf_alloc=65536, fwd_cnt=13))
    wait_for(lambda: rig.device.connections == 0, "the connection to go")
    listener.close()


def test_queued_bytes_drain_to_the_host_after_the_guests_full_shutdown(rig: Rig) -> None:
    """The host reads nothing until the guest has sent everything and shut down: the guest gets its RST at once,
    the host still gets every byte, then end of file."""
    driver = rig.driver
    listener, host = connected(rig, 1050, 5010)
    host.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    data = os.urandom(BUF_ALLOC)
    for offset in range(0, len(data), 4096):
        driver.send(guest(1050, 5010, OP_RW, buf_alloc=65536, payload=data[offset:offset + 4096]))
    driver.send(guest(1050, 5010, OP_SHUTDOWN, flags=SHUTDOWN_BOTH, buf_alloc=65536))
    driver.expect(from_device(5010, 1050, OP_RST), "the RST, before the host read anything")
    assert rig.device.connections == 1, "the stream is gone for the guest, still draining to the host"
    host.settimeout(WAIT_S)
    received = bytearray()
    while piece := host.recv(65536):
        received += piece
    assert bytes(received) == data
    wait_for(lambda: rig.device.connections == 0, "the drained connection to close")
    host.close()
    listener.close()


def test_an_unanswered_shutdown_ends_in_rst(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    from pyrovisor.devices.virtio import vsock
    monkeypatch.setattr(vsock, "CLOSE_TIMEOUT_S", 0.2)
    driver = rig.driver
    listener, host = connected(rig, 1051, 5011)
    driver.send(guest(1051, 5011, OP_SHUTDOWN, flags=SHUTDOWN_SEND, buf_alloc=65536))
    host.close()
    assert driver.expect(from_device(5011, 1051, OP_SHUTDOWN), "SHUTDOWN").flags == SHUTDOWN_BOTH
    driver.expect(from_device(5011, 1051, OP_RST), "RST when the guest never answered the SHUTDOWN")
    assert rig.device.connections == 0
    listener.close()


def test_a_guest_that_stops_receiving_makes_the_hosts_writes_fail(rig: Rig) -> None:
    driver = rig.driver
    listener, host = connected(rig, 1052, 5012)
    driver.send(guest(1052, 5012, OP_SHUTDOWN, flags=SHUTDOWN_RCV, buf_alloc=65536))
    time.sleep(0.05)
    with pytest.raises(BrokenPipeError):
        host.send(b"nobody reads this")
    driver.send(guest(1052, 5012, OP_RW, buf_alloc=65536, payload=b"but the guest still talks"))
    host.settimeout(WAIT_S)
    assert recv_exactly(host, 25) == b"but the guest still talks"
    host.close()
    listener.close()


# --- host → guest ---------------------------------------------------------------------------------------------
def test_host_connects_with_a_connect_line(rig: Rig) -> None:
    driver = rig.driver
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.settimeout(WAIT_S)
    host.connect(str(rig.uds))
    host.sendall(b"CONNECT 6000\n")
    request = driver.expect(lambda p: p.op == OP_REQUEST and p.dst_port == 6000, "the REQUEST")
    assert request.src_cid == 2 and request.dst_cid == CID and request.src_port >= 1 << 30
    assert request.buf_alloc == BUF_ALLOC
    host_port = request.src_port
    driver.send(guest(6000, host_port, OP_RESPONSE, buf_alloc=65536))
    line = b""
    while not line.endswith(b"\n"):
        line += host.recv(1)
    assert line == f"OK {host_port}\n".encode()
    host.sendall(b"ping")
    assert driver.expect(from_device(host_port, 6000, OP_RW), "host data").payload == b"ping"
    driver.send(guest(6000, host_port, OP_RW, buf_alloc=65536, fwd_cnt=4, payload=b"pong"))
    assert recv_exactly(host, 4) == b"pong", "the OK line is not counted as stream data"
    host.close()
    driver.expect(from_device(host_port, 6000, OP_SHUTDOWN), "SHUTDOWN after the host closed")
    assert rig.device.stats.host_connections == 1


def test_host_connections_the_guest_refuses_or_that_are_malformed_are_closed(rig: Rig) -> None:
    driver = rig.driver
    refused = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    refused.settimeout(WAIT_S)
    refused.connect(str(rig.uds))
    refused.sendall(b"CONNECT 6001\n")
    request = driver.expect(lambda p: p.op == OP_REQUEST and p.dst_port == 6001, "the REQUEST")
    driver.send(guest(6001, request.src_port, OP_RST))
    assert refused.recv(16) == b"", "a refused connection is closed"
    for line in (b"CONNECT\n", b"CONNECT -1\n", b"CONNECT 4294967296\n", b"connect 5\n", b"X" * 40, b"CONNECT 1"):
        bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bad.settimeout(WAIT_S)
        bad.connect(str(rig.uds))
        bad.sendall(line)
        if not line.endswith(b"\n") and len(line) < 32:
            bad.shutdown(socket.SHUT_WR)
        assert bad.recv(16) == b"", f"{line!r} is refused"
        bad.close()
    assert not [p for p in driver.collect() if p.op == OP_REQUEST]
    assert [parse_connect(b"CONNECT 52"), parse_connect(b"CONNECT 52\r"), parse_connect(b"CONNECT 5 2")] == \
        [52, 52, None]


def test_an_unanswered_host_connection_times_out(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    from pyrovisor.devices.virtio import vsock
    monkeypatch.setattr(vsock, "CONNECT_TIMEOUT_S", 0.2)
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.settimeout(WAIT_S)
    host.connect(str(rig.uds))
    host.sendall(b"CONNECT 6002\n")
    request = rig.driver.expect(lambda p: p.op == OP_REQUEST, "the REQUEST")
    started = time.monotonic()
    assert host.recv(16) == b""
    assert time.monotonic() - started < 2
    rig.driver.expect(from_device(request.src_port, 6002, OP_RST), "the RST withdrawing the REQUEST")


# --- credit ------------------------------------------------------------------------------------------------
def test_the_device_never_exceeds_the_guests_credit(rig: Rig) -> None:
    driver = rig.driver
    listener = server(Path(f"{rig.uds}_5004"))
    buf_alloc = 1000
    driver.send(guest(1031, 5004, OP_REQUEST, buf_alloc=buf_alloc))
    driver.expect(from_device(5004, 1031, OP_RESPONSE), "RESPONSE")
    host, _ = listener.accept()
    data = os.urandom(20000)
    sender = threading.Thread(target=host.sendall, args=(data,))
    sender.start()
    received = bytearray()
    fwd_cnt = 0
    requests = 0
    deadline = time.monotonic() + WAIT_S * 2
    while len(received) < len(data):
        assert time.monotonic() < deadline, f"stalled at {len(received)} bytes"
        for packet in driver.collect():
            if packet.op == OP_RW:
                received += packet.payload
                assert len(received) - fwd_cnt <= buf_alloc, "more than buf_alloc - (tx_cnt - fwd_cnt) in flight"
            elif packet.op == OP_CREDIT_REQUEST:
                requests += 1
        if len(received) - fwd_cnt == buf_alloc:  # full: consume half, say so once
            time.sleep(0.01)
            driver.collect()
            assert len(received) - fwd_cnt == buf_alloc, "nothing arrives while the guest has no credit"
            fwd_cnt += buf_alloc // 2
            driver.send(guest(1031, 5004, OP_CREDIT_UPDATE, buf_alloc=buf_alloc, fwd_cnt=fwd_cnt))
        time.sleep(0.0005)
    sender.join()
    assert bytes(received) == data and requests >= 1
    host.close()
    listener.close()


def test_guest_data_waits_for_the_host_and_credit_updates_flow(rig: Rig) -> None:
    """The host program reads nothing at first: the device queues up to its buf_alloc, and a guest that
    keeps to the credit it was given can send the whole stream once the host reads."""
    driver = rig.driver
    listener = server(Path(f"{rig.uds}_5005"))
    driver.send(guest(1032, 5005, OP_REQUEST, buf_alloc=65536))
    response = driver.expect(from_device(5005, 1032, OP_RESPONSE), "RESPONSE")
    host, _ = listener.accept()
    host.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peer_buf_alloc, peer_fwd_cnt = response.buf_alloc, response.fwd_cnt
    data = os.urandom(2 * BUF_ALLOC + 12345)
    received = bytearray()
    reader_started = threading.Event()

    def read() -> None:
        reader_started.wait()
        host.settimeout(WAIT_S * 4)
        while len(received) < len(data):
            piece = host.recv(65536)
            if not piece:
                return
            received.extend(piece)

    reader = threading.Thread(target=read)
    reader.start()
    sent = 0
    full_at = None
    updates = 0
    deadline = time.monotonic() + WAIT_S * 4
    while sent < len(data):
        assert time.monotonic() < deadline, f"stalled after {sent} bytes"
        for packet in driver.collect():
            if packet.op in (OP_CREDIT_UPDATE, OP_RW, OP_CREDIT_REQUEST) and packet.src_port == 5005:
                peer_buf_alloc, peer_fwd_cnt = packet.buf_alloc, packet.fwd_cnt
                updates += packet.op == OP_CREDIT_UPDATE
        room = peer_buf_alloc - (sent - peer_fwd_cnt)
        if room <= 0:
            if full_at is None:
                full_at = sent
            reader_started.set()  # the device's buffer is full: now let the host read
            time.sleep(0.001)
            continue
        piece = data[sent:sent + min(room, 4096)]
        driver.send(guest(1032, 5005, OP_RW, buf_alloc=65536, payload=piece))
        sent += len(piece)
    reader_started.set()
    reader.join(WAIT_S * 4)
    assert full_at is not None and BUF_ALLOC <= full_at < len(data), "the guest ran out of credit on the way"
    assert updates >= 1, "CREDIT_UPDATEs told the guest about the room the host made"
    assert bytes(received) == data and not driver.broken


def test_credit_lies_and_overruns_reset_the_stream(rig: Rig) -> None:
    driver = rig.driver
    listener = server(Path(f"{rig.uds}_5006"))
    # fwd_cnt beyond what the device ever sent
    driver.send(guest(1033, 5006, OP_REQUEST, buf_alloc=65536))
    driver.expect(from_device(5006, 1033, OP_RESPONSE), "RESPONSE")
    driver.send(guest(1033, 5006, OP_CREDIT_UPDATE, buf_alloc=65536, fwd_cnt=100))
    driver.expect(from_device(5006, 1033, OP_RST), "RST for a fwd_cnt beyond tx_cnt")
    # more data than buf_alloc allows, the host not reading
    driver.send(guest(1034, 5006, OP_REQUEST, buf_alloc=65536))
    driver.expect(from_device(5006, 1034, OP_RESPONSE), "RESPONSE")
    host, _ = listener.accept()
    host.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    chunk = b"z" * 65536
    for _ in range(BUF_ALLOC // len(chunk) + 64):
        driver.send(guest(1034, 5006, OP_RW, buf_alloc=65536, payload=chunk))
        if any(p.op == OP_RST for p in driver.collect()):
            break
    driver.inbox += driver.collect()
    assert any(p.op == OP_RST and p.dst_port == 1034 for p in driver.inbox), "an overrun earns RST"
    assert not driver.broken
    host.close()
    listener.close()


# --- limits, resets, restore ----------------------------------------------------------------------------------
def test_connections_are_bounded_and_a_driver_reset_closes_them(rig: Rig) -> None:
    driver = rig.driver
    listener = server(Path(f"{rig.uds}_5007"))
    for port in range(2000, 2000 + MAX_CONNECTIONS):
        driver.send(guest(port, 5007, OP_REQUEST, buf_alloc=4096))
    driver.send(guest(2000 + MAX_CONNECTIONS, 5007, OP_REQUEST, buf_alloc=4096))
    driver.expect(from_device(5007, 2000 + MAX_CONNECTIONS, OP_RST), "RST beyond the limit")
    accepted = [listener.accept()[0] for _ in range(MAX_CONNECTIONS)]
    assert rig.device.connections == MAX_CONNECTIONS
    rig.transport.write(mmio.STATUS, 4, 0)  # the driver resets the device
    for host in accepted:
        host.settimeout(WAIT_S)
        assert host.recv(16) == b"", "a device reset closes every host socket"
        host.close()
    assert rig.device.connections == 0
    listener.close()


def test_a_receive_buffer_too_small_for_a_header_breaks_the_device(short_dir: Path) -> None:
    memory = GuestMemory([MemoryRegion.anonymous(0, 8 * MiB, huge_pages=False)])
    loop = EventLoop("test-io")
    loop.start()
    transport, _, kvm = make_device(short_dir / "v.sock", memory, loop)
    try:
        driver = VsockDriver(transport, kvm, memory, rx_posted=0)
        driver.post_rx(RX_BUFFERS_AT, 20)
        driver.notify(0)
        driver.send(guest(1, 9, OP_RW, payload=b"?"))
        wait_for(lambda: driver.broken, "DEVICE_NEEDS_RESET")
        assert "cannot hold" in transport.broken
    finally:
        transport.close()
        loop.close()
        memory.close()


def test_a_restored_device_resets_the_guests_transport_and_takes_new_connections(rig: Rig) -> None:
    driver = rig.driver
    listener, old_host = connected(rig, 1040, 5008)
    rig.loop.pause(5)
    state = rig.transport.save()
    rig.loop.resume()
    assert isinstance(state, VirtioVsockState) and state.saved and state.cid == CID and state.uds_path == str(rig.uds)
    rig.transport.close()
    old_host.settimeout(WAIT_S)
    assert old_host.recv(16) == b"", "live connections do not survive"
    assert not rig.uds.exists(), "the listening socket is removed on close"
    transport, device, kvm = make_device(rig.uds, rig.memory, rig.loop, state)
    rig.transport = transport  # the fixture closes this one
    driver.transport, driver.kvm = transport, kvm
    wait_for(lambda: (driver.collect(), driver.events)[1] == [0], "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET")
    assert device.stats.transport_resets == 1
    driver.send(guest(1041, 5008, OP_REQUEST, buf_alloc=65536))
    driver.expect(from_device(5008, 1041, OP_RESPONSE), "RESPONSE after the restore")
    new_host, _ = listener.accept()
    new_host.sendall(b"after")
    assert driver.expect(from_device(5008, 1041, OP_RW), "data").payload == b"after"
    new_host.close()
    listener.close()


# --- the listening socket ------------------------------------------------------------------------------------
def test_the_listening_socket_rules(short_dir: Path) -> None:
    path = short_dir / "l.sock"
    path.write_text("a file")
    with pytest.raises(DeviceError, match="exists and is not a socket"):
        listen_unix("vsock0", path, take_over=False)
    path.unlink()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on
    listener, _ = listen_unix("vsock0", path, take_over=False)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(DeviceError, match="another process is listening"):
        listen_unix("vsock0", path, take_over=False)
    successor, _ = listen_unix("vsock0", path, take_over=True)  # a restored VM takes the path over
    listener.close()
    successor.close()
    with pytest.raises(DeviceError, match="No such file or directory"):
        listen_unix("vsock0", short_dir / "missing" / "v.sock", take_over=False)
    with pytest.raises(DeviceError, match="at most 107 bytes"):
        listen_unix("vsock0", short_dir / ("x" * 120), take_over=False)
    with pytest.raises(DeviceError, match="reserved"):
        VirtioVsock(2, short_dir / "c.sock")


def test_closing_a_replaced_device_leaves_its_successors_socket(short_dir: Path) -> None:
    path = short_dir / "v.sock"
    first = VirtioVsock(CID, path)
    second = VirtioVsock(CID, path, VirtioVsockState(cid=CID, uds_path=str(path), saved=True))
    first.close()
    assert path.exists(), "the first device does not remove the path its successor now holds"
    second.close()
    assert not path.exists()


# --- a hostile driver -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def direct_device(uds: Path) -> Iterator[tuple[VirtioVsock, GuestMemory, list[DriverQueue]]]:
    """The device with its queues set up directly and a loop that never runs (sources are registered, nothing
    is dispatched): process() is called by hand, on this thread."""
    memory = GuestMemory([MemoryRegion.anonymous(0, 8 * MiB, huge_pages=False)])
    loop = EventLoop("direct")
    device = VirtioVsock(CID, uds)
    device.start(SimpleNamespace(name="vsock0", lock=threading.RLock(), kick=lambda index: None,  # type: ignore[arg-type]
                                 wiring=SimpleNamespace(loop=loop)))
    drivers = [DriverQueue(memory, ring, size) for ring, size in zip(RINGS, SIZES, strict=True)]
    queues = []
    for driver, size in zip(drivers, (256, 256, 64), strict=True):
        queue = SplitQueue(memory, size, QueueState(size=driver.size, ready=True, desc=driver.desc,
                                                    avail=driver.avail, used=driver.used))
        queue.activate()
        queues.append(queue)
    device.activate(queues, FEATURES)
    try:
        yield device, memory, drivers
    finally:
        device.close()
        for queue in queues:
            queue.release()
        loop.close()
        memory.close()


header_fields = st.tuples(
    st.sampled_from([CID, CID, CID, 0, 2, 1 << 40]),  # src_cid
    st.sampled_from([2, 2, 2, CID, 0, 0xFFFFFFFF]),  # dst_cid
    st.integers(0, 0xFFFFFFFF) | st.sampled_from([1024, 5000]),  # src_port
    st.integers(0, 0xFFFFFFFF) | st.sampled_from([5000, 1 << 30]),  # dst_port
    st.integers(0, 0xFFFFFFFF) | st.integers(0, 200),  # len
    st.sampled_from([TYPE_STREAM, TYPE_STREAM, 2, 0, 0xFFFF]),  # type
    st.integers(0, 0xFFFF) | st.integers(0, 9),  # op
    st.integers(0, 0xFFFFFFFF),  # flags
    st.integers(0, 0xFFFFFFFF),  # buf_alloc
    st.integers(0, 0xFFFFFFFF) | st.just(0),  # fwd_cnt
)
packets = st.lists(st.tuples(header_fields, st.integers(0, 300), st.booleans()), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(packets)
def test_random_headers_earn_only_rsts_or_a_needs_reset(short_dir: Path, batch: list[tuple[tuple[int, ...], int, bool]]) -> None:
    with direct_device(short_dir / "h.sock") as (device, memory, (rx, tx, _)):
        for index in range(16):
            rx.add_chain([], [(RX_BUFFERS_AT + index * RX_STRIDE, RX_BUFFER)])
        for number, (fields, payload_length, truncated) in enumerate(batch):
            data = HEADER.pack(*fields) + bytes(payload_length)
            if truncated:
                data = data[:number % HEADER.size]
            address = TX_BUFFER_AT + number * 0x1000
            memory.write(address, data)
            tx.add_chain([(address, len(data))], [])
        try:
            device.process(1)
        except QueueError as exc:
            assert any(truncated for _, _, truncated in batch), exc.reason
            return
        for head, written in rx.used_entries():
            packet = Packet.unpack(memory.read(RX_BUFFERS_AT + head * RX_STRIDE, written))
            assert packet.op == OP_RST and packet.dst_cid == CID and packet.type == TYPE_STREAM
        assert device.connections == 0


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(packets)
def test_random_packets_on_a_live_stream_keep_the_rules(short_dir: Path,
                                                       batch: list[tuple[tuple[int, ...], int, bool]]) -> None:
    """A connected stream, then random packets with its addresses: the device either breaks (a truncated chain)
    or answers with well-formed packets, none of them data (the host wrote none)."""
    uds = short_dir / "s.sock"
    listener = server(Path(f"{uds}_5000"))
    try:
        with direct_device(uds) as (device, memory, (rx, tx, _)):
            for index in range(32):
                rx.add_chain([], [(RX_BUFFERS_AT + index * RX_STRIDE, RX_BUFFER)])
            start = guest(1024, 5000, OP_REQUEST, buf_alloc=65536).pack()
            memory.write(TX_BUFFER_AT, start)
            tx.add_chain([(TX_BUFFER_AT, len(start))], [])
            device.process(1)
            host, _ = listener.accept()
            with_addresses = [((CID, 2, 1024, 5000, *fields[4:]), length, truncated)
                              for fields, length, truncated in batch]
            for number, (fields, payload_length, truncated) in enumerate(with_addresses):
                data = HEADER.pack(*fields) + bytes(payload_length)
                if truncated:
                    data = data[:number % HEADER.size]
                address = TX_BUFFER_AT + number * 0x1000
                memory.write(address, data)
                tx.add_chain([(address, len(data))], [])
            try:
                device.process(1)
            except QueueError:
                assert any(truncated for _, _, truncated in with_addresses)
            else:
                for head, written in rx.used_entries():
                    packet = Packet.unpack(memory.read(RX_BUFFERS_AT + head * RX_STRIDE, written))
                    assert packet.type == TYPE_STREAM and packet.src_cid == 2 and packet.dst_cid == CID
                    assert packet.op in (OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST)
            host.close()
    finally:
        listener.close()
        os.unlink(f"{uds}_5000")
