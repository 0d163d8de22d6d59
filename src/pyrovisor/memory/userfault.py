"""UserFaultFd: Linux userfaultfd for guest RAM — a page made missing faults to us when the guest (through KVM) or
any host thread touches it, and stays blocked until we put content back."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import weakref
from dataclasses import dataclass

from pyrovisor.errors import PyrovisorError

SYS_USERFAULTFD = 323  # x86-64
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_UNREGISTER = 0x8010AA01
UFFDIO_WAKE = 0x8010AA02
UFFDIO_COPY = 0xC028AA03
UFFDIO_ZEROPAGE = 0xC020AA04
REGISTER_MODE_MISSING = 1
EVENT_PAGEFAULT = 0x12
PAGEFAULT_FLAG_WRITE = 1
MESSAGE = struct.Struct("<BBHIQQ8x")  # event, reserved, reserved, reserved, flags, address, (thread id)
PAGE_SIZE = 4096
MADV_DONTNEED = 4
# Write protection (the write monitor's uffd mode): register with REGISTER_MODE_WP, then UFFDIO_WRITEPROTECT
# (struct uffdio_writeprotect: start, len, mode) sets or lifts the protection; lifting it wakes the writer.
UFFDIO_WRITEPROTECT = 0xC018AA06
REGISTER_MODE_WP = 2
WRITEPROTECT_MODE_WP = 1
PAGEFAULT_FLAG_WP = 2
FEATURE_PAGEFAULT_FLAG_WP = 1 << 0  # write-protect faults are reported
FEATURE_THREAD_ID = 1 << 8  # a fault carries the faulting thread's id
FEATURE_EXACT_ADDRESS = 1 << 11  # a fault carries the exact address, not its page's
FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12  # write protection of shared memory (memfd-backed RAM)
FEATURE_WP_UNPOPULATED = 1 << 13  # protecting a page never touched yet works (else its first write is not seen)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class UserFaultError(PyrovisorError):
    """userfaultfd cannot be used here, or one of its operations failed."""

    def __init__(self, operation: str, error: int, hint: str = "") -> None:
        self.operation = operation
        self.errno = error
        suffix = f"; {hint}" if hint else ""
        super().__init__(f"userfaultfd {operation} failed: {os.strerror(error)}{suffix}")


@dataclass(frozen=True, slots=True)
class Fault:
    address: int  # host virtual address of the page (page-aligned)
    write: bool


class UserFaultFd:
    """One userfaultfd in non-blocking mode, for MISSING faults on anonymous or file-private guest RAM."""

    def __init__(self) -> None:
        fd = int(_libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK))
        if fd < 0:
            error = ctypes.get_errno()
            hint = ("it needs CAP_SYS_PTRACE, or vm.unprivileged_userfaultfd=1 (faults taken by KVM are kernel-mode "
                    "faults)") if error == errno.EPERM else ""
            raise UserFaultError("create", error, hint)
        self.fd = fd
        self._close = weakref.finalize(self, os.close, fd)
        request = bytearray(struct.pack("<QQQ", UFFD_API, 0, 0))
        try:
            fcntl.ioctl(fd, UFFDIO_API, request)
        except OSError as exc:
            self.close()
            raise UserFaultError("handshake", exc.errno or 0) from None
        self._buffer = bytearray(MESSAGE.size * 64)

    def fileno(self) -> int:
        return self.fd

    def register(self, address: int, length: int) -> None:
        """Report missing-page faults in [address, address+length) (page-aligned)."""
        self._ioctl("register", UFFDIO_REGISTER, bytearray(struct.pack("<QQQQ", address, length,
                                                                        REGISTER_MODE_MISSING, 0)))

    def unregister(self, address: int, length: int) -> None:
        self._ioctl("unregister", UFFDIO_UNREGISTER, bytearray(struct.pack("<QQ", address, length)))

    def copy(self, address: int, source: int, length: int = PAGE_SIZE) -> bool:
        """Fill a missing range from `source` (a host address) and wake whoever waits on it. False if the range was
        no longer missing (someone else filled it first)."""
        try:
            self._ioctl("copy", UFFDIO_COPY, bytearray(struct.pack("<QQQQq", address, source, length, 0, 0)))
        except UserFaultError as exc:
            if exc.errno == errno.EEXIST:
                return False
            raise
        return True

    def zeropage(self, address: int, length: int = PAGE_SIZE) -> bool:
        """Map the zero page over a missing range (costs the host no memory). False if it was not missing."""
        try:
            self._ioctl("zeropage", UFFDIO_ZEROPAGE, bytearray(struct.pack("<QQQq", address, length, 0, 0)))
        except UserFaultError as exc:
            if exc.errno == errno.EEXIST:
                return False
            raise
        return True

    def read_faults(self) -> list[Fault]:
        """The page faults waiting to be read (none if nothing is pending)."""
        try:
            count = os.readv(self.fd, [self._buffer])
        except BlockingIOError:
            return []
        faults = []
        for offset in range(0, count - count % MESSAGE.size, MESSAGE.size):
            event, _, _, _, flags, address, = MESSAGE.unpack_from(self._buffer, offset)
            if event == EVENT_PAGEFAULT:
                faults.append(Fault(address & ~(PAGE_SIZE - 1), bool(flags & PAGEFAULT_FLAG_WRITE)))
        return faults

    def _ioctl(self, operation: str, request: int, argument: bytearray) -> None:
        try:
            fcntl.ioctl(self.fd, request, argument)
        except OSError as exc:
            raise UserFaultError(operation, exc.errno or 0) from None

    @property
    def closed(self) -> bool:
        return not self._close.alive

    def close(self) -> None:
        self._close()


def open_with_features(wanted: int, required: int = 0) -> tuple[int, int]:
    """A new userfaultfd (non-blocking, close-on-exec) with the features of `wanted` this kernel offers, and those
    granted. The offer is read from a first handshake on a throw-away fd (a fd takes one handshake only)."""
    offered = _handshake(_create(), 0, close=True)
    if offered & required != required:
        raise UserFaultError("handshake", errno.EOPNOTSUPP, f"the kernel lacks features {required & ~offered:#x}")
    fd = _create()
    return fd, _handshake(fd, wanted & offered, close=False) & wanted


def _create() -> int:
    fd = int(_libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK))
    if fd < 0:
        error = ctypes.get_errno()
        hint = "it needs CAP_SYS_PTRACE, or vm.unprivileged_userfaultfd=1" if error == errno.EPERM else ""
        raise UserFaultError("create", error, hint)
    return fd


def _handshake(fd: int, features: int, close: bool) -> int:
    """UFFDIO_API asking for `features`: the features the kernel reports."""
    request = bytearray(struct.pack("<QQQ", UFFD_API, features, 0))
    try:
        fcntl.ioctl(fd, UFFDIO_API, request)
    except OSError as exc:
        os.close(fd)
        raise UserFaultError("handshake", exc.errno or 0) from None
    if close:
        os.close(fd)
    return int(struct.unpack_from("<Q", request, 8)[0])


def drop_pages(address: int, length: int) -> None:
    """MADV_DONTNEED: the range becomes missing (anonymous memory) or reverts to its file (file-private)."""
    if _libc.madvise(address, length, MADV_DONTNEED) != 0:
        raise UserFaultError("madvise(DONTNEED)", ctypes.get_errno())
