"""virtio-net on a real tap device in a fresh network namespace, driven through its queues like a guest driver:
frames cross in both directions byte-exact, RX without buffers neither spins nor loses frames, frames too large
for their buffer are counted as dropped, hostile chains break only the device, bad taps give one clear error."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from virtio_driver import DriverQueue, MiB

from pyrovisor.devices.virtio import net as net_module
from pyrovisor.devices.virtio.net import RX_HEADER, NetOptions, VirtioNet, VirtioNetState, default_mac
from pyrovisor.devices.virtio.queue import QueueError, QueueState, SplitQueue
from pyrovisor.errors import DeviceError
from pyrovisor.events.loop import EventLoop
from pyrovisor.memory import GuestMemory, MemoryRegion
from pyrovisor.persist.codec import decode, encode

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
CAP_NET_ADMIN = 12
ETHERTYPE = 0x88B5  # IEEE local experimental: nothing else in the namespace sends it
RX_RING, TX_RING = 0x10000, 0x14000
RX_BUFFERS, TX_AT = 0x100000, 0x200000
BUFFER = 2048
HOST_MAC = bytes.fromhex("02aabbccddee")
_libc = ctypes.CDLL(None, use_errno=True)
_names = iter(range(1_000_000))


# --- a network namespace, entered by one thread at a time --------------------------------------------------
def in_namespace(namespace: str, function: Callable[[], T]) -> T:
    """Run `function` on a thread that has joined `namespace`: setns(CLONE_NEWNET) changes only the calling
    thread, and taps and sockets opened there stay in that namespace when used from any other thread."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET):
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            outcome.append((True, function()))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    (ok, value), = outcome
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def ip(namespace: str, *args: str) -> None:
    subprocess.run(["ip", "-n", namespace, *args], check=True, capture_output=True, text=True)


@pytest.fixture
def namespace() -> Iterator[str]:
    if shutil.which("ip") is None:
        pytest.skip("the ip command (iproute2) is not installed: no network namespace to put a tap in")
    name = f"pyrovisor-net-{os.getpid()}-{next(_names)}"
    created = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if created.returncode:
        pytest.skip(f"cannot create a network namespace (needs root): {created.stderr.strip()}")
    try:
        def quiet() -> None:  # no IPv6 router solicitations or MLD reports on the taps made here
            with contextlib.suppress(OSError), open("/proc/sys/net/ipv6/conf/default/disable_ipv6", "w") as knob:
                knob.write("1")
        in_namespace(name, quiet)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    memory = GuestMemory([MemoryRegion.anonymous(0, 4 * MiB, huge_pages=False)])
    yield memory
    memory.close()


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    loop = EventLoop("test-io")
    loop.start()
    yield loop
    loop.close()


# --- the device with a stand-in for its transport --------------------------------------------------------------
class Nic:
    """A device on a tap, its two driver queues, and what the transport would do: the lock around queue work,
    DEVICE_NEEDS_RESET on a QueueError, and counting interrupts."""

    def __init__(self, namespace: str, memory: GuestMemory, loop: EventLoop, tap: str, up: bool = True) -> None:
        self.memory = memory
        self.loop = loop
        self.tap = tap
        self.device = in_namespace(namespace, lambda: VirtioNet(NetOptions(tap), loop, name="net0"))
        if up:
            ip(namespace, "link", "set", tap, "up")
        self.lock = threading.RLock()
        self.running = False
        self.broken = ""
        self.interrupts = 0
        self.device.kick = self.kick
        self.device.interrupt = self._interrupt
        memory.fill(RX_RING, 0x8000)  # both rings: nothing left over from an earlier device
        self.queues: list[SplitQueue] = []
        self.rx = DriverQueue(memory, RX_RING, 16)
        self.tx = DriverQueue(memory, TX_RING, 16)

    def _interrupt(self) -> None:
        self.interrupts += 1

    def activate(self) -> None:
        queues = [SplitQueue(self.memory, 256, QueueState(size=16, ready=True, desc=q.desc, avail=q.avail,
                                                          used=q.used)) for q in (self.rx, self.tx)]
        for queue in queues:
            queue.activate()
        self.queues += queues
        with self.lock:
            self.device.activate(queues, 1 << 32)
            self.running = True

    def kick(self, index: int) -> None:
        with self.lock:
            if not self.running or self.broken:
                return
            try:
                self.device.process(index)
            except QueueError as exc:
                self.broken = exc.reason

    def doorbell(self, index: int) -> None:
        """The driver's QueueNotify: the work runs on the loop thread, as an ioeventfd's would."""
        done = threading.Event()
        self.loop.call_soon(lambda: (self.kick(index), done.set()))
        assert done.wait(10)

    def reset(self) -> None:
        with self.lock:
            self.running = False
            self.device.reset()

    def post_rx(self, count: int, size: int = BUFFER, first: int = 0) -> list[int]:
        heads = [self.rx.add_chain([], [(RX_BUFFERS + (first + slot) * BUFFER, size)]) for slot in range(count)]
        self.doorbell(0)
        return heads

    def received(self, count: int, timeout: float = 5) -> list[tuple[int, int]]:
        """Wait for `count` used receive buffers: (head, bytes written)."""
        entries: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        while len(entries) < count:
            entries += self.rx.used_entries()
            assert time.monotonic() < deadline, f"{len(entries)} of {count} frames received"
            time.sleep(0.002)
        return entries

    def tap_dispatches(self) -> int:
        return self.loop.stats.per_source.get("net0.tap", 0)

    def close(self) -> None:
        self.device.close()
        for queue in self.queues:  # the rings' views, before the memory is unmapped
            queue.release()


@contextlib.contextmanager
def nic(namespace: str, memory: GuestMemory, loop: EventLoop, tap: str = "pvnet0", up: bool = True) -> Iterator[Nic]:
    card = Nic(namespace, memory, loop, tap, up)
    try:
        yield card
    finally:
        card.close()


def host_socket(namespace: str, tap: str) -> socket.socket:
    """The host's end of the wire: a packet socket on the tap, for frames of our test ethertype only."""
    def make() -> socket.socket:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
        sock.bind((tap, 0))
        sock.settimeout(5)
        return sock
    return in_namespace(namespace, make)


def frame(payload: bytes, destination: bytes = b"\xff" * 6) -> bytes:
    return destination + HOST_MAC + struct.pack("!H", ETHERTYPE) + payload


def receive_frame(sock: socket.socket) -> bytes:
    while True:
        data, address = sock.recvfrom(65536)
        if address[2] != socket.PACKET_OUTGOING:
            return data


# --- the tests -----------------------------------------------------------------------------------------------
def test_frames_cross_both_ways_byte_exact(namespace: str, memory: GuestMemory, loop: EventLoop) -> None:
    with nic(namespace, memory, loop) as card, host_socket(namespace, card.tap) as host:
        device = card.device
        card.activate()
        # Transmit: the header in a descriptor of its own, the frame cut across two more.
        sent = frame(os.urandom(300))
        memory.write(TX_AT, bytes(12) + sent)
        card.tx.add_chain([(TX_AT, 12), (TX_AT + 12, 100), (TX_AT + 112, len(sent) - 100)], [])
        card.doorbell(1)
        assert card.tx.used_entries() == [(0, 0)] and card.interrupts == 1
        assert receive_frame(host) == sent
        # A header and frame in one descriptor, as the OS guest sends them.
        second = frame(b"x" * 46)
        memory.write(TX_AT + 0x1000, bytes(12) + second)
        card.tx.add_chain([(TX_AT + 0x1000, 12 + len(second))], [])
        card.doorbell(1)
        assert receive_frame(host) == second
        assert (device.stats.tx_frames, device.stats.tx_bytes) == (2, len(sent) + len(second))
        # Receive: frames the host puts on the wire land in posted buffers, behind a virtio-net header.
        memory.start_tracking()
        heads = card.post_rx(4)
        incoming = [frame(os.urandom(size), device.config()[:6]) for size in (46, 1000, 1500)]
        for data in incoming:
            host.send(data)
        entries = card.received(3)
        assert [head for head, _ in entries] == heads[:3]
        for (head, written), data in zip(entries, incoming, strict=True):
            assert written == 12 + len(data)
            address = RX_BUFFERS + head * BUFFER
            assert memory.read(address, 12) == RX_HEADER == struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 1)
            assert memory.read(address + 12, len(data)) == data
        pages = set(memory.take_tracked_pages())
        assert {(RX_BUFFERS + head * BUFFER) // 4096 for head, _ in entries} <= pages, \
            "the pages the device wrote through its views are reported for dirty tracking"
        assert (device.stats.rx_frames, device.stats.rx_bytes) == (3, sum(map(len, incoming)))
        assert card.interrupts >= 2 and not card.broken


def test_a_burst_reaches_the_driver_in_published_batches(namespace: str, memory: GuestMemory,
                                                          loop: EventLoop) -> None:
    """Frames waiting in the tap are read in batches of RX_BATCH, each published (here: one interrupt each) as
    soon as it is in, so that the driver can work on the first batch while the next is read."""
    with nic(namespace, memory, loop) as card, host_socket(namespace, card.tap) as host:
        card.activate()
        count = net_module.RX_BATCH + 4
        heads = card.post_rx(count)
        before = card.interrupts
        waiting = [frame(struct.pack("!I", number) + bytes(60)) for number in range(count)]
        loop.pause(5)  # the whole burst is in the tap before the device reads any of it
        try:
            for data in waiting:
                host.send(data)
            time.sleep(0.2)
        finally:
            loop.resume()
        entries = card.received(count)
        assert [head for head, _ in entries] == heads
        got = [memory.read(RX_BUFFERS + head * BUFFER + 12, written - 12) for head, written in entries]
        assert got == waiting
        assert card.interrupts - before == 2, "one publication per batch: RX_BATCH frames, then the other 4"


def test_receiving_without_buffers_waits_without_spinning(namespace: str, memory: GuestMemory,
                                                          loop: EventLoop) -> None:
    """With no receive buffer posted the device stops watching the tap; the frames wait in the tap's queue
    (none is lost or dropped by the device) and arrive, in order, once the driver posts buffers."""
    with nic(namespace, memory, loop) as card, host_socket(namespace, card.tap) as host:
        card.activate()
        card.doorbell(0)
        waiting = [frame(struct.pack("!I", number) + bytes(60)) for number in range(5)]
        for data in waiting:
            host.send(data)
        wakeups = loop.stats.wakeups
        time.sleep(0.5)
        assert card.tap_dispatches() <= 2, "the loop kept serving a tap it could do nothing with"
        assert loop.stats.wakeups - wakeups <= 3
        assert card.device.stats.rx_stalls >= 1 and card.device.stats.rx_frames == 0
        # Two buffers: two frames; the rest wait again, then come with the next buffers.
        card.post_rx(2)
        first = card.received(2)
        time.sleep(0.2)
        assert card.rx.used_entries() == []
        card.post_rx(3, first=2)
        rest = card.received(3)
        got = [memory.read(RX_BUFFERS + head * BUFFER + 12, written - 12) for head, written in first + rest]
        assert got == waiting
        assert card.device.stats.rx_dropped == 0 and not card.broken


def test_frames_too_large_for_their_buffer_are_dropped_and_counted(namespace: str, memory: GuestMemory,
                                                                   loop: EventLoop) -> None:
    """A frame that does not fit the buffer it was read into is dropped (counted in rx_dropped) and the buffer
    is kept for the next frame; a buffer that only holds the header drops every frame."""
    with nic(namespace, memory, loop) as card, host_socket(namespace, card.tap) as host:
        card.activate()
        small, = card.post_rx(1, size=12 + 100)
        host.send(big := frame(bytes(500)))
        host.send(fits := frame(b"fits" + bytes(82)))
        (head, written), = card.received(1)
        assert (head, written) == (small, 12 + len(fits)) and len(fits) == 100 and len(big) > 100
        assert memory.read(RX_BUFFERS + small * BUFFER + 12, 100) == fits
        assert card.device.stats.rx_dropped == 1 and card.device.stats.rx_frames == 1
        card.post_rx(1, size=12, first=1)
        host.send(frame(bytes(50)))
        deadline = time.monotonic() + 5
        while card.device.stats.rx_dropped < 2:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        assert card.rx.used_entries() == [] and not card.broken


def test_hostile_chains_break_only_the_device(namespace: str, memory: GuestMemory, loop: EventLoop) -> None:
    with nic(namespace, memory, loop) as card, host_socket(namespace, card.tap) as host:
        card.activate()
        # A frame shorter than an Ethernet header is refused by the tap: dropped and counted, the queue goes on.
        memory.write(TX_AT, bytes(12) + b"short")
        card.tx.add_chain([(TX_AT, 17)], [])
        card.doorbell(1)
        assert card.tx.used_entries() == [(0, 0)] and card.device.stats.tx_dropped == 1 and not card.broken
        # A transmit chain shorter than the header breaks the device.
        card.tx.add_chain([(TX_AT, 8)], [])
        card.doorbell(1)
        assert "shorter than the 12-byte virtio-net header" in card.broken
    with nic(namespace, memory, loop, tap="pvnet2") as card:  # one device-writable descriptor to transmit
        card.activate()
        card.tx.add_chain([], [(TX_AT, 200)])
        card.doorbell(1)
        assert "shorter than the 12-byte virtio-net header" in card.broken
    for hostile, message in (([], [(RX_BUFFERS, 8)]), "receive buffer of 8 bytes"), \
                            (([(RX_BUFFERS, 64)], [(RX_BUFFERS + 64, 2000)]), "device-readable"), \
                            (([(RX_BUFFERS, 2000)], []), "device-readable"):
        with nic(namespace, memory, loop, tap="pvnet1") as card, host_socket(namespace, card.tap) as host:
            card.activate()
            card.rx.add_chain(*hostile)
            card.doorbell(0)
            host.send(frame(bytes(50)))
            deadline = time.monotonic() + 5
            while not card.broken:
                assert time.monotonic() < deadline
                time.sleep(0.002)
            assert message in card.broken
            # Broken, the device no longer watches the tap, however many frames wait there.
            dispatches = card.tap_dispatches()
            for _ in range(20):
                host.send(frame(bytes(50)))
            time.sleep(0.3)
            assert card.tap_dispatches() - dispatches <= 1


def test_a_reset_stops_receiving_until_the_driver_starts_again(namespace: str, memory: GuestMemory,
                                                               loop: EventLoop) -> None:
    with nic(namespace, memory, loop) as card, host_socket(namespace, card.tap) as host:
        card.activate()
        card.reset()
        dispatches = card.tap_dispatches()
        host.send(kept := frame(b"after the reset" + bytes(40)))
        time.sleep(0.3)
        assert card.tap_dispatches() == dispatches
        card.rx, card.tx = DriverQueue(memory, RX_RING, 16), DriverQueue(memory, TX_RING, 16)
        memory.fill(RX_RING, 0x8000)
        card.activate()
        card.post_rx(1)
        (head, written), = card.received(1)
        assert memory.read(RX_BUFFERS + head * BUFFER + 12, written - 12) == kept


def test_state_reopens_the_same_tap_and_keeps_the_counters(namespace: str, memory: GuestMemory,
                                                           loop: EventLoop) -> None:
    ip(namespace, "tuntap", "add", "pvkept", "mode", "tap")  # persistent: outlives the device's fd
    with nic(namespace, memory, loop, tap="pvkept") as card, host_socket(namespace, card.tap) as host:
        card.activate()
        card.post_rx(1)
        host.send(frame(bytes(64)))
        card.received(1)
        state = card.device.save_device(VirtioNetState().transport)
    assert (state.tap, state.mac, state.rx_frames, state.rx_bytes) == ("pvkept", default_mac("pvkept"), 1, 78)
    restored_state = decode(VirtioNetState, encode(state), "test")
    assert restored_state == state
    device = in_namespace(namespace, lambda: VirtioNet(NetOptions(restored_state.tap, restored_state.mac), loop,
                                                       restored_state))
    try:
        assert device.stats.rx_frames == 1 and device.config()[:6] == bytes.fromhex(state.mac.replace(":", ""))
    finally:
        device.close()


def test_mac_config_and_features(namespace: str, memory: GuestMemory, loop: EventLoop) -> None:
    mac = default_mac("pvnet0")
    assert mac == default_mac("pvnet0") != default_mac("pvnet1")
    first = int(mac[:2], 16)
    assert mac.startswith("52:54:00:") and first & 2 and not first & 1, "locally administered unicast"
    with nic(namespace, memory, loop) as card:
        assert card.device.config() == bytes.fromhex(mac.replace(":", "")) + b"\x01\x00"  # status: link up
        assert card.device.features == (1 << 5) | (1 << 16) and card.device.device_id == 1
        assert card.device.queue_sizes == (256, 256)
    device = in_namespace(namespace, lambda: VirtioNet(NetOptions("pvnet2", "52:54:00:12:34:56")))
    try:
        assert device.config()[:6] == bytes.fromhex("525400123456")
    finally:
        device.close()
    created = subprocess.run(["ip", "-n", namespace, "link", "show", "pvnet2"], capture_output=True)
    assert created.returncode != 0, "a tap the device created goes away with it"


def test_bad_taps_give_one_clear_error(namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def open_in_namespace(name: str) -> VirtioNet:
        return in_namespace(namespace, lambda: VirtioNet(NetOptions(name)))

    with pytest.raises(DeviceError, match="an interface name is 1 to 15 bytes"):
        open_in_namespace("a-name-too-long-for-linux")
    with pytest.raises(DeviceError, match="exists but is not a single-queue tap device"):
        open_in_namespace("lo")
    first = open_in_namespace("pvbusy")
    try:
        with pytest.raises(DeviceError, match=r"^tap pvbusy: busy: another process has it open"):
            open_in_namespace("pvbusy")
    finally:
        first.close()

    def without_net_admin() -> VirtioNet:
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
        data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable}
        assert _libc.capget(header, data) == 0
        data[0] &= ~(1 << CAP_NET_ADMIN)  # capabilities are per thread: only this one loses it
        assert _libc.capset(header, data) == 0
        return VirtioNet(NetOptions("pvnotthere"))

    with pytest.raises(DeviceError, match="no such interface, and creating a tap needs CAP_NET_ADMIN"):
        in_namespace(namespace, without_net_admin)
    monkeypatch.setattr(net_module, "TUN_PATH", "/nonexistent/net/tun")
    with pytest.raises(DeviceError, match=r"/nonexistent/net/tun does not exist \(load the tun module"):
        open_in_namespace("pvnet0")
    with pytest.raises(DeviceError, match="invalid MAC"):
        VirtioNet(NetOptions("pvnet0", "01:00:5e:00:00:01"))


def test_a_deleted_tap_stops_receiving_without_spinning(namespace: str, memory: GuestMemory,
                                                        loop: EventLoop) -> None:
    """Deleting the interface under the device makes its fd report an error: the device reads once, counts it,
    stops watching the tap and keeps the driver's buffers; frames sent afterwards are counted as dropped."""
    with nic(namespace, memory, loop) as card:
        card.activate()
        card.post_rx(4)
        ip(namespace, "link", "del", card.tap)
        deadline = time.monotonic() + 5
        while card.device.stats.tap_errors < 1:
            assert time.monotonic() < deadline, "the error on the tap's fd was never seen"
            time.sleep(0.002)
        dispatches = card.tap_dispatches()
        time.sleep(0.3)
        assert card.tap_dispatches() == dispatches and card.rx.used_entries() == [] and not card.broken
        memory.write(TX_AT, bytes(12) + frame(bytes(50)))
        card.tx.add_chain([(TX_AT, 12 + 64)], [])
        card.doorbell(1)
        assert card.tx.used_entries() == [(0, 0)] and card.device.stats.tx_dropped == 1
