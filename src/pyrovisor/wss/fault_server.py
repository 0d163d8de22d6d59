"""The fault server: one small process per VMM process that answers the userfaultfd faults of every VM being
sampled, so no VMM thread ever waits on them and a host of many VMs pays for one interpreter, not one per VM.

A page the sampler made missing may be touched by the VMM itself — a device reading a ring, a snapshot, a
migration — from a thread that holds the interpreter lock; a handler thread in the same process would then wait
for that lock forever. This process has its own interpreter: it reads the faults, records which sampled page was
touched in memory shared with the VMM, and copies the page's saved content back.

Run by FaultServer as `python -m pyrovisor.wss.fault_server FD`; on FD (a SOCK_SEQPACKET socket) it receives
b"add <id> <capacity>" with a VM's userfaultfd and the memfd holding its sample (see SampleArea), then
b"arm <id> <count>", b"disarm <id>", b"remove <id>", answering each with b"ok". It exits when the socket closes.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import select
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

PAGE_SIZE = 4096
UFFDIO_COPY = 0xC028AA03
UFFDIO_ZEROPAGE = 0xC020AA04
EVENT_PAGEFAULT = 0x12
MESSAGE = struct.Struct("<BBHIQQ8x")
COUNTER = struct.Struct("<Q")
_ZERO = bytes(PAGE_SIZE)


class SampleArea:
    """The memfd both processes map: saved pages, their host addresses (u64), a byte per page (1: touched), and
    the nanoseconds of CPU the server spent on this VM's faults (u64)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.pages_offset = 0
        self.addresses_offset = capacity * PAGE_SIZE
        self.flags_offset = self.addresses_offset + 8 * capacity
        self.cpu_offset = -(-(self.flags_offset + capacity) // 8) * 8
        self.size = -(-(self.cpu_offset + 8) // PAGE_SIZE) * PAGE_SIZE


@dataclass
class _Client:
    uffd: int
    area: SampleArea
    shared: mmap.mmap
    base: int
    slots: dict[int, int] = field(default_factory=dict)


def serve(control: socket.socket) -> int:
    import ctypes

    clients: dict[int, _Client] = {}
    by_fd: dict[int, _Client] = {}
    poller = select.poll()  # not select(): a host with many VMs hands out fds above 1023
    poller.register(control.fileno(), select.POLLIN)
    buffer = bytearray(MESSAGE.size * 64)
    while True:
        for fd, _ in poller.poll():
            if fd == control.fileno():
                message, fds, _, _ = socket.recv_fds(control, 128, 2)
                if not message:
                    return 0
                words = message.split()
                key = int(words[1])
                if words[0] == b"add" and len(fds) == 2:
                    uffd, memfd = fds
                    area = SampleArea(int(words[2]))
                    shared = mmap.mmap(memfd, area.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                    os.close(memfd)
                    client = _Client(uffd, area, shared, ctypes.addressof(ctypes.c_char.from_buffer(shared)))
                    clients[key] = by_fd[uffd] = client
                    poller.register(uffd, select.POLLIN)
                elif words[0] == b"arm":
                    client = clients[key]
                    count = int(words[2])
                    addresses = struct.unpack_from(f"<{count}Q", client.shared, client.area.addresses_offset)
                    client.slots = {address: index for index, address in enumerate(addresses)}
                elif words[0] == b"disarm":
                    clients[key].slots = {}
                elif words[0] == b"remove":
                    client = clients.pop(key)
                    poller.unregister(client.uffd)
                    del by_fd[client.uffd]
                    os.close(client.uffd)
                control.sendall(b"ok")
            elif fd in by_fd:
                _serve_faults(by_fd[fd], buffer)


def _serve_faults(client: _Client, buffer: bytearray) -> None:
    started = time.thread_time_ns()
    try:
        length = os.readv(client.uffd, [buffer])
    except BlockingIOError:
        return
    area, shared = client.area, client.shared
    for offset in range(0, length - length % MESSAGE.size, MESSAGE.size):
        event, _, _, _, _flags, address = MESSAGE.unpack_from(buffer, offset)
        if event != EVENT_PAGEFAULT:
            continue
        page = address & ~(PAGE_SIZE - 1)
        index = client.slots.get(page)
        if index is None:
            continue  # not armed (any more): the range was unregistered and the access retries
        shared[area.flags_offset + index] = 1
        saved = area.pages_offset + index * PAGE_SIZE
        _fill(client.uffd, page, client.base + saved, shared[saved:saved + PAGE_SIZE] == _ZERO)
    spent = COUNTER.unpack_from(shared, area.cpu_offset)[0] + time.thread_time_ns() - started
    COUNTER.pack_into(shared, area.cpu_offset, spent)  # read by the sampler only while the VM is held


def _fill(uffd: int, page: int, source: int, zero: bool) -> None:
    try:
        if zero:
            fcntl.ioctl(uffd, UFFDIO_ZEROPAGE, bytearray(struct.pack("<QQQq", page, PAGE_SIZE, 0, 0)))
        else:
            fcntl.ioctl(uffd, UFFDIO_COPY, bytearray(struct.pack("<QQQQq", page, source, PAGE_SIZE, 0, 0)))
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOENT, errno.EINVAL):  # filled or unregistered meanwhile
            raise


if __name__ == "__main__":
    sys.exit(serve(socket.socket(fileno=int(sys.argv[1]))))
