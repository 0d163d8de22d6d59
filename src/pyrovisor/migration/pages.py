"""Guest pages on the stream: PAGES frames with a digest per page, sent from and received into guest memory."""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lz4.block
import zstandard

from pyrovisor.errors import ConfigError, MigrationError
from pyrovisor.memory import GuestMemory, PageSet
from pyrovisor.memory.zero_pages import content_runs
from pyrovisor.migration.protocol import (
    MAX_RUN_PAGES,
    PAGE_SIZE,
    PAGES,
    Connection,
    Encoding,
    Header,
    MessageType,
)
from pyrovisor.migration.rate import RateLimiter

COMPRESSIONS = {"lz4": Encoding.LZ4, "zstd": Encoding.ZSTD}
MAX_ZSTD_WINDOW = 2 * MAX_RUN_PAGES * PAGE_SIZE  # what the receiver's zstd may allocate for its window
MAX_RUNS_PER_MESSAGE = 100_000  # rewritten-page runs in one ROUND_END or DIRTIED message (~1.5 MB of JSON)

# How pages are checked (docs/migration.md, "The stream"). The sender digests each page as it reads it: CRC-32,
# or keyed BLAKE2b with a pre-shared key. Raw pages go out from guest memory while the guest runs, so a page
# written between its digest and the kernel's copy arrives with a digest that does not match. Such a page is in
# the round's dirty set: the source names it (ROUND_END) and sends it again in the next round. The receiver
# digests every page it gets and keeps the mismatched ones as `suspect`; a suspect page must be named in the
# round's ROUND_END and is cleared only when it arrives again with a matching digest (or as a zero run). At
# STATE, with the guest paused, none may remain. Compressed runs are compressed from a private copy of the
# pages, digested from that copy, and checked after decompression, so their digests always match.


def compressor_for(name: str | None) -> tuple[Encoding, Callable[[bytes], bytes]] | None:
    if name is None:
        return None
    if name == "lz4":
        return Encoding.LZ4, lambda data: lz4.block.compress(data, store_size=False)
    if name == "zstd":
        compressor = zstandard.ZstdCompressor(level=1, write_content_size=True)
        return Encoding.ZSTD, lambda data: compressor.compress(data)
    raise ConfigError("--compress", name, "must be lz4 or zstd")


@dataclass
class SendTally:
    """What one round sent."""

    pages: int = 0
    zero_pages: int = 0
    data_bytes: int = 0
    send_seconds: float = 0.0
    frames: int = 0


def page_runs(pages: PageSet, limit: int | None = MAX_RUN_PAGES) -> list[tuple[int, int]]:
    """(first page, count) of the pages in order, each run at most `limit` long (None: unbounded)."""
    return pages.runs(limit)


def rewritten_runs(sent: PageSet, dirtied: PageSet) -> list[list[int]]:
    """[first, count] runs of the pages sent this round that were written during it."""
    return [[first, count] for first, count in (sent & dirtied).runs()]


class PageSender:
    def __init__(self, memory: GuestMemory, connection: Connection, limiter: RateLimiter,
                 compression: str | None = None) -> None:
        self.memory = memory
        self.connection = connection
        self.limiter = limiter
        self.compression = compressor_for(compression)

    def all_pages(self) -> PageSet:
        bits = 0
        for region in self.memory.regions:
            bits |= PageSet.span(region.gpa // PAGE_SIZE, region.end // PAGE_SIZE).bits
        return PageSet(bits)

    def send(self, pages: PageSet, tally: SendTally, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Send these pages, in order: zero runs as markers, the rest raw or compressed."""
        for first, count in page_runs(pages):
            if cancelled():
                raise MigrationError("pre-copy", "cancelled")
            with self.memory.view(first * PAGE_SIZE, count * PAGE_SIZE) as view:
                for sub_first, sub_count, nonzero in content_runs(view):
                    with view[sub_first * PAGE_SIZE:(sub_first + sub_count) * PAGE_SIZE] as data:
                        self._send_run(first + sub_first, sub_count, nonzero, data, tally)

    def _send_run(self, first: int, count: int, nonzero: bool, data: memoryview, tally: SendTally) -> None:
        gpa = first * PAGE_SIZE
        integrity = self.connection.integrity
        tally.pages += count
        tally.frames += 1
        if not nonzero:
            tally.zero_pages += count
            self.connection.send(MessageType.PAGES, PAGES.pack(gpa, count, Encoding.ZERO, 0))
            return
        encoding: Encoding = Encoding.RAW
        payload: bytes | memoryview = data
        if self.compression is None:
            digests = integrity.page_digests(data)
        else:
            copy = bytes(data)  # the digests and the compressed data describe the same bytes
            digests = integrity.page_digests(copy)
            compressed = self.compression[1](copy)
            encoding, payload = (self.compression[0], compressed) if len(compressed) < len(copy) else (Encoding.RAW, copy)
        started = time.perf_counter()  # the wait for the (possibly limited) link is part of sending
        self.limiter.wait(len(payload))
        self.connection.send(MessageType.PAGES, PAGES.pack(gpa, count, encoding, integrity.digest_size), digests,
                             data=(payload,))
        tally.send_seconds += time.perf_counter() - started
        tally.data_bytes += len(payload)


def parse_runs(value: Any, page_limit: int, where: str) -> tuple[list[int], list[int]]:
    """Starts and ends of sorted, disjoint [first, count] page runs below `page_limit`; MigrationError otherwise."""
    if not isinstance(value, list):
        raise MigrationError("stream", f"malformed {where}: the rewritten pages must be a list of [first, count]")
    starts: list[int] = []
    ends: list[int] = []
    previous_end = 0
    for item in value:
        if not (isinstance(item, list) and len(item) == 2 and all(type(number) is int for number in item)):
            raise MigrationError("stream", f"malformed {where}: the rewritten pages must be a list of [first, count]")
        first, count = item
        if first < previous_end or count < 1 or first + count > page_limit:
            raise MigrationError("stream", f"malformed {where}: page run [{first}, {count}] is out of order or "
                                 "outside guest RAM")
        starts.append(first)
        ends.append(first + count)
        previous_end = first + count
    return starts, ends


class PageReceiver:
    """Applies PAGES frames to guest memory (raw pages straight from the socket) and checks every page."""

    def __init__(self, memory: GuestMemory, connection: Connection) -> None:
        self.memory = memory
        self.connection = connection
        self.suspect: set[int] = set()  # pages whose data did not match their digest, not yet received intact
        self.explained: set[int] = set()  # suspect pages this round's ROUND_END (or DIRTIED) named as rewritten
        self.pages = 0
        self.page_limit = memory.end // PAGE_SIZE
        self._decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW)

    def receive(self, header: Header) -> None:
        """One PAGES frame whose header was just read."""
        covered = self.connection.receive_covered(header)
        sequence = header.sequence
        gpa, count, encoding, digest_size = PAGES.unpack_from(covered)
        size = count * PAGE_SIZE
        if not 0 < count <= MAX_RUN_PAGES:
            raise MigrationError("stream", f"PAGES frame {sequence}: {count} pages (1 to {MAX_RUN_PAGES} in a frame)")
        if gpa % PAGE_SIZE or not self.memory.contains(gpa, size):
            raise MigrationError("stream", f"PAGES frame {sequence}: {count} pages at {gpa:#x} lie outside guest RAM "
                                 f"({self.memory.size >> 20} MiB)")
        first = gpa // PAGE_SIZE
        if encoding == Encoding.ZERO:
            if header.covered != PAGES.size or header.data_length:
                raise MigrationError("stream", f"PAGES frame {sequence}: a zero run carries data")
            self.memory.discard(gpa, size)
            self._arrived_intact(first, count)
            self.pages += count
            return
        expected_size = self.connection.integrity.digest_size
        if digest_size != expected_size or header.covered != PAGES.size + count * digest_size:
            raise MigrationError("stream", f"PAGES frame {sequence}: digest table of {header.covered - PAGES.size} "
                                 f"bytes for {count} pages of {expected_size}-byte digests")
        expected = bytes(covered[PAGES.size:])
        if encoding == Encoding.RAW:
            if header.data_length != size:
                raise MigrationError("stream", f"PAGES frame {sequence}: {header.data_length} bytes for {count} pages")
            with self.memory.view(gpa, size) as target:
                self.connection.receive_into(target)
                actual = self.connection.integrity.page_digests(target)
        elif encoding in (Encoding.LZ4, Encoding.ZSTD):
            if not 0 < header.data_length <= size:
                raise MigrationError("stream", f"PAGES frame {sequence}: {header.data_length} compressed bytes for "
                                     f"{count} pages")
            compressed = bytearray(header.data_length)
            self.connection.receive_into(compressed)
            pages = self._decompress(Encoding(encoding), compressed, size, sequence)
            actual = self.connection.integrity.page_digests(pages)
            with self.memory.view(gpa, size) as target:
                target[:] = pages
        else:
            raise MigrationError("stream", f"PAGES frame {sequence}: unknown encoding {encoding}")
        self._check(first, count, expected, actual, digest_size)
        self.pages += count

    def _check(self, first: int, count: int, expected: bytes, actual: bytes, digest_size: int) -> None:
        if expected == actual:
            self._arrived_intact(first, count)
            return
        for index in range(count):
            span = slice(index * digest_size, (index + 1) * digest_size)
            if expected[span] == actual[span]:
                self.suspect.discard(first + index)
            else:
                self.suspect.add(first + index)

    def _arrived_intact(self, first: int, count: int) -> None:
        if self.suspect:
            self.suspect.difference_update(range(first, first + count))

    def _decompress(self, encoding: Encoding, data: bytearray, size: int, sequence: int) -> bytes:
        """Exactly `size` bytes from one compressed block or frame, allocating no more than that."""
        try:
            if encoding == Encoding.LZ4:
                result: bytes = lz4.block.decompress(data, uncompressed_size=size)
            else:
                parameters = zstandard.get_frame_parameters(data)
                if parameters.content_size != size:
                    shown = "no size" if parameters.content_size >= zstandard.CONTENTSIZE_ERROR else f"{parameters.content_size} bytes"
                    raise MigrationError("stream", f"PAGES frame {sequence}: zstd frame declares {shown}, the frame "
                                         f"header {size} bytes")
                if parameters.window_size > MAX_ZSTD_WINDOW or parameters.dict_id:
                    raise MigrationError("stream", f"PAGES frame {sequence}: zstd frame needs a {parameters.window_size}"
                                         "-byte window or a dictionary")
                result = self._decompressor.decompress(data, max_output_size=size, allow_extra_data=False)
        except (lz4.block.LZ4BlockError, zstandard.ZstdError, ValueError, MemoryError) as exc:
            raise MigrationError("stream", f"PAGES frame {sequence}: cannot decompress ({exc})") from None
        if len(result) != size:
            raise MigrationError("stream", f"PAGES frame {sequence}: decompressed to {len(result)} bytes, not {size}")
        return result

    def rewritten(self, runs: Any, where: str) -> None:
        """Pages the source names as rewritten after it read them this round (from ROUND_END or DIRTIED)."""
        starts, ends = parse_runs(runs, self.page_limit, where)
        for page in self.suspect:
            index = bisect.bisect_right(starts, page) - 1
            if index >= 0 and page < ends[index]:
                self.explained.add(page)

    def end_round(self) -> None:
        """Every page that arrived damaged this round must have been named as rewritten by the source."""
        unexplained = self.suspect - self.explained
        if unexplained:
            first = min(unexplained)
            raise MigrationError("stream", f"checksum mismatch in {len(unexplained)} page(s) the source did not "
                                 f"rewrite (first at {first * PAGE_SIZE:#x}): damaged in transit")
        self.explained.clear()

    def finish(self) -> None:
        """At the machine state, with the guest paused at the source: every page must have arrived intact."""
        if self.suspect:
            first = min(self.suspect)
            raise MigrationError("stop-and-copy", f"checksum mismatch: {len(self.suspect)} page(s) never arrived "
                                 f"intact (first at {first * PAGE_SIZE:#x})")
