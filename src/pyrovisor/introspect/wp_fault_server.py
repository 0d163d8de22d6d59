"""The write-protect fault server: a process of its own that answers a VM's userfaultfd write-protect faults."""

# Run by UffdWriteWatcher as `python -m pyrovisor.introspect.wp_fault_server CONTROL RECORDS`. It gets the VM's
# userfaultfd (created in the VMM process: it belongs to the VMM's memory) with the first command on CONTROL, a
# SOCK_SEQPACKET socket, and then, one per message, each answered with b"ok" or b"error <text>":
#   b"uffd" + the fd                      keep it and serve its faults
#   b"protect <page> <page> ..."           register these host pages (write-protect mode) and protect them
#   b"unprotect <page> <page> ..."         lift the protection (waking any writer) and unregister
# Every write-protect fault becomes one datagram on RECORDS: b"<time> <tid> <address> <flags>". The page is made
# writable again at once (which wakes the writer) and protected again WINDOW_S later: further writes to it in
# that window are not seen. The VMM never answers a fault itself: a VMM thread that writes a protected page while
# holding the interpreter lock would otherwise wait forever for a handler thread of the same interpreter.
# The process exits when CONTROL closes; closing the last userfaultfd then unregisters everything.

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import sys
import time

PAGE_SIZE = 4096
WINDOW_S = 0.001  # a page written is writable this long before it is protected again
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_UNREGISTER = 0x8010AA01
UFFDIO_WRITEPROTECT = 0xC018AA06
REGISTER_MODE_WP = 2
WRITEPROTECT_MODE_WP = 1
EVENT_PAGEFAULT = 0x12
PAGEFAULT_FLAG_WP = 2
MESSAGE = struct.Struct("<BBHIQQI4x")  # event, reserved..., flags, address, thread id (UFFD_FEATURE_THREAD_ID)


class _Server:
    def __init__(self, control: socket.socket, records: socket.socket) -> None:
        self.control = control
        self.records = records
        self.uffd = -1
        self.watched: set[int] = set()  # protected host pages (those briefly writable included)
        self.reopen: dict[int, float] = {}  # writable page -> when it is protected again
        self.dropped = 0  # records the VMM's socket had no room for

    def run(self) -> int:
        poller = select.poll()
        poller.register(self.control.fileno(), select.POLLIN)
        buffer = bytearray(MESSAGE.size * 64)
        while True:
            timeout = None
            if self.reopen:
                timeout = max(0.0, min(self.reopen.values()) - time.monotonic()) * 1000
            for fd, _ in poller.poll(timeout):
                if fd == self.control.fileno():
                    message, fds, _, _ = socket.recv_fds(self.control, 1 << 16, 1)
                    if not message:
                        return 0
                    answer = self.command(message, fds)
                    if self.uffd >= 0 and fds:
                        poller.register(self.uffd, select.POLLIN)
                    self.control.sendall(answer)
                elif fd == self.uffd:
                    self.serve_faults(buffer)
            self.protect_again()

    def command(self, message: bytes, fds: list[int]) -> bytes:
        words = message.split()
        try:
            if words[0] == b"uffd" and len(fds) == 1 and self.uffd < 0:
                self.uffd = fds[0]
            elif words[0] == b"protect":
                for page in map(int, words[1:]):
                    _ioctl(self.uffd, UFFDIO_REGISTER, struct.pack("<QQQQ", page, PAGE_SIZE, REGISTER_MODE_WP, 0))
                    self._protect(page, True, strict=True)
                    self.watched.add(page)
            elif words[0] == b"unprotect":
                for page in map(int, words[1:]):
                    self.watched.discard(page)
                    self.reopen.pop(page, None)
                    self._protect(page, False)
                    _ioctl(self.uffd, UFFDIO_UNREGISTER, struct.pack("<QQ", page, PAGE_SIZE))
            else:
                return b"error unknown command " + words[0][:32]
        except OSError as exc:
            return f"error {words[0].decode()}: {os.strerror(exc.errno or 0)}".encode()
        return b"ok"

    def serve_faults(self, buffer: bytearray) -> None:
        try:
            length = os.readv(self.uffd, [buffer])
        except BlockingIOError:
            return
        now = time.time()
        for offset in range(0, length - length % MESSAGE.size, MESSAGE.size):
            event, _, _, _, flags, address, tid = MESSAGE.unpack_from(buffer, offset)
            if event != EVENT_PAGEFAULT or not flags & PAGEFAULT_FLAG_WP:
                continue
            page = address & ~(PAGE_SIZE - 1)
            try:
                self.records.send(f"{now:.6f} {tid} {address} {flags}".encode(), socket.MSG_DONTWAIT)
            except BlockingIOError:
                self.dropped += 1
            except OSError:
                pass  # the VMM is going away: answer the fault anyway
            if page not in self.reopen:
                self._protect(page, False)  # wakes the writer
                if page in self.watched:
                    self.reopen[page] = time.monotonic() + WINDOW_S

    def protect_again(self) -> None:
        now = time.monotonic()
        for page, when in list(self.reopen.items()):
            if when <= now:
                del self.reopen[page]
                self._protect(page, True)

    def _protect(self, page: int, protect: bool, strict: bool = False) -> None:
        """Set or lift the protection of one page (lifting it wakes its writers). Outside a command an error is
        ignored: the page was unregistered meanwhile, and a fault must never stop the server."""
        try:
            _ioctl(self.uffd, UFFDIO_WRITEPROTECT,
                   struct.pack("<QQQ", page, PAGE_SIZE, WRITEPROTECT_MODE_WP if protect else 0))
        except OSError:
            if strict:
                raise


def _ioctl(fd: int, request: int, argument: bytes) -> None:
    fcntl.ioctl(fd, request, bytearray(argument))


if __name__ == "__main__":
    control_socket = socket.socket(fileno=int(sys.argv[1]))
    records_socket = socket.socket(fileno=int(sys.argv[2]))
    sys.exit(_Server(control_socket, records_socket).run())
