"""A small vhost-user vsock backend for QEMU's `vhost-user-vsock-device`, written for the tests: it serves the
device's receive and transmit queues straight from guest memory (split virtqueues, no EVENT_IDX or indirect
descriptors offered) and plays the host side of the vsock stream protocol itself (CID 2), with no AF_VSOCK
involved, so the OS's user-mode vsock driver can be tested on a host without /dev/vhost-vsock.

The host side: a service on SERVICE_PORT answers each line with "pong: LINE\\n"; any other port refuses with
RST; `connect(port, data)` opens a connection to the guest, sends `data` within the guest's credit, collects
what comes back and shuts down. Every header the guest sends is checked against the credit the host granted.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import socket
import struct
import threading
from dataclasses import dataclass, field

SERVICE_PORT = 1234
HOST_CID = 2
HOST_BUF_ALLOC = 16384  # small, so the guest has to wait for credit

# vhost-user requests (docs/interop/vhost-user.rst).
GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE = 1, 2, 3, 4, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
GET_CONFIG = 24
REPLY_FLAGS = 0x1 | 0x4  # version 1, reply
VIRTIO_F_VERSION_1 = 1 << 32
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
PROTOCOL_F_CONFIG = 1 << 9

VRING_DESC_F_NEXT, VRING_DESC_F_WRITE = 1, 2
VRING_AVAIL_F_NO_INTERRUPT = 1

HEADER = struct.Struct("<QQIIIHHIII")  # struct virtio_vsock_hdr, 44 bytes
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = 1, 2, 3, 4, 5, 6, 7
TYPE_STREAM = 1
SHUTDOWN_BOTH = 3
RX, TX = 0, 1


@dataclass
class Ring:
    size: int = 0
    desc: int = 0  # QEMU's addresses of the three parts
    avail: int = 0
    used: int = 0
    last_avail: int = 0
    kick: int = -1
    call: int = -1
    started: bool = False


@dataclass
class Connection:
    guest_port: int
    host_port: int
    guest_buf_alloc: int = 0
    guest_fwd_cnt: int = 0
    tx_cnt: int = 0  # bytes the host sent
    fwd_cnt: int = 0  # bytes the host consumed
    fwd_cnt_told: int = 0  # the fwd_cnt in the last header the guest received
    received: bytearray = field(default_factory=bytearray)
    to_send: bytearray = field(default_factory=bytearray)
    connected: bool = False
    closed: bool = False
    reset_by_guest: bool = False
    shutdown_after_send: bool = False  # host-initiated: shut down once everything sent came back
    expect_back: int = 0


class VsockBackend:
    def __init__(self, path: str, guest_cid: int = 3) -> None:
        self.path = path
        self.guest_cid = guest_cid
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.rings = [Ring(), Ring()]
        self.regions: list[tuple[int, int, int, mmap.mmap, int]] = []  # (gpa, size, user address, map, offset)
        self.lock = threading.Lock()
        self.wake_read, self.wake_write = os.pipe()
        self.connections: dict[tuple[int, int], Connection] = {}
        self.outbox: list[tuple[bytes, Connection, int]] = []  # for the guest's receive queue, with fwd_cnt
        self.log: list[str] = []
        self.errors: list[str] = []  # protocol violations by the guest
        self.requests: list[tuple[int, int, int]] = []  # (src_cid, src_port, dst_port) of REQUESTs seen
        self.unknown_requests: list[int] = []
        self.stopped = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    # --- the test's side --------------------------------------------------------------------------------------
    def connect(self, guest_port: int, data: bytes, host_port: int = 5555) -> Connection:
        with self.lock:
            connection = Connection(guest_port, host_port, to_send=bytearray(data), shutdown_after_send=True,
                                    expect_back=len(data))
            self.connections[(guest_port, host_port)] = connection
            self._send(connection, OP_REQUEST)
        os.write(self.wake_write, b"x")
        return connection

    def close(self) -> None:
        self.stopped = True
        os.write(self.wake_write, b"x")
        self.thread.join(5)
        self.listener.close()
        for _, _, _, mapping, _ in self.regions:
            with contextlib.suppress(BufferError):
                mapping.close()

    # --- vhost-user control messages ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            ready, _, _ = select.select([self.listener, self.wake_read], [], [], 60)
            if self.listener not in ready:
                return
            connection, _ = self.listener.accept()
            with connection:
                self._serve(connection)
        except Exception as error:  # the test reads this
            self.errors.append(f"backend crashed: {error!r}")
            raise

    def _serve(self, control: socket.socket) -> None:
        while not self.stopped:
            watched = [control, self.wake_read] + [ring.kick for ring in self.rings if ring.kick >= 0]
            ready, _, _ = select.select(watched, [], [], 0.5)
            if self.wake_read in ready:
                os.read(self.wake_read, 64)
            if control in ready and not self._message(control):
                return
            for ring in self.rings:
                if ring.kick >= 0 and ring.kick in ready:
                    os.read(ring.kick, 8)
            with self.lock:
                self._process()

    def _message(self, control: socket.socket) -> bool:
        data, fds, _, _ = socket.recv_fds(control, 12, 8)
        if not data:
            return False
        while len(data) < 12:
            data += control.recv(12 - len(data))
        request, _, size = struct.unpack("<III", data)
        payload = b""
        while len(payload) < size:
            more, more_fds, _, _ = socket.recv_fds(control, size - len(payload), 8)
            payload += more
            fds += more_fds
        with self.lock:
            reply = self._handle(request, payload, list(fds))
        if reply is not None:
            control.sendall(struct.pack("<III", request, REPLY_FLAGS, len(reply)) + reply)
        return True

    def _handle(self, request: int, payload: bytes, fds: list[int]) -> bytes | None:
        if request == GET_FEATURES:
            return struct.pack("<Q", VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES)
        if request == GET_PROTOCOL_FEATURES:
            return struct.pack("<Q", PROTOCOL_F_CONFIG)
        if request == GET_QUEUE_NUM:
            return struct.pack("<Q", 2)
        if request == GET_CONFIG:
            offset, size, flags = struct.unpack_from("<III", payload)
            config = struct.pack("<Q", self.guest_cid).ljust(offset + size, b"\0")[offset:offset + size]
            return struct.pack("<III", offset, size, flags) + config
        if request == SET_MEM_TABLE:
            count = struct.unpack_from("<I", payload)[0]
            self.regions = []
            for index in range(count):
                gpa, size, user, offset = struct.unpack_from("<QQQQ", payload, 8 + 32 * index)
                mapping = mmap.mmap(fds[index], size + offset, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                os.close(fds[index])
                self.regions.append((gpa, size, user, mapping, offset))
            return None
        if request == SET_VRING_NUM:
            index, number = struct.unpack_from("<II", payload)
            self.rings[index].size = number
            return None
        if request == SET_VRING_BASE:
            index, number = struct.unpack_from("<II", payload)
            self.rings[index].last_avail = number
            return None
        if request == SET_VRING_ADDR:
            index, _, desc, used, avail, _ = struct.unpack_from("<IIQQQQ", payload)
            ring = self.rings[index]
            ring.desc, ring.used, ring.avail = desc, used, avail
            return None
        if request in (SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR):
            value = struct.unpack_from("<Q", payload)[0]
            index, fd = value & 0xFF, (fds[0] if fds and not value & 0x100 else -1)
            if request == SET_VRING_ERR:
                if fd >= 0:
                    os.close(fd)
                return None
            ring = self.rings[index]
            old = ring.kick if request == SET_VRING_KICK else ring.call
            if old >= 0:
                os.close(old)
            if request == SET_VRING_KICK:
                ring.kick, ring.started = fd, fd >= 0
            else:
                ring.call = fd
            return None
        if request == GET_VRING_BASE:
            index = struct.unpack_from("<I", payload)[0]
            ring = self.rings[index]
            ring.started = False
            return struct.pack("<II", index, ring.last_avail)
        if request in (SET_FEATURES, SET_OWNER, RESET_OWNER, SET_PROTOCOL_FEATURES, SET_VRING_ENABLE):
            return None
        self.unknown_requests.append(request)
        for fd in fds:
            os.close(fd)
        return None

    # --- guest memory and rings -------------------------------------------------------------------------------
    def _locate(self, address: int, user: bool) -> tuple[mmap.mmap, int]:
        for gpa, size, user_address, mapping, offset in self.regions:
            base = user_address if user else gpa
            if base <= address < base + size:
                return mapping, address - base + offset
        raise ValueError(f"address {address:#x} is not in guest memory")

    def _u16(self, address: int) -> int:
        mapping, offset = self._locate(address, True)
        return int(struct.unpack_from("<H", mapping, offset)[0])

    def _chain(self, ring: Ring, head: int) -> list[tuple[int, int, int]]:
        """The (address, length, flags) of the descriptors from head."""
        chain, index = [], head
        for _ in range(ring.size):
            mapping, offset = self._locate(ring.desc + 16 * index, True)
            address, length, flags, following = struct.unpack_from("<QIHH", mapping, offset)
            chain.append((address, length, flags))
            if not flags & VRING_DESC_F_NEXT:
                break
            index = following
        return chain

    def _pop(self, ring: Ring) -> int | None:
        if not ring.started or not ring.size or self._u16(ring.avail + 2) == ring.last_avail & 0xFFFF:
            return None
        head = self._u16(ring.avail + 4 + 2 * (ring.last_avail % ring.size))
        ring.last_avail += 1
        return head

    def _push(self, ring: Ring, head: int, length: int) -> None:
        used_index = self._u16(ring.used + 2)
        mapping, offset = self._locate(ring.used + 4 + 8 * (used_index % ring.size), True)
        struct.pack_into("<II", mapping, offset, head, length)
        mapping, offset = self._locate(ring.used + 2, True)
        struct.pack_into("<H", mapping, offset, (used_index + 1) & 0xFFFF)

    def _notify(self, ring: Ring) -> None:
        if ring.call >= 0 and not self._u16(ring.avail) & VRING_AVAIL_F_NO_INTERRUPT:
            os.write(ring.call, struct.pack("<Q", 1))

    def _process(self) -> None:
        if not self.regions:
            return
        tx, rx = self.rings[TX], self.rings[RX]
        handled = False
        while (head := self._pop(tx)) is not None:
            packet = bytearray()
            for address, length, flags in self._chain(tx, head):
                if flags & VRING_DESC_F_WRITE:
                    self.errors.append("a device-writable descriptor in a transmit chain")
                    continue
                mapping, offset = self._locate(address, False)
                packet += mapping[offset:offset + length]
            self._push(tx, head, 0)
            handled = True
            self._guest_packet(bytes(packet))
        if handled:
            self._notify(tx)
        self._pump()
        delivered = False
        while self.outbox and (head := self._pop(rx)) is not None:
            (packet, connection, fwd_cnt), written = self.outbox.pop(0), 0
            for address, length, flags in self._chain(rx, head):
                if not flags & VRING_DESC_F_WRITE:
                    self.errors.append("a device-readable descriptor in a receive chain")
                    continue
                piece = packet[written:written + length]
                mapping, offset = self._locate(address, False)
                mapping[offset:offset + len(piece)] = piece
                written += len(piece)
            if written < len(packet):
                self.errors.append(f"receive buffer of {written} bytes for a {len(packet)}-byte packet")
            self._push(rx, head, written)
            connection.fwd_cnt_told = fwd_cnt  # now the guest knows
            delivered = True
        if delivered:
            self._notify(rx)

    # --- the host side of the vsock protocol -------------------------------------------------------------------
    def _send(self, connection: Connection, op: int, flags: int = 0, payload: bytes = b"") -> None:
        self.outbox.append((HEADER.pack(HOST_CID, self.guest_cid, connection.host_port, connection.guest_port,
                                        len(payload), TYPE_STREAM, op, flags, HOST_BUF_ALLOC,
                                        connection.fwd_cnt) + payload, connection, connection.fwd_cnt))

    def _pump(self) -> None:
        """Sends what the connections have queued, within the guest's credit."""
        for connection in list(self.connections.values()):
            if not connection.connected or connection.closed:
                continue
            while connection.to_send:
                room = connection.guest_buf_alloc - (connection.tx_cnt - connection.guest_fwd_cnt)
                piece = bytes(connection.to_send[:min(room, 4096)])
                if not piece:
                    break
                del connection.to_send[:len(piece)]
                connection.tx_cnt += len(piece)
                self._send(connection, OP_RW, payload=piece)
            if connection.shutdown_after_send and not connection.to_send and \
                    len(connection.received) >= connection.expect_back:
                connection.shutdown_after_send = False
                self._send(connection, OP_SHUTDOWN, SHUTDOWN_BOTH)

    def _guest_packet(self, packet: bytes) -> None:
        if len(packet) < HEADER.size:
            self.errors.append(f"a {len(packet)}-byte packet")
            return
        (src_cid, dst_cid, src_port, dst_port, length, kind, op, flags, buf_alloc,
         fwd_cnt) = HEADER.unpack_from(packet)
        payload = packet[HEADER.size:HEADER.size + length]
        self.log.append(f"op {op} {src_cid}:{src_port} -> {dst_cid}:{dst_port} len {length} flags {flags} "
                        f"buf_alloc {buf_alloc} fwd_cnt {fwd_cnt}")
        if src_cid != self.guest_cid or dst_cid != HOST_CID or kind != TYPE_STREAM or len(payload) != length:
            self.errors.append(f"bad header: {self.log[-1]}")
            return
        key = (src_port, dst_port)
        connection = self.connections.get(key)
        if op == OP_REQUEST:
            self.requests.append((src_cid, src_port, dst_port))
            if dst_port != SERVICE_PORT or connection is not None:
                self._send(Connection(src_port, dst_port), OP_RST)
                return
            connection = self.connections[key] = Connection(src_port, dst_port, connected=True)
            connection.guest_buf_alloc, connection.guest_fwd_cnt = buf_alloc, fwd_cnt
            self._send(connection, OP_RESPONSE)
            return
        if connection is None or connection.closed:
            if op != OP_RST:
                self._send(Connection(src_port, dst_port), OP_RST)
            return
        connection.guest_buf_alloc, connection.guest_fwd_cnt = buf_alloc, fwd_cnt
        if op == OP_RESPONSE:
            connection.connected = True
        elif op == OP_RW:
            # The guest may have at most HOST_BUF_ALLOC bytes beyond what the host last said it consumed.
            if connection.fwd_cnt + length - connection.fwd_cnt_told > HOST_BUF_ALLOC:
                self.errors.append(f"the guest overran the host's credit: {self.log[-1]}")
            connection.received += payload
            connection.fwd_cnt += length  # consumed at once
            if connection.host_port == SERVICE_PORT:
                while b"\n" in connection.received:
                    line, _, rest = bytes(connection.received).partition(b"\n")
                    connection.received = bytearray(rest)
                    connection.to_send += b"pong: " + line + b"\n"
        elif op == OP_CREDIT_REQUEST:
            self._send(connection, OP_CREDIT_UPDATE)
        elif op == OP_SHUTDOWN:
            if flags & SHUTDOWN_BOTH == SHUTDOWN_BOTH:
                self._send(connection, OP_RST)  # the receiver of a full shutdown answers with RST
                connection.closed = True
        elif op == OP_RST:
            connection.closed = True
            connection.reset_by_guest = True
