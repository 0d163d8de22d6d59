"""virtio-vsock (virtio 1.2 §5.10) in Firecracker's hybrid form: guest stream sockets meet host Unix sockets."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from pyrovisor.devices.virtio.device import ID_VSOCK, VirtioDevice
from pyrovisor.devices.virtio.mmio import TransportState
from pyrovisor.devices.virtio.queue import Buffer, DescriptorChain, QueueError, SplitQueue, memory_fence
from pyrovisor.errors import DeviceError, GuestMemoryError
from pyrovisor.events.eventfd import EventFd
from pyrovisor.memory import GuestMemory

if TYPE_CHECKING:
    from pyrovisor.devices.virtio.mmio import VirtioMmio
    from pyrovisor.events.loop import EventLoop

log = logging.getLogger(__name__)

# The protocol (virtio 1.2 §5.10).
F_STREAM = 0
RX, TX, EVENT = 0, 1, 2
HEADER = struct.Struct("<QQIIIHHIII")  # src_cid, dst_cid, src_port, dst_port, len, type, op, flags, buf_alloc, fwd_cnt
TYPE_STREAM = 1
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = 1, 2, 3, 4, 5, 6, 7
KNOWN_OPS = frozenset(range(OP_REQUEST, OP_CREDIT_REQUEST + 1))
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND
EVENT_TRANSPORT_RESET = 0
HOST_CID = 2
MIN_GUEST_CID, MAX_GUEST_CID = 3, 0xFFFFFFFE
U32 = 0xFFFFFFFF

# This device's limits.
QUEUE_SIZES = (256, 256, 64)  # rx, tx, event
BUF_ALLOC = 256 << 10  # per connection: guest bytes queued for the host socket (the credit the guest gets)
HOST_QUEUE = 256 << 10  # per connection: host bytes read and waiting for the guest's credit and buffers
MAX_PAYLOAD = 64 << 10  # the largest RW payload accepted from the guest or sent to it
MAX_CONNECTIONS = 64  # open, connecting and draining streams together
MAX_HANDSHAKES = 16  # host connections to uds_path that have not finished their CONNECT line
MAX_CONTROL = 256  # RSTs queued for addresses without a connection; more are dropped
CONNECT_LINE_MAX = 32  # "CONNECT 4294967295\n" is 19 bytes
CONNECT_TIMEOUT_S = 5.0  # the guest must accept or refuse a host connection within this
HANDSHAKE_TIMEOUT_S = 10.0  # a host connection must send its CONNECT line within this
CLOSE_TIMEOUT_S = 2.0  # after a SHUTDOWN of both directions, the guest's RST is awaited this long
DRAIN_TIMEOUT_S = 10.0  # after the guest's full shutdown, its last bytes may take this long to reach the host
ACCEPT_BACKOFF_S = 1.0  # after accept() failed (out of fds), the listening socket rests this long
FIRST_HOST_PORT, LAST_HOST_PORT = 1 << 30, (1 << 31) - 1  # ports for the host end of host connections
SUN_PATH_MAX = 107  # bytes of a Unix socket path, without the NUL
LISTEN_BACKLOG = 32
ACCEPTS_PER_WAKEUP = 16

CONNECTING, OPEN, DRAINING = "connecting", "open", "draining"


class Header(NamedTuple):
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int


@dataclass(frozen=True)
class VirtioVsockState:
    """The device's options and counters. Connections are not saved: a restored device has none and tells the
    guest so with a TRANSPORT_RESET event (`saved` marks a state taken from a running device)."""

    transport: TransportState = field(default_factory=TransportState)
    cid: int = 0
    uds_path: str = ""
    saved: bool = False
    guest_connections: int = 0
    host_connections: int = 0
    resets_sent: int = 0
    next_host_port: int = FIRST_HOST_PORT


@dataclass
class VsockStats:
    guest_connections: int = 0  # guest → host streams connected to a host socket
    host_connections: int = 0  # host → guest streams the guest accepted
    refused: int = 0  # connections refused (nobody listening, too many, the guest said no)
    resets_sent: int = 0
    tx_packets: int = 0
    rx_packets: int = 0
    dropped: int = 0  # guest packets with a foreign src_cid: nobody to answer
    control_dropped: int = 0  # RSTs not sent because too many were waiting for receive buffers
    protocol_errors: int = 0  # packets answered with RST because they broke the rules
    bytes_to_host: int = 0
    bytes_to_guest: int = 0
    transport_resets: int = 0


class _Connection:
    """One stream: the guest's (port) and the host's (port and Unix socket), and the credit both ways."""

    def __init__(self, host_port: int, guest_port: int, sock: socket.socket, state: str) -> None:
        self.host_port = host_port
        self.guest_port = guest_port
        self.sock = sock
        self.fd = sock.fileno()
        self.state = state
        self.request_pending = False  # host-initiated: our REQUEST has not reached the guest yet
        self.response_pending = False  # guest-initiated: our RESPONSE has not reached the guest yet
        self.reading = False  # watched on the event loop for host data
        self.writing = False  # watched for room in the host socket
        # guest → host
        self.to_host = bytearray()
        self.to_host_extra = 0  # bytes at the head of to_host that are ours, not the guest's (the OK line)
        self.rx_cnt = 0  # guest payload bytes received
        self.fwd_cnt = 0  # guest payload bytes handed to the host socket
        self.fwd_told = 0  # the fwd_cnt the guest last heard
        self.host_write_shut = False
        # host → guest
        self.to_guest = bytearray()
        self.tx_cnt = 0  # payload bytes sent to the guest
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.credit_requested = False  # a CREDIT_REQUEST went out since the credit last ran dry
        self.credit_update = False  # the guest asked where we stand, or should hear it
        self.host_eof = False
        self.guest_shutdown = 0  # SHUTDOWN flags the guest sent
        self.shutdown_sent = 0  # SHUTDOWN flags we sent
        self.deadline: float | None = None

    @property
    def key(self) -> tuple[int, int]:
        return self.host_port, self.guest_port

    def credit(self) -> int:
        """What the guest can take now: its buf_alloc minus our bytes it has not consumed."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32
        return max(self.peer_buf_alloc - in_flight, 0)


@dataclass
class _Handshake:
    sock: socket.socket
    fd: int
    deadline: float
    buffer: bytearray = field(default_factory=bytearray)


# --- a timer as a file descriptor, for the event loop ---------------------------------------------------------
class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Itimerspec(ctypes.Structure):
    _fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))


_libc = ctypes.CDLL(None, use_errno=True)
_libc.timerfd_create.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.timerfd_settime.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p)
CLOCK_MONOTONIC = 1


class _TimerFd:
    """A one-shot timerfd: readable once the time set with `arm` has passed."""

    def __init__(self) -> None:
        fd = _libc.timerfd_create(CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            error = ctypes.get_errno()
            raise OSError(error, f"timerfd_create: {os.strerror(error)}")
        self.fd: int = fd

    def arm(self, delay: float) -> None:
        nanoseconds = max(int(delay * 1e9), 1)
        spec = _Itimerspec()
        spec.it_value.tv_sec, spec.it_value.tv_nsec = divmod(nanoseconds, 1_000_000_000)
        if _libc.timerfd_settime(self.fd, 0, ctypes.byref(spec), None) < 0:
            error = ctypes.get_errno()
            raise OSError(error, f"timerfd_settime: {os.strerror(error)}")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 8)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --- the listening socket ----------------------------------------------------------------------------------------
def _listener_alive(path: Path) -> bool:
    """Whether a process accepts connections on the Unix socket at `path` (a stale socket refuses them)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.setblocking(False)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        return False
    except OSError:
        return True  # a full backlog, or not ours to judge: treat it as in use
    finally:
        probe.close()
    return True


def listen_unix(device: str, path: Path, take_over: bool) -> tuple[socket.socket, tuple[int, int]]:
    """A non-blocking listening socket at `path` (mode 0600) and the (st_dev, st_ino) it got.

    An existing file that is not a socket is refused; a stale socket (nobody listening) is replaced; a live
    one only with `take_over` (a restored or migrated VM takes the path over from the VMM it replaces)."""
    where = f"cannot listen on {path}"
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise DeviceError(device, f"{where}: a Unix socket path has at most {SUN_PATH_MAX} bytes")
    try:
        existing: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        existing = None
    except OSError as exc:
        raise DeviceError(device, f"{where}: {exc.strerror or exc}") from None
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise DeviceError(device, f"{where}: the file exists and is not a socket")
        if not take_over and _listener_alive(path):
            raise DeviceError(device, f"{where}: another process is listening there")
        try:
            os.unlink(path)
        except OSError as exc:
            raise DeviceError(device, f"{where}: cannot remove the old socket: {exc.strerror or exc}") from None
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    bound = False
    try:
        listener.bind(str(path))
        bound = True
        os.chmod(path, 0o600)  # before listen(): until then every connection attempt is refused
        identity = os.stat(path)
        listener.listen(LISTEN_BACKLOG)
        listener.setblocking(False)
    except OSError as exc:
        listener.close()
        if bound:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise DeviceError(device, f"{where}: {exc.strerror or exc}") from None
    return listener, (identity.st_dev, identity.st_ino)


def parse_connect(line: bytes) -> int | None:
    """The port of a host's `CONNECT <port>` line (without its newline), or None if it is not one."""
    text = line[:-1] if line.endswith(b"\r") else line
    verb, _, number = text.partition(b" ")
    if verb != b"CONNECT" or not number.isdigit() or len(number) > 10:
        return None
    port = int(number)
    return port if port <= U32 else None


class VirtioVsock(VirtioDevice):
    """A vsock device whose host side is Unix sockets (Firecracker's model).

    Guest → host: a REQUEST to CID 2 port P connects to `{uds_path}_P`; if nobody listens, the guest gets RST.
    Host → guest: a program connects to `uds_path` and writes `CONNECT <port>\\n`; the device sends the guest a
    REQUEST and, once the guest answers RESPONSE, writes `OK <host_port>\\n` back, or closes the connection if
    the guest refuses (RST) or does not answer within CONNECT_TIMEOUT_S.

    Every Unix socket is non-blocking and watched by the VM's event loop while the device wants its data (host
    bytes are read only while the guest has credit for them, so they wait in the host socket otherwise). Room
    to write is watched through an epoll instance of the device's own (the loop watches only readability),
    deadlines through a timerfd. All state changes happen with the transport's lock held.
    """

    device_id = ID_VSOCK
    features = 1 << F_STREAM
    queue_sizes = QUEUE_SIZES

    def __init__(self, cid: int, uds_path: Path, state: VirtioVsockState | None = None, name: str = "vsock") -> None:
        super().__init__()
        if not MIN_GUEST_CID <= cid <= MAX_GUEST_CID:
            raise DeviceError(name, f"guest cid {cid} is reserved or too large (3 to {MAX_GUEST_CID})")
        if not str(uds_path):
            raise DeviceError(name, "needs a Unix socket path")
        saved = state or VirtioVsockState()
        self.name = name
        self.cid = cid
        self.uds_path = uds_path
        self.stats = VsockStats(guest_connections=saved.guest_connections, host_connections=saved.host_connections,
                                resets_sent=saved.resets_sent)
        self._next_host_port = saved.next_host_port if FIRST_HOST_PORT <= saved.next_host_port <= LAST_HOST_PORT \
            else FIRST_HOST_PORT
        self._lock: threading.RLock = threading.RLock()  # the transport's lock once started
        self._loop: EventLoop | None = None
        self._kick: Callable[[int], None] = lambda index: None
        self._closed = False
        self._failure = ""  # an internal error: the next queue work breaks the device with it
        self._connections: dict[tuple[int, int], _Connection] = {}
        self._draining: dict[int, _Connection] = {}  # by fd: reset for the guest, still flushing to the host
        self._by_fd: dict[int, _Connection] = {}
        self._handshakes: dict[int, _Handshake] = {}
        self._doomed: list[_Connection | _Handshake] = []  # to close on the loop thread
        self._ready: dict[tuple[int, int], None] = {}  # connections with something for the guest, in turn
        self._unflushed: dict[tuple[int, int], _Connection] = {}  # guest data of this batch, not yet written
        self._control: deque[tuple[int, int, int]] = deque()  # RSTs for no connection: (src_cid, src_port, dst_port)
        self._reset_event = saved.saved  # a restored device tells the guest its connections are gone
        self._timer_at: float | None = None
        self._listen_again_at: float | None = None  # the listener is off the loop until then
        self._on_loop: list[int] = []  # fds of the device's own sources on the loop
        self._listener, self._identity = listen_unix(name, uds_path, take_over=saved.saved)
        self._timer: _TimerFd | None = None
        self._writers: select.epoll | None = None
        self._wakeup: EventFd | None = None
        try:
            self._timer = _TimerFd()
            self._writers = select.epoll()
            self._wakeup = EventFd()
        except BaseException:
            self._release()
            raise

    # --- wiring ---------------------------------------------------------------------------------------------------
    def start(self, transport: VirtioMmio) -> None:
        """Join the transport (its lock, its kick) and put the device's sources on the VM's event loop."""
        assert self._timer is not None and self._wakeup is not None and self._writers is not None
        self._lock = transport.lock
        self._kick = transport.kick
        loop = self._loop = transport.wiring.loop
        for source, handler, label in ((self._listener, self._on_accept, "listen"),
                                       (self._writers, self._on_writable, "writable"),
                                       (self._timer, self._on_timer, "timer"),
                                       (self._wakeup, self._on_wakeup, "wakeup")):
            loop.add(source, handler, f"{self.name}.{label}", self._internal_error)
            self._on_loop.append(source.fileno())
        self._wakeup.signal()  # once the loop runs: look at every queue (and tell a restored guest of the reset)

    def config(self) -> bytes:
        """guest_cid (le64, §5.10.4)."""
        return struct.pack("<Q", self.cid)

    def reset(self) -> None:
        """The driver reset the device: every connection is gone (closed on the loop thread)."""
        for conn in [*self._connections.values(), *self._draining.values()]:
            self._forget(conn)
            self._by_fd.pop(conn.fd, None)
            self._doomed.append(conn)
        self._connections.clear()
        self._draining.clear()
        self._ready.clear()
        self._unflushed.clear()
        self._control.clear()
        self._reset_event = False
        self._failure = ""
        super().reset()
        if self._loop is None or not self._loop.running:
            self._close_doomed()
        elif self._wakeup is not None:
            self._wakeup.signal()  # removing sources from the loop must not wait here, on a vCPU thread

    def save_device(self, transport: TransportState) -> VirtioVsockState:
        stats = self.stats
        return VirtioVsockState(transport, self.cid, str(self.uds_path), True, stats.guest_connections,
                                stats.host_connections, stats.resets_sent, self._next_host_port)

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._connections) + len(self._draining)

    # --- queue work (the transport's lock held) ----------------------------------------------------------------
    def process(self, queue_index: int) -> None:
        if self._failure:
            raise QueueError(self._failure)
        if self._loop is None:
            return  # a restoring transport looks at its queues before the device has joined the event loop
        try:
            if queue_index == TX:
                self._transmit(self.queues[TX])
                self._deliver()
            elif queue_index == RX:
                self._deliver()
            elif queue_index == EVENT:
                self._deliver_event()
        except GuestMemoryError as exc:  # chains are checked; only a bug gets here, and it breaks the device
            raise QueueError(f"guest memory access failed: {exc}") from None
        finally:
            self._arm_timer()

    def _transmit(self, queue: SplitQueue) -> None:
        memory = queue.memory
        done = False
        try:
            for chain in queue.available_chains():
                if chain.readable_length < HEADER.size:
                    raise QueueError(f"transmit chain of {chain.readable_length} bytes, shorter than the "
                                     f"{HEADER.size}-byte packet header")
                header_bytes, payload = _split(memory, chain.readable, HEADER.size)
                self.stats.tx_packets += 1
                self._guest_packet(Header(*HEADER.unpack(header_bytes)), memory, payload)
                queue.add_used(chain.head, 0)
                done = True
        finally:
            if done:
                self.publish(queue)
            unflushed, self._unflushed = self._unflushed, {}
            for conn in unflushed.values():  # one write per stream and batch, not one per packet
                if self._by_fd.get(conn.fd) is conn and self._flush(conn):
                    self._update(conn)

    def _deliver(self) -> None:
        """Fill receive buffers with what is waiting for the guest: RSTs first, then the streams in turn."""
        if len(self.queues) <= RX or not self.queues[RX].ready:
            return
        queue = self.queues[RX]
        delivered = False
        while self._control or self._next_ready() is not None:
            chain = _pop(queue)
            if chain is None:
                break
            self._fill(queue.memory, chain)
            delivered = True
        if delivered:
            self.publish(queue)

    def _fill(self, memory: GuestMemory, chain: DescriptorChain) -> None:
        capacity = chain.writable_length
        if capacity < HEADER.size:
            raise QueueError(f"receive buffer of {capacity} bytes cannot hold a {HEADER.size}-byte packet header")
        if self._control:
            src_cid, src_port, dst_port = self._control.popleft()
            packet = HEADER.pack(src_cid, self.cid, src_port, dst_port, 0, TYPE_STREAM, OP_RST, 0, 0, 0)
        else:
            conn = self._next_ready()
            assert conn is not None
            packet = self._conn_packet(conn, min(capacity - HEADER.size, MAX_PAYLOAD))
            del self._ready[conn.key]
            if self._has_output(conn):
                self._ready[conn.key] = None  # to the back: the streams take turns
            self._update_reading(conn)
        _scatter(memory, chain.writable, packet)
        self.queues[RX].add_used(chain.head, len(packet))
        self.stats.rx_packets += 1

    def _deliver_event(self) -> None:
        if not self._reset_event or len(self.queues) <= EVENT or not self.queues[EVENT].ready:
            return
        queue = self.queues[EVENT]
        chain = _pop(queue)
        if chain is None:
            return
        if chain.writable_length < 4:
            raise QueueError(f"event buffer of {chain.writable_length} bytes (an event is 4)")
        _scatter(queue.memory, chain.writable, struct.pack("<I", EVENT_TRANSPORT_RESET))
        queue.add_used(chain.head, 4)
        self._reset_event = False
        self.stats.transport_resets += 1
        self.publish(queue)

    # --- packets from the guest -----------------------------------------------------------------------------------
    def _guest_packet(self, header: Header, memory: GuestMemory, payload: list[Buffer]) -> None:
        if header.src_cid != self.cid:
            self.stats.dropped += 1  # not from this guest's address: there is nobody to answer
            return
        key = (header.dst_port, header.src_port)
        conn = self._connections.get(key)
        if header.op == OP_RST:
            if conn is not None:
                self._discard(conn)  # the guest closed or refused: no answer
            return
        payload_length = sum(buffer.length for buffer in payload)
        if header.dst_cid != HOST_CID or header.type != TYPE_STREAM or header.op not in KNOWN_OPS or \
                header.len > MAX_PAYLOAD or header.len > payload_length:
            self.stats.protocol_errors += 1
            if conn is not None:
                self._reset(conn)
            else:
                self._queue_rst(header.dst_cid, header.dst_port, header.src_port)
            return
        if header.op == OP_REQUEST:
            if conn is not None:  # a second REQUEST for a live stream
                self.stats.protocol_errors += 1
                self._reset(conn)
            else:
                self._connect_to_host(header)
            return
        if conn is None:
            self._queue_rst(HOST_CID, header.dst_port, header.src_port)
            return
        if not self._take_credit(conn, header):
            self.stats.protocol_errors += 1
            self._reset(conn)
            return
        if conn.state == CONNECTING:
            if header.op == OP_RESPONSE:
                self._accepted_by_guest(conn)
            else:
                self.stats.protocol_errors += 1
                self._reset(conn)
            return
        op = header.op
        if op == OP_RW:
            if not self._guest_data(conn, header.len, memory, payload):
                return
        elif op == OP_CREDIT_REQUEST:
            conn.credit_update = True
        elif op == OP_SHUTDOWN:
            if not self._guest_shutdown(conn, header.flags):
                return
        elif op == OP_RESPONSE:
            self.stats.protocol_errors += 1
            self._reset(conn)
            return
        self._update(conn)

    def _take_credit(self, conn: _Connection, header: Header) -> bool:
        """Take the guest's buf_alloc and fwd_cnt; False if fwd_cnt went back or beyond what we sent."""
        before = (conn.tx_cnt - conn.peer_fwd_cnt) & U32
        after = (conn.tx_cnt - header.fwd_cnt) & U32
        if after > before:
            return False
        conn.peer_buf_alloc, conn.peer_fwd_cnt = header.buf_alloc, header.fwd_cnt
        if conn.credit():
            conn.credit_requested = False
        return True

    def _connect_to_host(self, header: Header) -> None:
        """The guest connects to host port P: connect to `{uds_path}_P` or refuse with RST."""
        if len(self._connections) + len(self._draining) >= MAX_CONNECTIONS or header.fwd_cnt != 0:
            self.stats.refused += 1
            self._queue_rst(HOST_CID, header.dst_port, header.src_port)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            sock.connect(f"{self.uds_path}_{header.dst_port}")
        except OSError as exc:  # nobody listens, no such file, a full backlog, a path too long
            sock.close()
            log.debug("%s: guest connection to port %d refused: %s", self.name, header.dst_port, exc)
            self.stats.refused += 1
            self._queue_rst(HOST_CID, header.dst_port, header.src_port)
            return
        conn = _Connection(header.dst_port, header.src_port, sock, OPEN)
        conn.peer_buf_alloc = header.buf_alloc
        conn.response_pending = True
        self._add(conn)
        self.stats.guest_connections += 1
        self._update(conn)

    def _accepted_by_guest(self, conn: _Connection) -> None:
        """The guest answered a host connection's REQUEST: tell the host program and start moving bytes."""
        conn.state = OPEN
        conn.deadline = None
        line = f"OK {conn.host_port}\n".encode()
        conn.to_host[:0] = line
        conn.to_host_extra += len(line)
        self.stats.host_connections += 1
        if self._flush(conn):
            self._update(conn)

    def _guest_data(self, conn: _Connection, length: int, memory: GuestMemory, payload: list[Buffer]) -> bool:
        """RW: queue the bytes for the host socket (written after the batch). False if the stream was reset."""
        if not length:
            return True
        queued = len(conn.to_host) - conn.to_host_extra
        if conn.guest_shutdown & SHUTDOWN_SEND or conn.host_write_shut or queued + length > BUF_ALLOC:
            self.stats.protocol_errors += 1  # data after its SHUTDOWN, or beyond the credit we gave
            self._reset(conn)
            return False
        conn.rx_cnt = (conn.rx_cnt + length) & U32
        for buffer in _take(payload, length):
            conn.to_host += memory.read(buffer.address, buffer.length)
        self._unflushed[conn.key] = conn  # written once the whole batch of packets is in
        return True

    def _guest_shutdown(self, conn: _Connection, flags: int) -> bool:
        """SHUTDOWN: pass each direction's end on to the host socket. False once the stream is gone."""
        flags &= SHUTDOWN_BOTH
        conn.guest_shutdown |= flags
        if flags & SHUTDOWN_RCV:
            conn.to_guest.clear()
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RD)  # the host program's writes now fail
        if conn.guest_shutdown == SHUTDOWN_BOTH:
            # The receiver of a full shutdown answers RST (§5.10.6.6); what is still queued goes to the host.
            self._queue_rst(HOST_CID, conn.host_port, conn.guest_port)
            self._retire(conn)
            return False
        return self._flush(conn)

    # --- the host side ------------------------------------------------------------------------------------------
    def _flush(self, conn: _Connection) -> bool:
        """Write queued guest bytes to the host socket; watch for room if it is full. False if reset."""
        while conn.to_host:
            try:
                with memoryview(conn.to_host) as view:
                    sent = conn.sock.send(view, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                self._watch_writable(conn, True)
                return True
            except OSError:  # the host program is gone
                if conn.state == DRAINING:
                    self._discard(conn)
                else:
                    self._reset(conn)
                return False
            extra = min(sent, conn.to_host_extra)
            conn.to_host_extra -= extra
            conn.fwd_cnt = (conn.fwd_cnt + sent - extra) & U32
            self.stats.bytes_to_host += sent - extra
            del conn.to_host[:sent]
        self._watch_writable(conn, False)
        if conn.state == DRAINING:
            self._discard(conn)
            return False
        if conn.guest_shutdown & SHUTDOWN_SEND and not conn.host_write_shut:
            conn.host_write_shut = True
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)  # the host program reads end of file
        unannounced = (conn.fwd_cnt - conn.fwd_told) & U32
        seen_free = BUF_ALLOC - ((conn.rx_cnt - conn.fwd_told) & U32)
        if unannounced and seen_free < BUF_ALLOC // 2:
            conn.credit_update = True  # the guest thinks our buffer is half full: tell it otherwise
        return True

    def _host_room(self, conn: _Connection) -> int:
        return min(conn.credit(), HOST_QUEUE) - len(conn.to_guest)

    def _on_stream_readable(self, conn: _Connection) -> None:
        with self._lock:
            if self._closed or self._by_fd.get(conn.fd) is not conn or not conn.reading:
                return
            room = self._host_room(conn)
            if room <= 0:
                self._update_reading(conn)
                return
            try:
                data = conn.sock.recv(min(room, MAX_PAYLOAD))
            except BlockingIOError:
                return
            except OSError:
                self._reset(conn)
                self._kick(RX)
                return
            if data:
                conn.to_guest += data
            else:
                conn.host_eof = True
            self._update(conn)
            self._kick(RX)

    def _on_writable(self) -> None:
        with self._lock:
            if self._closed or self._writers is None:
                return
            for fd, _ in self._writers.poll(0):
                conn = self._by_fd.get(fd)
                if conn is None:
                    with contextlib.suppress(OSError):
                        self._writers.unregister(fd)
                    continue
                if self._flush(conn) and conn.key in self._connections:
                    self._update(conn)
            self._kick(RX)

    def _on_accept(self) -> None:
        with self._lock:
            if self._closed:
                return
            for _ in range(ACCEPTS_PER_WAKEUP):
                try:
                    sock, _ = self._listener.accept()
                except BlockingIOError:
                    return
                except OSError as exc:  # out of fds: the connection waits in the backlog, the loop must not spin
                    log.warning("%s: cannot accept a host connection, pausing for %.0f s: %s", self.name,
                                ACCEPT_BACKOFF_S, exc)
                    if self._loop is not None:
                        self._loop.remove(self._listener)
                    self._listen_again_at = time.monotonic() + ACCEPT_BACKOFF_S
                    self._arm_timer()
                    return
                if len(self._handshakes) >= MAX_HANDSHAKES or \
                        len(self._connections) + len(self._draining) >= MAX_CONNECTIONS:
                    self.stats.refused += 1
                    sock.close()
                    continue
                sock.setblocking(False)
                handshake = _Handshake(sock, sock.fileno(), time.monotonic() + HANDSHAKE_TIMEOUT_S)
                self._handshakes[handshake.fd] = handshake
                assert self._loop is not None
                self._loop.add(sock, functools.partial(self._on_handshake, handshake), f"{self.name}.handshake",
                               self._internal_error)
                self._arm_timer()

    def _on_handshake(self, handshake: _Handshake) -> None:
        """Read the host's `CONNECT <port>\\n`; then send the guest a REQUEST for that port."""
        with self._lock:
            if self._closed or self._handshakes.get(handshake.fd) is not handshake:
                return
            try:
                data = handshake.sock.recv(CONNECT_LINE_MAX)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            handshake.buffer += data
            line, newline, rest = bytes(handshake.buffer).partition(b"\n")
            if data and not newline and len(handshake.buffer) <= CONNECT_LINE_MAX:
                return  # more to come
            port = parse_connect(line) if newline else None
            self._end_handshake(handshake, close=port is None)
            if port is None:
                self.stats.refused += 1
                return
            host_port = self._allocate_port(port)
            if host_port is None:
                self.stats.refused += 1
                handshake.sock.close()
                return
            conn = _Connection(host_port, port, handshake.sock, CONNECTING)
            conn.request_pending = True
            conn.to_guest += rest  # bytes sent right after the line go to the guest once it accepts
            conn.deadline = time.monotonic() + CONNECT_TIMEOUT_S
            self._add(conn)
            self._update(conn)
            self._arm_timer()
            self._kick(RX)

    def _end_handshake(self, handshake: _Handshake, close: bool) -> None:
        del self._handshakes[handshake.fd]
        if self._loop is not None:
            self._loop.remove(handshake.sock)
        if close:
            handshake.sock.close()

    def _allocate_port(self, guest_port: int) -> int | None:
        if len(self._connections) + len(self._draining) >= MAX_CONNECTIONS:
            return None
        for _ in range(MAX_CONNECTIONS + 1):
            port = self._next_host_port
            self._next_host_port = port + 1 if port < LAST_HOST_PORT else FIRST_HOST_PORT
            if (port, guest_port) not in self._connections:
                return port
        return None

    def _on_timer(self) -> None:
        with self._lock:
            assert self._timer is not None
            self._timer.drain()
            self._timer_at = None
            if self._closed:
                return
            now = time.monotonic()
            if self._listen_again_at is not None and self._listen_again_at <= now and self._loop is not None:
                self._listen_again_at = None
                self._loop.add(self._listener, self._on_accept, f"{self.name}.listen", self._internal_error)
            for handshake in list(self._handshakes.values()):
                if handshake.deadline <= now:
                    self.stats.refused += 1
                    self._end_handshake(handshake, close=True)
            for conn in [*self._connections.values(), *self._draining.values()]:
                if conn.deadline is None or conn.deadline > now:
                    continue
                if conn.state == CONNECTING:
                    self.stats.refused += 1  # the guest did not answer: nobody listens there, in effect
                    self._reset(conn)
                elif conn.state == OPEN:
                    self._reset(conn)  # both ways shut down and the guest's RST never came
                else:
                    self._discard(conn)  # the host never took the last bytes
            self._arm_timer()
            self._kick(RX)

    def _on_wakeup(self) -> None:
        """Deferred work: close what a reset left behind; after start, look at every queue (a restored device
        delivers its TRANSPORT_RESET and serves what the driver made available before the save)."""
        with self._lock:
            assert self._wakeup is not None
            self._wakeup.drain()
            self._close_doomed()
            if not self._closed:
                for index in (EVENT, TX, RX):
                    self._kick(index)

    def _close_doomed(self) -> None:
        doomed, self._doomed = self._doomed, []
        for item in doomed:
            self._close_socket(item)

    def _internal_error(self, source: str, error: BaseException) -> None:
        """A handler failed (a bug): the device stops until the driver resets it."""
        with self._lock:
            self._failure = f"{source}: internal error {error!r}"
            for index in (TX, RX):
                self._kick(index)

    # --- connection bookkeeping ------------------------------------------------------------------------------
    def _add(self, conn: _Connection) -> None:
        self._connections[conn.key] = conn
        self._by_fd[conn.fd] = conn

    def _update(self, conn: _Connection) -> None:
        """After a change: queue the stream for the guest if it has something to send, (un)watch its socket."""
        if self._connections.get(conn.key) is not conn:
            return
        if self._has_output(conn):
            self._ready.setdefault(conn.key, None)
        self._update_reading(conn)

    def _update_reading(self, conn: _Connection) -> None:
        want = conn.state == OPEN and not conn.host_eof and not conn.guest_shutdown & SHUTDOWN_RCV and \
            self._host_room(conn) > 0 and self._connections.get(conn.key) is conn
        if want == conn.reading or self._loop is None:
            return
        if want:
            self._loop.add(conn.sock, functools.partial(self._on_stream_readable, conn), f"{self.name}.stream",
                           self._internal_error)
        else:
            self._loop.remove(conn.sock)
        conn.reading = want

    def _watch_writable(self, conn: _Connection, on: bool) -> None:
        if on == conn.writing or self._writers is None:
            return
        if on:
            self._writers.register(conn.fd, select.EPOLLOUT)
        else:
            self._writers.unregister(conn.fd)
        conn.writing = on

    def _shutdown_due(self, conn: _Connection) -> int:
        """The SHUTDOWN flags the guest should hear and has not: SEND once the host's data ended and was
        delivered, with RCV when the guest will send nothing more either."""
        if not conn.host_eof or conn.to_guest:
            return 0
        wanted = SHUTDOWN_SEND | (SHUTDOWN_RCV if conn.guest_shutdown & SHUTDOWN_SEND else 0)
        return wanted & ~conn.shutdown_sent

    def _has_output(self, conn: _Connection) -> bool:
        if conn.request_pending:
            return True
        if conn.state != OPEN:
            return False
        credit = conn.credit()
        return conn.response_pending or bool(conn.to_guest and credit) or bool(self._shutdown_due(conn)) or \
            conn.credit_update or self._should_ask_credit(conn, credit)

    @staticmethod
    def _should_ask_credit(conn: _Connection, credit: int) -> bool:
        """Once each time the guest's credit runs out while the host may still send: CREDIT_REQUEST."""
        return not credit and not conn.credit_requested and not conn.host_eof and \
            not conn.guest_shutdown & SHUTDOWN_RCV

    def _next_ready(self) -> _Connection | None:
        for key in list(self._ready):
            conn = self._connections.get(key)
            if conn is not None and self._has_output(conn):
                return conn
            del self._ready[key]
        return None

    def _conn_packet(self, conn: _Connection, room: int) -> bytes:
        """The next packet of a stream for the guest, with a payload of at most `room` bytes."""
        op, flags, payload = OP_CREDIT_UPDATE, 0, b""
        credit = conn.credit()
        if conn.request_pending:
            op, conn.request_pending = OP_REQUEST, False
        elif conn.response_pending:
            op, conn.response_pending = OP_RESPONSE, False
        elif conn.to_guest and credit and room:
            count = min(len(conn.to_guest), credit, room)
            payload = bytes(conn.to_guest[:count])
            del conn.to_guest[:count]
            conn.tx_cnt = (conn.tx_cnt + count) & U32
            self.stats.bytes_to_guest += count
            op = OP_RW
        elif due := self._shutdown_due(conn):
            op, flags = OP_SHUTDOWN, conn.shutdown_sent | due
            conn.shutdown_sent = flags
            if flags == SHUTDOWN_BOTH:
                conn.deadline = time.monotonic() + CLOSE_TIMEOUT_S
        elif self._should_ask_credit(conn, credit) and not conn.credit_update:
            op, conn.credit_requested = OP_CREDIT_REQUEST, True
        conn.credit_update = False
        conn.fwd_told = conn.fwd_cnt
        return HEADER.pack(HOST_CID, self.cid, conn.host_port, conn.guest_port, len(payload), TYPE_STREAM, op, flags,
                           BUF_ALLOC, conn.fwd_cnt) + payload

    def _queue_rst(self, src_cid: int, src_port: int, dst_port: int) -> None:
        if len(self._control) >= MAX_CONTROL:
            self.stats.control_dropped += 1
            return
        self._control.append((src_cid, src_port, dst_port))
        self.stats.resets_sent += 1

    def _reset(self, conn: _Connection) -> None:
        """End a stream with RST to the guest (unless it never heard of it) and close its host socket."""
        if conn.state != DRAINING and not conn.request_pending:
            self._queue_rst(HOST_CID, conn.host_port, conn.guest_port)
        self._discard(conn)

    def _retire(self, conn: _Connection) -> None:
        """The guest is done with a stream: close it, or let its last bytes drain to the host first."""
        if not conn.to_host:
            self._discard(conn)
            return
        self._forget(conn)
        self._update_reading(conn)  # no longer the guest's: stop reading
        conn.state = DRAINING
        conn.deadline = time.monotonic() + DRAIN_TIMEOUT_S
        self._draining[conn.fd] = conn
        self._flush(conn)

    def _forget(self, conn: _Connection) -> None:
        """Take a stream out of the guest's view (its socket stays as it is)."""
        if self._connections.get(conn.key) is conn:
            del self._connections[conn.key]
            self._ready.pop(conn.key, None)

    def _discard(self, conn: _Connection) -> None:
        """Forget a stream and close its host socket (on the loop thread, or before the loop runs)."""
        self._forget(conn)
        self._draining.pop(conn.fd, None)
        self._close_socket(conn)

    def _close_socket(self, item: _Connection | _Handshake) -> None:
        if self._by_fd.get(item.fd) is item:
            del self._by_fd[item.fd]
        if isinstance(item, _Connection):
            if item.writing and self._writers is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._writers.unregister(item.fd)
                item.writing = False
            if item.reading and self._loop is not None:
                self._loop.remove(item.sock)
            item.reading = False
        item.sock.close()

    def _arm_timer(self) -> None:
        if self._timer is None or self._closed:
            return
        deadlines = [handshake.deadline for handshake in self._handshakes.values()]
        if self._listen_again_at is not None:
            deadlines.append(self._listen_again_at)
        deadlines += [conn.deadline for conn in (*self._connections.values(), *self._draining.values())
                      if conn.deadline is not None]
        if not deadlines:
            return
        earliest = min(deadlines)
        if self._timer_at is not None and self._timer_at <= earliest:
            return
        self._timer.arm(earliest - time.monotonic())
        self._timer_at = earliest

    # --- teardown -------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop watching every socket, close them all and remove the listening socket's path."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns = [*self._connections.values(), *self._draining.values(),
                     *(item for item in self._doomed if isinstance(item, _Connection))]
            watched = [conn.fd for conn in conns if conn.reading] + list(self._handshakes) + self._on_loop
            self._connections.clear()
            self._draining.clear()
            self._ready.clear()
        if self._loop is not None:  # without the lock: the loop thread may be waiting for it
            for fd in watched:
                self._loop.remove(fd)
        with self._lock:
            for conn in conns:
                conn.reading = False
                with contextlib.suppress(OSError):
                    conn.sock.close()
            for handshake in self._handshakes.values():
                handshake.sock.close()
            for item in self._doomed:
                item.sock.close()  # a handshake (connections were closed above; closing twice is harmless)
            self._handshakes.clear()
            self._doomed.clear()
            self._by_fd.clear()
            self._on_loop = []
            self._release()

    def _release(self) -> None:
        for resource in (self._timer, self._writers, self._wakeup):
            if resource is not None:
                resource.close()
        self._listener.close()
        try:
            current = os.lstat(self.uds_path)
        except OSError:
            return
        if (current.st_dev, current.st_ino) == self._identity:  # still ours, not a successor's
            with contextlib.suppress(OSError):
                os.unlink(self.uds_path)


# --- helpers ---------------------------------------------------------------------------------------------------
def _pop(queue: SplitQueue) -> DescriptorChain | None:
    """The next available chain; when there is none, ask the driver to notify and look once more."""
    chain = queue.pop()
    if chain is None:
        queue.want_notifications()
        memory_fence()
        chain = queue.pop()
    return chain


def _split(memory: GuestMemory, readable: tuple[Buffer, ...], size: int) -> tuple[bytes, list[Buffer]]:
    """The first `size` bytes of a chain's readable buffers (they may span descriptors) and the buffers after."""
    head = bytearray()
    rest: list[Buffer] = []
    for buffer in readable:
        need = size - len(head)
        if need > 0:
            take = min(need, buffer.length)
            head += memory.read(buffer.address, take)
            if buffer.length > take:
                rest.append(Buffer(buffer.address + take, buffer.length - take))
        elif buffer.length:
            rest.append(buffer)
    return bytes(head), rest


def _take(buffers: list[Buffer], count: int) -> list[Buffer]:
    """The buffers holding the first `count` bytes (the last one cut short)."""
    taken: list[Buffer] = []
    for buffer in buffers:
        if count <= 0:
            break
        length = min(buffer.length, count)
        taken.append(Buffer(buffer.address, length))
        count -= length
    return taken


def _scatter(memory: GuestMemory, buffers: tuple[Buffer, ...], data: bytes) -> None:
    """Write `data` across device-writable buffers (they hold at least that much)."""
    position = 0
    for buffer in buffers:
        if position >= len(data):
            break
        piece = data[position:position + buffer.length]
        memory.write(buffer.address, piece)  # GuestMemory.write records the pages for dirty tracking
        position += len(piece)
