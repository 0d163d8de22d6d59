"""virtio-blk (virtio 1.2 §5.2) on a raw host file: read, write, flush, get-id, and a read-only mode."""

from __future__ import annotations

import contextlib
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from pyrovisor.devices.virtio.device import ID_BLOCK, VirtioDevice
from pyrovisor.devices.virtio.mmio import TransportState
from pyrovisor.devices.virtio.queue import Buffer, DescriptorChain, QueueError
from pyrovisor.errors import DeviceError
from pyrovisor.memory import GuestMemory

SECTOR = 512
F_SEG_MAX = 2
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
HEADER = struct.Struct("<IIQ")  # type, reserved, sector
ID_BYTES = 20
QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2  # data buffers in one request: the header and the status take two descriptors
MAX_REQUEST_BYTES = 64 << 20  # a larger request is refused with IOERR rather than tying up the I/O thread
BATCH = 64  # requests taken from the ring at once
_unpack_header = HEADER.unpack


@dataclass(frozen=True)
class BlockOptions:
    """One disk as the user configured it."""

    path: Path
    read_only: bool = False
    serial: str = ""  # what GET_ID returns (at most 20 bytes); default: the file name


@dataclass(frozen=True)
class VirtioBlkState:
    transport: TransportState = field(default_factory=TransportState)
    path: str = ""
    read_only: bool = False
    serial: str = ""
    capacity_sectors: int = 0
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    errors: int = 0


@dataclass
class BlockStats:
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    errors: int = 0  # requests answered IOERR or UNSUPP
    bytes_read: int = 0
    bytes_written: int = 0


def open_disk(path: Path, read_only: bool) -> int:
    """The disk file's fd; one clear DeviceError if it is missing, not a regular file or a block device,
    unreadable, or (unless read-only) unwritable."""
    try:
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise DeviceError(f"disk {path}", exc.strerror or str(exc)) from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        raise DeviceError(f"disk {path}", "is not a regular file or a block device")
    os.set_blocking(fd, True)
    return fd


class VirtioBlk(VirtioDevice):
    device_id = ID_BLOCK
    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, options: BlockOptions, state: VirtioBlkState | None = None) -> None:
        super().__init__()
        self.options = options
        self.fd = open_disk(options.path, options.read_only)
        size = os.lseek(self.fd, 0, os.SEEK_END)
        self.capacity = size // SECTOR
        if state is not None and state.capacity_sectors and state.capacity_sectors != self.capacity:
            os.close(self.fd)
            raise DeviceError(f"disk {options.path}", f"holds {self.capacity} sectors, the saved device had "
                              f"{state.capacity_sectors}: not the same disk")
        self.features = (1 << F_SEG_MAX) | (1 << F_BLK_SIZE) | (1 << F_FLUSH) | ((1 << F_RO) if options.read_only else 0)
        saved = state or VirtioBlkState()
        self.stats = BlockStats(reads=saved.reads, writes=saved.writes, flushes=saved.flushes, errors=saved.errors)
        serial = options.serial or options.path.name
        self.serial = serial.encode()[:ID_BYTES]

    def config(self) -> bytes:
        """capacity, size_max, seg_max, geometry, blk_size (the fields up to blk_size, §5.2.4)."""
        return struct.pack("<QIIHBBI", self.capacity, 0, SEG_MAX, 0, 0, 0, SECTOR)

    def process(self, queue_index: int) -> None:
        queue = self.queues[queue_index]
        memory = queue.memory
        # Until a take finds the ring empty *after* the last batch was served: a polling driver has often
        # queued its next request by then, and finds it served without a notification (an exit) of its own.
        while batch := queue.take(BATCH):
            for chain in batch:
                queue.add_used(chain.head, self._serve(memory, chain))
            self.publish(queue)

    def _serve(self, memory: GuestMemory, chain: DescriptorChain) -> int:
        """Carry out one request; returns the bytes written into the chain (data and status)."""
        _, readable, writable = chain
        if (len(writable) + len(readable) == 3 and readable and writable and writable[-1].length == 1
                and readable[0].length == HEADER.size):
            # The usual read or write: header, one data buffer, status byte, each in a descriptor of its own.
            kind, _, sector = _unpack_header(memory.read(readable[0].address, HEADER.size))
            address, length = writable[0] if kind == T_IN else readable[-1]
            usual = len(writable) == 2 if kind == T_IN else (
                kind == T_OUT and len(readable) == 2 and not self.options.read_only)
            if usual and not length % SECTOR and length <= MAX_REQUEST_BYTES and sector + length // SECTOR <= self.capacity:
                try:
                    if kind == T_IN:
                        done = os.preadv(self.fd, [memory.view(address, length)], sector * SECTOR)
                        memory.mark_written(address, length)
                    else:
                        done = os.pwrite(self.fd, memory.view(address, length), sector * SECTOR)
                except OSError:
                    done = -1
                if done == length:
                    stats = self.stats
                    if kind == T_IN:
                        stats.reads += 1
                        stats.bytes_read += length
                    else:
                        stats.writes += 1
                        stats.bytes_written += length
                    memory.write_u8(writable[-1].address, S_OK)
                    return length + 1 if kind == T_IN else 1
            # Anything else, or a failure, is served (and counted) the general way: the request is idempotent.
        if not chain.writable or chain.writable[-1].length < 1:
            raise QueueError("block request without a status byte")
        status_buffer = chain.writable[-1]
        status_address = status_buffer.address + status_buffer.length - 1
        data_in = list(chain.writable[:-1])
        if status_buffer.length > 1:
            data_in.append(Buffer(status_buffer.address, status_buffer.length - 1))
        header_bytes, data_out = _split_header(memory, chain.readable)
        kind, _, sector = HEADER.unpack(header_bytes)
        status, written = S_OK, 0
        try:
            if kind == T_IN:
                written = self._read(memory, sector, data_in)
                self.stats.reads += 1
            elif kind == T_OUT:
                self._write(memory, sector, data_out)
                self.stats.writes += 1
            elif kind == T_FLUSH:
                if not self.options.read_only:
                    os.fsync(self.fd)
                self.stats.flushes += 1
            elif kind == T_GET_ID:
                identity = self.serial.ljust(ID_BYTES, b"\0")
                written = _scatter(memory, data_in, identity)
            else:
                status = S_UNSUPP
        except _RequestError:
            status = S_IOERR
        except OSError:
            status = S_IOERR
        if status != S_OK:
            self.stats.errors += 1
        memory.write_u8(status_address, status)
        return written + 1

    def _check_range(self, sector: int, length: int) -> int:
        if length % SECTOR or length > MAX_REQUEST_BYTES or sector + length // SECTOR > self.capacity:
            raise _RequestError()
        return sector * SECTOR

    def _read(self, memory: GuestMemory, sector: int, buffers: list[Buffer]) -> int:
        length = sum(buffer.length for buffer in buffers)
        offset = self._check_range(sector, length)
        if len(buffers) == 1:  # the usual request: one data buffer
            with memory.view(buffers[0].address, length) as target:
                count = os.preadv(self.fd, [target], offset)
        else:
            with contextlib.ExitStack() as views:
                targets = [views.enter_context(memory.view(b.address, b.length)) for b in buffers if b.length]
                count = os.preadv(self.fd, targets, offset) if targets else 0
        for buffer in buffers:
            if buffer.length:
                memory.mark_written(buffer.address, buffer.length)
        if count != length:
            raise _RequestError()
        self.stats.bytes_read += count
        return count

    def _write(self, memory: GuestMemory, sector: int, buffers: list[Buffer]) -> None:
        if self.options.read_only:
            raise _RequestError()
        length = sum(buffer.length for buffer in buffers)
        offset = self._check_range(sector, length)
        if len(buffers) == 1:  # the usual request: one data buffer (the view dies with the call)
            count = os.pwrite(self.fd, memory.view(buffers[0].address, length), offset)
        else:
            with contextlib.ExitStack() as views:
                sources = [views.enter_context(memory.view(b.address, b.length)) for b in buffers if b.length]
                count = os.pwritev(self.fd, sources, offset) if sources else 0
        if count != length:
            raise _RequestError()
        self.stats.bytes_written += count

    def save_device(self, transport: TransportState) -> VirtioBlkState:
        """The device's state, after flushing the disk: a snapshot or a migration (to shared storage) must find
        every completed write on the disk, as the guest was told."""
        if not self.options.read_only:
            os.fsync(self.fd)
        return VirtioBlkState(transport, str(self.options.path), self.options.read_only, self.options.serial,
                              self.capacity, self.stats.reads, self.stats.writes, self.stats.flushes, self.stats.errors)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _RequestError(Exception):
    """The request cannot be carried out: it is answered with IOERR."""


def _split_header(memory: GuestMemory, readable: tuple[Buffer, ...]) -> tuple[bytes, list[Buffer]]:
    """The 16-byte request header (it may span descriptors) and the buffers after it."""
    if readable and readable[0].length == HEADER.size:  # the usual request: the header in a buffer of its own
        return memory.read(readable[0].address, HEADER.size), list(readable[1:])
    header = bytearray()
    rest: list[Buffer] = []
    for buffer in readable:
        need = HEADER.size - len(header)
        if need > 0:
            take = min(need, buffer.length)
            header += memory.read(buffer.address, take)
            if buffer.length > take:
                rest.append(Buffer(buffer.address + take, buffer.length - take))
        else:
            rest.append(buffer)
    if len(header) < HEADER.size:
        raise QueueError(f"block request header of {len(header)} bytes")
    return bytes(header), rest


def _scatter(memory: GuestMemory, buffers: list[Buffer], data: bytes) -> int:
    position = 0
    for buffer in buffers:
        if position >= len(data):
            break
        piece = data[position:position + buffer.length]
        memory.write(buffer.address, piece)
        position += len(piece)
    return position
