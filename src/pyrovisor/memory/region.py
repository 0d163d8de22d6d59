"""One host mapping that backs a contiguous range of guest physical memory."""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref
from enum import Enum
from pathlib import Path

from pyrovisor.errors import ConfigError, GuestMemoryError

PAGE_SIZE = 4096
HUGE_PAGE_SIZE = 2 << 20
MAP_NORESERVE = 0x4000  # <sys/mman.h>; not exported by Python's mmap module


class Backing(Enum):
    ANONYMOUS = "anonymous"
    MEMFD = "memfd"
    FILE_PRIVATE = "file-private"


class MemoryRegion:
    """A host mapping for guest physical range [gpa, gpa + size).

    The mapping stays alive while it is pinned (by a KVM memslot, for example): `close()` refuses
    to unmap pinned memory, so KVM can never be left pointing at freed host pages.
    """

    def __init__(self, gpa: int, size: int, mapping: mmap.mmap, offset: int, backing: Backing,
                 fd: int | None = None) -> None:
        if gpa % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
            raise ConfigError("memory region", (gpa, size), "start and size must be positive multiples of 4 KiB")
        self.gpa = gpa
        self.size = size
        self.backing = backing
        self._mapping = mapping
        self._close_fd = weakref.finalize(self, os.close, fd) if fd is not None else None
        self._anchor: ctypes.Array[ctypes.c_char] | None = (ctypes.c_char * size).from_buffer(mapping, offset)
        self.host_address = ctypes.addressof(self._anchor)
        self.view = memoryview(mapping)[offset:offset + size]
        self._pins = 0

    # --- constructors -------------------------------------------------------------------------
    @classmethod
    def anonymous(cls, gpa: int, size: int, huge_pages: bool = True) -> MemoryRegion:
        """Private anonymous memory, 2 MiB aligned so the host can back it with huge pages."""
        _check_size(size)
        mapping = mmap.mmap(-1, size + HUGE_PAGE_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE,
                            mmap.PROT_READ | mmap.PROT_WRITE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        offset = -base % HUGE_PAGE_SIZE
        if huge_pages:
            mapping.madvise(mmap.MADV_HUGEPAGE, offset, size)
        return cls(gpa, size, mapping, offset, Backing.ANONYMOUS)

    @classmethod
    def memfd(cls, gpa: int, size: int, name: str = "pyrovisor-guest") -> MemoryRegion:
        """Shared memory behind a memfd: other processes can map it, holes can be punched."""
        _check_size(size)
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(fd)
            raise
        return cls(gpa, size, mapping, 0, Backing.MEMFD, fd=fd)

    @classmethod
    def file_private(cls, gpa: int, size: int, path: Path, file_offset: int = 0) -> MemoryRegion:
        """Copy-on-write view of a file: pages are read lazily, guest writes never reach the file."""
        _check_size(size)
        with open(path, "rb") as handle:
            mapping = mmap.mmap(handle.fileno(), size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE,
                                offset=file_offset)
        return cls(gpa, size, mapping, 0, Backing.FILE_PRIVATE)

    # --- lifetime -----------------------------------------------------------------------------
    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def pinned(self) -> bool:
        return self._pins > 0

    @property
    def closed(self) -> bool:
        return self._mapping.closed

    def pin(self) -> None:
        if self.closed:
            raise GuestMemoryError(self.gpa, self.size, "region is already unmapped")
        self._pins += 1

    def unpin(self) -> None:
        if self._pins <= 0:
            raise GuestMemoryError(self.gpa, self.size, "region is not pinned")
        self._pins -= 1

    def close(self) -> None:
        """Unmap the region; refused while a memslot (or anything else) still pins it."""
        if self.closed:
            return
        if self._pins:
            raise GuestMemoryError(self.gpa, self.size, f"region is still in use by {self._pins} memslot(s)")
        self.view.release()
        self._anchor = None
        try:
            self._mapping.close()
        except BufferError:
            raise GuestMemoryError(self.gpa, self.size, "a view of this memory is still in use; it is unmapped "
                                   "when the last view is released") from None
        finally:
            if self._close_fd is not None:
                self._close_fd()

    # --- host-side operations -----------------------------------------------------------------
    def discard(self, offset: int, length: int) -> None:
        """Give pages back to the host; the guest then reads zeros there."""
        if offset % PAGE_SIZE or length % PAGE_SIZE or offset < 0 or offset + length > self.size:
            raise GuestMemoryError(self.gpa + offset, length, "discard needs a page-aligned range inside the region")
        if self.backing is Backing.MEMFD:
            _madvise(self.host_address + offset, length, mmap.MADV_REMOVE)
        else:
            _madvise(self.host_address + offset, length, mmap.MADV_DONTNEED)

    def __repr__(self) -> str:
        return f"MemoryRegion(gpa={self.gpa:#x}, size={self.size:#x}, {self.backing.value})"


_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


def _madvise(address: int, length: int, advice: int) -> None:
    if _libc.madvise(address, length, advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise({advice}) failed: {os.strerror(err)}")


def _check_size(size: int) -> None:
    if size <= 0 or size % PAGE_SIZE:
        raise ConfigError("memory size", size, "must be a positive multiple of 4 KiB")
