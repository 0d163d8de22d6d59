"""PageSampler: make a random sample of guest pages missing, catch every access to them (guest or host) through
userfaultfd, put their content back, and say which were touched — Waldspurger's sampling, done from the host."""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass

from pyrovisor.errors import ConfigError, PyrovisorError
from pyrovisor.helper_process import reap, start_helper
from pyrovisor.memory import GuestMemory
from pyrovisor.memory.region import Backing, MemoryRegion
from pyrovisor.memory.userfault import PAGE_SIZE, UserFaultError, UserFaultFd, drop_pages
from pyrovisor.wss.fault_server import SampleArea

MADV_REMOVE = 9
SERVER_TIMEOUT_S = 10.0
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_ZERO_PAGE = bytes(PAGE_SIZE)
_KEYS = itertools.count(1)


class FaultServer:
    """The VMM process's one fault-server process (fault_server.py), started by the first sampler and stopped
    when the last one closes. Commands from every sampler go through one socket, one at a time."""

    _instance: FaultServer | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = start_helper("pyrovisor.wss.fault_server", [str(theirs.fileno())], [theirs.fileno()])
        finally:
            theirs.close()
        ours.settimeout(SERVER_TIMEOUT_S)
        self._socket = ours
        self._lock = threading.Lock()
        self._users = 0
        self.pid = self._process.pid

    @classmethod
    def acquire(cls) -> FaultServer:
        with cls._instance_lock:
            if cls._instance is None or cls._instance._process.poll() is not None:
                cls._instance = FaultServer()
            cls._instance._users += 1
            return cls._instance

    def release(self) -> None:
        with FaultServer._instance_lock:
            self._users -= 1
            if self._users > 0:
                return
            if FaultServer._instance is self:
                FaultServer._instance = None
        self._socket.close()
        reap(self._process, SERVER_TIMEOUT_S)

    def command(self, text: str, fds: tuple[int, ...] = ()) -> None:
        with self._lock:
            try:
                if fds:
                    socket.send_fds(self._socket, [text.encode()], list(fds))
                else:
                    self._socket.sendall(text.encode())
                answer = self._socket.recv(16)
            except OSError:
                answer = b""
        if answer != b"ok":
            raise PyrovisorError(f"working-set sampler: the fault server did not answer {text.split()[0]!r}")


@dataclass(frozen=True)
class SampleResult:
    sampled: int
    touched: int


class PageSampler:
    """One sample at a time over the RAM of one VM.

    `arm(count)` must run while the guest and the VMM's I/O thread are held: each sampled page's content is saved,
    then the page is registered with userfaultfd and dropped (a write between saving and dropping would be lost).
    From then on every access to a sampled page — by a vCPU through KVM, or by any VMM thread — faults to the
    fault server (fault_server.py, one process shared by every sampler of this VMM process, so it never waits
    for this interpreter's lock), which records it and copies the content back; the accessing thread waits in
    the kernel meanwhile. `disarm()` (also
    under a hold) puts back the pages nobody touched and unregisters. An all-zero page is not put back: it reads
    as zero while missing, and the host keeps the memory.

    Works on anonymous and memfd RAM; a lazily restored VM (RAM mapped from a snapshot file) is refused.
    """

    def __init__(self, memory: GuestMemory, capacity: int = 4096, seed: int | None = None) -> None:
        for region in memory.regions:
            if region.backing is Backing.FILE_PRIVATE:
                raise ConfigError("working-set sampling", str(region), "RAM mapped from a snapshot file cannot be "
                                  "sampled; restore with --eager")
        self.memory = memory
        self.total_pages = sum(region.size // PAGE_SIZE for region in memory.regions)
        self.capacity = min(capacity, self.total_pages)
        self._random = random.Random(seed)
        self._area = SampleArea(self.capacity)
        self._armed = 0
        self._key = next(_KEYS)
        self._uffd = UserFaultFd()
        self._memfd = -1
        self._shared: mmap.mmap | None = None
        self._server: FaultServer | None = None
        self._added = False
        try:
            self._start_server()
        except BaseException:
            self.close()
            raise

    def _start_server(self) -> None:
        self._memfd = os.memfd_create("pyrovisor-wss-sample", os.MFD_CLOEXEC)
        os.ftruncate(self._memfd, self._area.size)
        self._shared = mmap.mmap(self._memfd, self._area.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._server = FaultServer.acquire()
        self._server.command(f"add {self._key} {self.capacity}", (self._uffd.fd, self._memfd))
        self._added = True

    def _command(self, text: str) -> None:
        assert self._server is not None
        self._server.command(f"{text.split()[0]} {self._key} {' '.join(text.split()[1:])}".strip())

    # --- one interval ---------------------------------------------------------------------------------
    def arm(self, count: int) -> float:
        """Sample `count` pages (at most the capacity) uniformly from RAM and make them missing; the seconds it took."""
        started = time.perf_counter()
        count = max(1, min(count, self.capacity))
        addresses = [self._host_address(page) for page in self._random.sample(range(self.total_pages), count)]
        shared, area = self._shared, self._area
        assert shared is not None
        base = ctypes.addressof(ctypes.c_char.from_buffer(shared))
        try:
            for index, address in enumerate(addresses):
                ctypes.memmove(base + area.pages_offset + index * PAGE_SIZE, address, PAGE_SIZE)
            struct.pack_into(f"<{count}Q", shared, area.addresses_offset, *addresses)  # the server reads it after "arm"
            ctypes.memset(base + area.flags_offset, 0, count)
            self._command(f"arm {count}")
            self._armed = count
            for address in addresses:
                self._uffd.register(address, PAGE_SIZE)
                self._drop(address)
        except BaseException:
            self.disarm()
            raise
        return time.perf_counter() - started

    def disarm(self) -> tuple[SampleResult, float]:
        """Put back the untouched pages, stop catching faults; the interval's result and how long this took."""
        started = time.perf_counter()
        count, self._armed = self._armed, 0
        shared, area = self._shared, self._area
        assert shared is not None
        base = ctypes.addressof(ctypes.c_char.from_buffer(shared))
        try:
            addresses = struct.unpack_from(f"<{count}Q", shared, area.addresses_offset)
            flags = shared[area.flags_offset:area.flags_offset + count]
            for index, address in enumerate(addresses):
                page = area.pages_offset + index * PAGE_SIZE
                if not flags[index] and shared[page:page + PAGE_SIZE] != _ZERO_PAGE:
                    self._uffd.copy(address, base + page)
            if count:
                self._command("disarm")
            flags = shared[area.flags_offset:area.flags_offset + count]
        finally:
            for region in self.memory.regions:
                self._uffd.unregister(region.host_address, region.size)
        touched = sum(1 for flag in flags if flag)
        return SampleResult(sampled=count, touched=touched), time.perf_counter() - started

    # --- helpers --------------------------------------------------------------------------------------------
    def _host_address(self, page: int) -> int:
        for region in self.memory.regions:
            pages = region.size // PAGE_SIZE
            if page < pages:
                return region.host_address + page * PAGE_SIZE
            page -= pages
        raise IndexError(page)

    def _drop(self, address: int) -> None:
        if self._region_of(address).backing is Backing.MEMFD:
            if _libc.madvise(address, PAGE_SIZE, MADV_REMOVE) != 0:
                raise UserFaultError("madvise(REMOVE)", ctypes.get_errno())
        else:
            drop_pages(address, PAGE_SIZE)

    def _region_of(self, address: int) -> MemoryRegion:
        for region in self.memory.regions:
            if region.host_address <= address < region.host_address + region.size:
                return region
        raise IndexError(address)

    @property
    def armed(self) -> bool:
        return self._armed > 0

    @property
    def server_pid(self) -> int | None:
        """The fault server's process id (one per VMM process, shared by every VM it samples)."""
        return self._server.pid if self._server is not None else None

    def server_cpu_seconds(self) -> float:
        """CPU time the fault server has spent on this VM's faults so far."""
        if self._shared is None:
            return 0.0
        return int.from_bytes(self._shared[self._area.cpu_offset:self._area.cpu_offset + 8], "little") / 1e9

    def close(self) -> None:
        """Put everything back (if armed), stop the fault server, release the fds: the guest's memory is whole."""
        try:
            if self._armed and self._shared is not None:
                self.disarm()
        finally:
            if self._server is not None:
                try:
                    if self._added:
                        self._command("remove")
                finally:
                    self._server.release()
                    self._server = None
            if self._shared is not None:
                self._shared.close()
            if self._memfd >= 0:
                os.close(self._memfd)
                self._memfd = -1
            self._uffd.close()
