"""virtio-net (virtio 1.2 §5.1) on a host tap device: one receive and one transmit queue, a MAC, no offloads."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pyrovisor.devices.virtio.device import ID_NET, VirtioDevice
from pyrovisor.devices.virtio.mmio import TransportState
from pyrovisor.devices.virtio.queue import DESC_F_WRITE, Buffer, DescriptorChain, QueueError, SplitQueue
from pyrovisor.errors import DeviceError, GuestMemoryError
from pyrovisor.events.loop import EventLoop
from pyrovisor.memory import GuestMemory

log = logging.getLogger(__name__)

RX_QUEUE, TX_QUEUE = 0, 1
QUEUE_SIZE = 256
F_MAC = 5
F_STATUS = 16
S_LINK_UP = 1
# struct virtio_net_hdr with num_buffers (always present with VERSION_1): flags, gso_type, hdr_len, gso_size,
# csum_start, csum_offset, num_buffers. Received frames get flags 0, GSO_NONE and num_buffers 1.
HEADER = struct.Struct("<BBHHHHH")
HEADER_SIZE = HEADER.size
RX_HEADER = HEADER.pack(0, 0, 0, 0, 0, 0, 1)
ETH_HEADER = 14
MAX_FRAME = 65536  # a transmitted frame larger than this (no GSO is offered) is dropped
RX_BUDGET = 256  # frames received per call before the loop serves its other sources
RX_BATCH = 8  # receive buffers taken from the ring and published to the driver at once (unfilled ones go back)
TX_BATCH = 64  # transmit chains taken from the ring at once
IOV_MAX = 1024
_NO_BUFFER = memoryview(b"")

# <linux/if_tun.h>
TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAME_MAX = 15  # IFNAMSIZ - 1
IFREQ = struct.Struct("16sH22x")  # struct ifreq: the name, then ifr_flags in the union (40 bytes)


@dataclass(frozen=True)
class NetOptions:
    """One interface as the user configured it."""

    tap: str
    mac: str = ""  # 52:54:00:xx:xx:xx; default: derived from the tap's name


@dataclass(frozen=True)
class VirtioNetState:
    transport: TransportState = field(default_factory=TransportState)
    tap: str = ""
    mac: str = ""
    rx_frames: int = 0
    rx_bytes: int = 0
    tx_frames: int = 0
    tx_bytes: int = 0
    rx_dropped: int = 0
    tx_dropped: int = 0


@dataclass
class NetStats:
    rx_frames: int = 0
    rx_bytes: int = 0  # frame bytes, without the virtio-net header
    tx_frames: int = 0
    tx_bytes: int = 0
    rx_dropped: int = 0  # frames larger than the receive buffer they were read into
    tx_dropped: int = 0  # frames the tap refused (link down, shorter than an Ethernet header...) or too large
    rx_stalls: int = 0  # times receiving stopped because the driver had no buffer posted
    tap_errors: int = 0  # reads from the tap that failed (the tap was deleted...): receiving stops


def default_mac(tap: str) -> str:
    """A stable locally administered unicast MAC for a tap name: 52:54:00 and three bytes of its hash."""
    digest = hashlib.sha256(tap.encode()).digest()
    return "52:54:00:" + ":".join(f"{byte:02x}" for byte in digest[:3])


def open_tap(name: str) -> int:
    """A non-blocking fd on the tap `name` (IFF_TAP | IFF_NO_PI), attached to an existing tap or creating one
    (which needs CAP_NET_ADMIN); one clear DeviceError when that cannot be done."""
    where = f"tap {name}"
    raw = name.encode()
    if not raw or len(raw) > IFNAME_MAX or b"/" in raw or b"\0" in raw or any(c.isspace() for c in name):
        raise DeviceError(where, f"an interface name is 1 to {IFNAME_MAX} bytes without / or spaces")
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DeviceError(where, f"{TUN_PATH} does not exist (load the tun module: modprobe tun)") from None
    except OSError as exc:
        raise DeviceError(where, f"cannot open {TUN_PATH}: {exc.strerror or exc}") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, IFREQ.pack(raw, IFF_TAP | IFF_NO_PI))
    except OSError as exc:
        os.close(fd)
        raise DeviceError(where, _tunsetiff_failure(name, exc.errno or 0)) from None
    return fd


def _tunsetiff_failure(name: str, code: int) -> str:
    exists = _interface_exists(name)
    if code == errno.EBUSY:
        return "busy: another process has it open (a single-queue tap takes one user)"
    if code == errno.EPERM and not exists:
        return (f"no such interface, and creating a tap needs CAP_NET_ADMIN (create it first: "
                f"ip tuntap add {name} mode tap user USER)")
    if code == errno.EPERM:
        return "permission denied: the tap belongs to another user or group (ip tuntap add ... user USER)"
    if code == errno.EINVAL and exists:
        return "exists but is not a single-queue tap device"
    return f"TUNSETIFF failed: {os.strerror(code)}"


def _interface_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _mac_bytes(text: str) -> bytes:
    parts = text.split(":")
    try:
        value = bytes(int(part, 16) for part in parts)
    except ValueError:
        value = b""
    if len(parts) != 6 or len(value) != 6 or value[0] & 1:
        raise DeviceError("virtio-net", f"invalid MAC {text!r}: expected six hex bytes, not multicast")
    return value


def _split(buffers: Sequence[Buffer], skip: int) -> tuple[list[Buffer], list[Buffer]]:
    """The first `skip` bytes of a buffer list and the rest (either part may cut a buffer in two)."""
    head: list[Buffer] = []
    rest: list[Buffer] = []
    for buffer in buffers:
        take = min(skip, buffer.length)
        if take:
            head.append(Buffer(buffer.address, take))
            skip -= take
        if buffer.length > take:
            rest.append(Buffer(buffer.address + take, buffer.length - take))
    return head, rest


class VirtioNet(VirtioDevice):
    """A NIC whose wire is a tap device.

    Transmit: on the TX doorbell every chain's frame (after its 12-byte header) goes to the tap with one
    `write`/`writev` of guest-memory views (no copy). Receive: the tap is watched on the VM's event loop through an epoll
    instance of the device's own, so watching can be switched on and off with one immediate system call from
    any thread; while watched and readable, frames are read with `readv` straight into the driver's receive
    buffers. When the driver has no buffer posted the device stops watching (frames wait in the tap's queue,
    which the host kernel drops from when it is full) until the RX doorbell brings buffers.

    `kick(queue)` must run `process` the way the transport does (its lock held, only while the driver has the
    device running); whoever wires the device to its transport sets it. Until then a readable tap is not
    watched further.
    """

    device_id = ID_NET
    features = (1 << F_MAC) | (1 << F_STATUS)
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, options: NetOptions, loop: EventLoop | None = None, state: VirtioNetState | None = None,
                 name: str = "net") -> None:
        super().__init__()
        self.options = options
        self.name = name
        self.loop = loop
        self.mac = options.mac or default_mac(options.tap)
        self._mac = _mac_bytes(self.mac)
        saved = state or VirtioNetState()
        self.stats = NetStats(rx_frames=saved.rx_frames, rx_bytes=saved.rx_bytes, tx_frames=saved.tx_frames,
                              tx_bytes=saved.tx_bytes, rx_dropped=saved.rx_dropped, tx_dropped=saved.tx_dropped)
        self.kick: Callable[[int], None] = lambda index: None
        self._watch_lock = threading.Lock()
        self._watching = False
        self._generation = 0  # changes whenever receive work ran or watching was switched on
        self._on_loop = False
        self._scratch = bytearray(1)  # read after the guest's buffers: a frame that reaches it did not fit
        self.fd = open_tap(options.tap)
        try:
            self._poller = select.epoll(1, select.EPOLL_CLOEXEC)
        except BaseException:
            os.close(self.fd)
            raise

    # --- configuration ------------------------------------------------------------------------------------
    def config(self) -> bytes:
        """mac and status (§5.1.4); the link is always up."""
        return self._mac + struct.pack("<H", S_LINK_UP)

    def activate(self, queues: Sequence[SplitQueue], driver_features: int) -> None:
        super().activate(queues, driver_features)
        if self.loop is not None and not self._on_loop:
            self.loop.add(self._poller, self._tap_readable, f"{self.name}.tap", self._tap_failed)
            self._on_loop = True
        if queues and queues[RX_QUEUE].ready:
            self._watch(True)

    def reset(self) -> None:
        self._watch(False)
        super().reset()

    def save_device(self, transport: TransportState) -> VirtioNetState:
        stats = self.stats
        return VirtioNetState(transport, self.options.tap, self.mac, stats.rx_frames, stats.rx_bytes,
                              stats.tx_frames, stats.tx_bytes, stats.rx_dropped, stats.tx_dropped)

    def close(self) -> None:
        try:
            if self._on_loop and self.loop is not None:
                self._on_loop = False
                self.loop.remove(self._poller)  # returns once the I/O thread no longer uses it
        finally:
            if self.fd >= 0:
                self._watch(False)
                self._poller.close()
                os.close(self.fd)
                self.fd = -1

    # --- watching the tap ---------------------------------------------------------------------------------
    def _watch(self, on: bool) -> None:
        """Switch watching the tap on or off (an epoll_ctl: immediate, from any thread). Off really is off:
        even an error condition on the tap (EPOLLERR, which epoll reports unasked) does not wake the loop."""
        with self._watch_lock:
            self._set_watching(on)

    def _set_watching(self, on: bool) -> None:
        """`_watch` with the lock held."""
        self._generation += 1
        if on == self._watching or self.fd < 0:
            return
        if on:
            self._poller.register(self.fd, select.EPOLLIN)
        else:
            self._poller.unregister(self.fd)
        self._watching = on

    def _tap_readable(self) -> None:
        """The event loop's handler: receive through the transport; if it could not (the driver is not
        running, the device is broken, nobody wired `kick`), stop watching until the device is activated."""
        with self._watch_lock:
            generation = self._generation
        self.kick(RX_QUEUE)
        with self._watch_lock:
            if generation == self._generation:  # nothing received and nobody switched watching on meanwhile
                self._set_watching(False)

    def _tap_failed(self, source: str, error: BaseException) -> None:
        log.warning("%s: receiving stopped after an internal error: %r", self.name, error)
        self._watch(False)

    # --- queue work -----------------------------------------------------------------------------------------
    def process(self, queue_index: int) -> None:
        try:
            if queue_index == RX_QUEUE:
                self._receive(self.queues[RX_QUEUE])
            elif queue_index == TX_QUEUE:
                self._transmit(self.queues[TX_QUEUE])
        except GuestMemoryError as exc:  # chains are checked; only a bug gets here, and it breaks the device
            self._watch(False)
            raise QueueError(f"guest memory access failed: {exc}") from None
        except BaseException:
            self._watch(False)  # a broken device stops receiving until the driver resets it
            raise

    def _transmit(self, queue: SplitQueue) -> None:
        memory, fd, stats, write = queue.memory, self.fd, self.stats, os.write
        header, shortest, longest = HEADER_SIZE, HEADER_SIZE + ETH_HEADER, HEADER_SIZE + MAX_FRAME
        while True:
            direct = queue.take_direct(TX_BATCH)
            finished: list[int] = []  # head, bytes written, head...
            sent_bytes = failed = 0
            buffer = _NO_BUFFER
            for head, _, buffer, flags in direct:  # the usual chain: header and frame in one buffer
                if flags & DESC_F_WRITE or not shortest <= len(buffer) <= longest:
                    break  # anything else goes the general way below (served, dropped or refused)
                try:
                    sent_bytes += write(fd, buffer[header:])  # a tap takes the whole frame or fails
                except OSError as exc:
                    self._not_sent(len(buffer) - header, exc)
                    failed += 1
                finished += (head, 0)
            taken = len(direct)
            direct.clear()  # the views of guest memory go now: a kept traceback must not keep the mapping alive
            buffer = _NO_BUFFER
            sent = len(finished) // 2
            stats.tx_frames += sent - failed
            stats.tx_bytes += sent_bytes
            if sent:
                queue.add_used_many(finished)
            general = sent < taken or taken < TX_BATCH
            if sent < taken:
                queue.give_back(taken - sent)
            chains = queue.take(1) if general else []  # an unusual chain, or nothing: the ring is empty
            for chain in chains:
                self._send(memory, chain)
                queue.add_used(chain.head, 0)
            if sent or chains:
                self.publish(queue)
            if general and not chains:
                return

    def _not_sent(self, length: int, exc: OSError) -> None:
        """EIO while the tap is down, EBADFD once it is deleted: the frame is lost."""
        self.stats.tx_dropped += 1
        log.debug("%s: frame of %d bytes not sent: %s", self.name, length, str(exc))  # the text: see _tap_failure

    def _send(self, memory: GuestMemory, chain: DescriptorChain) -> None:
        readable = chain.readable
        total = readable[0].length if len(readable) == 1 else chain.readable_length
        if total < HEADER.size:
            raise QueueError(f"transmit chain of {total} bytes, shorter than the {HEADER.size}-byte virtio-net header")
        length = total - HEADER.size
        if length < ETH_HEADER or length > MAX_FRAME:
            self.stats.tx_dropped += 1
            return
        try:
            if len(readable) == 1:  # the usual chain: header and frame in one buffer (the view dies with the call)
                os.write(self.fd, memory.view(readable[0].address + HEADER.size, length))
            else:
                pieces = [buffer for buffer in _split(chain.readable, HEADER.size)[1] if buffer.length]
                if len(pieces) > IOV_MAX:
                    self.stats.tx_dropped += 1
                    return
                with contextlib.ExitStack() as views:
                    os.writev(self.fd, [views.enter_context(memory.view(b.address, b.length)) for b in pieces])
        except OSError as exc:
            self._not_sent(length, exc)
            return
        self.stats.tx_frames += 1
        self.stats.tx_bytes += length

    def _receive(self, queue: SplitQueue) -> None:
        """Read frames into posted buffers until the tap is empty, the buffers run out or the budget is spent.

        Frames are read in batches of RX_BATCH, each published as soon as it is in, so that the driver works on
        one while the next is read. Publishing once per burst leaves the driver idle until the whole burst is in
        and the device idle while the driver answers it; publishing every frame costs a publication (and
        perhaps an interrupt) per frame and splits the traffic into ever smaller bursts, which cost more calls.
        """
        memory = queue.memory
        self._watch(True)  # also what the RX doorbell does after a stall: buffers may have arrived
        frames = 0
        fd, scratch, stats, readv = self.fd, self._scratch, self.stats, os.readv
        log = memory.write_log  # the buffers' ranges were checked by take_direct: marks go straight to the log
        header, rx_header = HEADER_SIZE, RX_HEADER
        while frames < RX_BUDGET:
            limit = min(RX_BATCH, RX_BUDGET - frames)
            direct = queue.take_direct(limit)
            finished: list[int] = []  # the buffers filled, in order: head, bytes written, head...
            dry = False
            buffer = _NO_BUFFER
            for head, address, buffer, flags in direct:
                capacity = len(buffer) - header
                if not flags & DESC_F_WRITE or capacity <= 0:
                    break  # anything but the usual buffer goes the general way below
                # The usual buffer, one descriptor: the frame is read behind the header, in place.
                try:
                    count = readv(fd, [buffer[header:], scratch])
                except OSError as exc:
                    if not isinstance(exc, BlockingIOError):
                        self._tap_failure(exc)
                    dry = True
                    break
                if count > capacity:  # dropped; the general way gives this buffer the next frame
                    frames += 1
                    if log.active:
                        log.record(address + header, capacity)
                    stats.rx_dropped += 1
                    break
                buffer[:header] = rx_header
                if log.active:
                    log.record(address, header + count)
                finished += (head, header + count)
            taken = len(direct)
            direct.clear()  # the views of guest memory go now: a kept traceback must not keep the mapping alive
            buffer = _NO_BUFFER
            used = len(finished) // 2
            if used:
                queue.add_used_many(finished)
                self.publish(queue)
                frames += used
                stats.rx_frames += used
                stats.rx_bytes += sum(finished[1::2]) - header * used
            if used < taken:
                queue.give_back(taken - used)
            if dry or frames >= RX_BUDGET:
                return  # still watched: level-triggered, so the loop comes back for what is left
            if used == taken == limit:
                continue
            # An unusual buffer is next, or the ring is empty (with notifications asked for).
            chains = queue.take(1)
            if not chains:  # every buffer posted is used and the tap may hold more
                self._stall()
                return
            result = self._read_frame(memory, chains[0])
            if result is None:  # nothing to read: the buffer stays the driver's
                queue.give_back(1)
                return
            frames += 1
            if result < 0:  # dropped: the buffer stays the driver's
                queue.give_back(1)
            else:
                queue.add_used(chains[0].head, HEADER_SIZE + result)
                self.publish(queue)

    def _stall(self) -> None:
        """Out of buffers with the tap perhaps still holding frames: stop watching until the driver posts more.
        take() asked for that notification and looked once more, so none is missed."""
        if self.fd >= 0 and self._watching:
            self.stats.rx_stalls += 1
            self._watch(False)

    def _read_frame(self, memory: GuestMemory, chain: DescriptorChain) -> int | None:
        """Read one frame into the chain: its length, None if the tap has none, -1 if it did not fit."""
        if chain.readable:
            raise QueueError("receive chain with device-readable buffers")
        if chain.writable_length < HEADER.size:
            raise QueueError(f"receive buffer of {chain.writable_length} bytes, shorter than the "
                             f"{HEADER.size}-byte virtio-net header")
        first = chain.writable[0]
        if len(chain.writable) == 1 and first.length > HEADER.size:  # the usual buffer: one descriptor
            header = [Buffer(first.address, HEADER.size)]
            pieces = [Buffer(first.address + HEADER.size, first.length - HEADER.size)]
        else:
            header, data = _split(chain.writable, HEADER.size)
            pieces = [buffer for buffer in data if buffer.length][:IOV_MAX - 1]
        capacity = sum(buffer.length for buffer in pieces)
        try:
            if len(pieces) == 1:  # the usual buffer: header and frame in one descriptor
                with memory.view(pieces[0].address, capacity) as target:
                    count = os.readv(self.fd, [target, self._scratch])
            else:
                with contextlib.ExitStack() as views:
                    targets: list[memoryview | bytearray] = [views.enter_context(memory.view(b.address, b.length))
                                                             for b in pieces]
                    count = os.readv(self.fd, [*targets, self._scratch])
        except BlockingIOError:
            return None
        except OSError as exc:
            self._tap_failure(exc)
            return None
        _mark(memory, pieces, min(count, capacity))
        if count > capacity:
            self.stats.rx_dropped += 1
            return -1
        if len(header) == 1:
            memory.write(header[0].address, RX_HEADER)
        else:
            position = 0
            for buffer in header:
                memory.write(buffer.address, RX_HEADER[position:position + buffer.length])
                position += buffer.length
        self.stats.rx_frames += 1
        self.stats.rx_bytes += count
        return count


    def _tap_failure(self, exc: OSError) -> None:
        """A read from the tap failed (it is gone, EBADFD, or broken): stop receiving, keep the device. Only the
        text is logged: a kept exception would keep the caller's views of guest memory (and the mapping) alive."""
        self.stats.tap_errors += 1
        log.log(logging.WARNING if self.stats.tap_errors == 1 else logging.DEBUG,
                "%s: reading tap %s failed, receiving stops until the driver posts buffers: %s", self.name,
                self.options.tap, str(exc))
        self._watch(False)


def _mark(memory: GuestMemory, buffers: list[Buffer], count: int) -> None:
    """Record the first `count` bytes of `buffers` as written by the device (dirty tracking)."""
    for buffer in buffers:
        if count <= 0:
            return
        length = min(count, buffer.length)
        memory.mark_written(buffer.address, length)
        count -= length
