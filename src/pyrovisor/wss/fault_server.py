"""The fault server: a small process that answers a VM's userfaultfd faults, so no VMM thread ever waits on them.

A page the sampler made missing may be touched by the VMM itself — a device reading a ring, a snapshot, a
migration — from a thread that holds the interpreter lock; a handler thread in the same process would then wait
for that lock forever. This process has its own interpreter: it reads the faults, records which sampled page was
touched (and whether by a write) in memory shared with the VMM, and copies the page's saved content back.

Run by PageSampler as `python -m pyrovisor.wss.fault_server FD`; on FD (a SOCK_SEQPACKET socket) it receives
b"area <capacity>" with the userfaultfd and the memfd holding the sample (see SampleArea), then the commands
b"arm <count>", b"disarm" and b"exit", answering each with b"ok". It exits when the socket closes.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import select
import socket
import struct
import sys

PAGE_SIZE = 4096
UFFDIO_COPY = 0xC028AA03
UFFDIO_ZEROPAGE = 0xC020AA04
EVENT_PAGEFAULT = 0x12
MESSAGE = struct.Struct("<BBHIQQ8x")
_ZERO = bytes(PAGE_SIZE)


class SampleArea:
    """The memfd both processes map: saved pages, then their host addresses (u64), then a byte per page (bit 0:
    touched, bit 1: first touched by a write)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.pages_offset = 0
        self.addresses_offset = capacity * PAGE_SIZE
        self.flags_offset = self.addresses_offset + 8 * capacity
        self.size = -(-(self.flags_offset + capacity) // PAGE_SIZE) * PAGE_SIZE


def serve(control: socket.socket) -> int:
    message, fds, _, _ = socket.recv_fds(control, 64, 2)
    if len(fds) != 2 or not message.startswith(b"area "):
        return 2
    uffd, memfd = fds
    area = SampleArea(int(message.split()[1]))
    shared = mmap.mmap(memfd, area.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(shared))
    slots: dict[int, int] = {}
    buffer = bytearray(MESSAGE.size * 64)
    control.sendall(b"ok")
    poller = select.poll()  # not select(): a host with many VMs hands out fds above 1023
    poller.register(control.fileno(), select.POLLIN)
    poller.register(uffd, select.POLLIN)
    while True:
        ready = {fd for fd, _ in poller.poll()}
        if control.fileno() in ready:
            command = control.recv(64)
            if not command or command == b"exit":
                return 0
            if command.startswith(b"arm "):
                count = int(command.split()[1])
                addresses = struct.unpack_from(f"<{count}Q", shared, area.addresses_offset)
                slots = {address: index for index, address in enumerate(addresses)}
            elif command == b"disarm":
                slots = {}
            control.sendall(b"ok")
        if uffd in ready:
            try:
                length = os.readv(uffd, [buffer])
            except BlockingIOError:
                continue
            for offset in range(0, length - length % MESSAGE.size, MESSAGE.size):
                event, _, _, _, flags, address = MESSAGE.unpack_from(buffer, offset)
                if event != EVENT_PAGEFAULT:
                    continue
                page = address & ~(PAGE_SIZE - 1)
                index = slots.get(page)
                if index is None:
                    continue  # not armed (any more): the range was unregistered and the access retries
                flag_at = area.flags_offset + index
                if not shared[flag_at]:
                    shared[flag_at] = 1 | (2 if flags & 1 else 0)
                source = base + area.pages_offset + index * PAGE_SIZE
                _fill(uffd, page, source, shared[index * PAGE_SIZE:(index + 1) * PAGE_SIZE] == _ZERO)


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
