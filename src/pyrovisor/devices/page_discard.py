"""The page-discard port: a guest hands back ranges of pages it no longer needs, and they read as zero after."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from pyrovisor.devices.base import all_ones
from pyrovisor.errors import GuestMemoryError

PAGE_DISCARD_PORT = 0x518
PAGE_DISCARD_PORTS = 8
SIGNATURE = 0x43534944  # "DISC": what a 32-bit read of offset 0 returns, so a guest can detect the device
MAX_RANGES = 32
PAGE_SIZE = 4096
MAX_PAGES_PER_RANGE = 1 << 24  # 64 GiB: no RAM range is larger
REQUEST_HEADER = struct.Struct("<II")  # count, reserved
REQUEST_RANGE = struct.Struct("<QQ")  # guest physical address, pages


@dataclass(frozen=True)
class PageDiscardArgs:
    """What a PageDiscard needs besides its state: how to read requests and release pages."""

    read_memory: Callable[[int, int], bytes]
    release: Callable[[int, int], None]


@dataclass(frozen=True)
class PageDiscardState:
    requests: int = 0
    pages: int = 0
    rejected: int = 0  # malformed requests and ranges, ignored


class PageDiscard:
    """A paravirtual device on one port (docs/guest-os.md).

    A 32-bit write to offset 0 carries the guest physical address of a request: a count (u32), a
    reserved u32, then `count` ranges of (address, pages) as two u64 each, at most MAX_RANGES. Every
    page-aligned range inside RAM is released through `release(gpa, size)` before the write completes,
    so the guest may reuse the pages as zeroed memory as soon as its OUT instruction retires. Anything
    malformed is counted and ignored, never raised. A 32-bit read of offset 0 returns SIGNATURE.
    """

    def __init__(self, read_memory: Callable[[int, int], bytes], release: Callable[[int, int], None],
                 state: PageDiscardState | None = None) -> None:
        self._read = read_memory
        self._release = release
        state = state or PageDiscardState()
        self.requests, self.pages, self.rejected = state.requests, state.pages, state.rejected

    def save(self) -> PageDiscardState:
        return PageDiscardState(self.requests, self.pages, self.rejected)

    @classmethod
    def restore(cls, args: PageDiscardArgs, state: PageDiscardState) -> PageDiscard:
        return cls(args.read_memory, args.release, state)

    def read(self, offset: int, size: int) -> int:
        if offset == 0 and size == 4:
            return SIGNATURE
        return all_ones(size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != 0 or size != 4:
            self.rejected += 1
            return
        self.requests += 1
        try:
            count, _ = REQUEST_HEADER.unpack(self._read(value, REQUEST_HEADER.size))
            if count > MAX_RANGES:
                raise ValueError(count)
            ranges = self._read(value + REQUEST_HEADER.size, count * REQUEST_RANGE.size)
        except (GuestMemoryError, ValueError):
            self.rejected += 1
            return
        for gpa, pages in REQUEST_RANGE.iter_unpack(ranges):
            if gpa % PAGE_SIZE or not 0 < pages <= MAX_PAGES_PER_RANGE:
                self.rejected += 1
                continue
            try:
                self._release(gpa, pages * PAGE_SIZE)
            except GuestMemoryError:
                self.rejected += 1
                continue
            self.pages += pages
