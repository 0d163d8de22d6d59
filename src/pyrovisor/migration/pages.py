"""Sending guest pages as PAGES frames and writing received ones into guest memory."""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import lz4.block
import numpy as np
import zstandard

from pyrovisor.errors import ConfigError, MigrationError
from pyrovisor.memory import GuestMemory
from pyrovisor.migration.protocol import PAGE_SIZE, PAGES, Connection, Encoding, MessageType
from pyrovisor.migration.rate import RateLimiter

MAX_RUN_PAGES = 256  # 1 MiB per frame
WORDS_PER_PAGE = PAGE_SIZE // 8
COMPRESSIONS = {"lz4": Encoding.LZ4, "zstd": Encoding.ZSTD}


def compressor_for(name: str | None) -> tuple[Encoding, Callable[[memoryview], bytes]] | None:
    if name is None:
        return None
    if name == "lz4":
        return Encoding.LZ4, lambda data: lz4.block.compress(data, store_size=False)
    if name == "zstd":
        compressor = zstandard.ZstdCompressor(level=1)
        return Encoding.ZSTD, lambda data: compressor.compress(data)
    raise ConfigError("--compress", name, "must be lz4 or zstd")


@dataclass
class SendTally:
    """What one round sent, and where: the frames are kept to excuse stale checksums later."""

    pages: int = 0
    zero_pages: int = 0
    data_bytes: int = 0
    send_seconds: float = 0.0
    frames: list[tuple[int, int, int]] = field(default_factory=list)  # (sequence, first page, page count)


def page_runs(pages: np.ndarray) -> Iterator[tuple[int, int]]:
    """(first page, count) for sorted page numbers, each run at most MAX_RUN_PAGES long."""
    if len(pages) == 0:
        return
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pages)]))
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        first = int(pages[start])
        count = end - start
        for offset in range(0, count, MAX_RUN_PAGES):
            yield first + offset, min(MAX_RUN_PAGES, count - offset)


class PageSender:
    def __init__(self, memory: GuestMemory, connection: Connection, limiter: RateLimiter,
                 compression: str | None = None) -> None:
        self.memory = memory
        self.connection = connection
        self.limiter = limiter
        self.compression = compressor_for(compression)

    def all_pages(self) -> np.ndarray:
        return np.concatenate([np.arange(r.gpa // PAGE_SIZE, r.end // PAGE_SIZE, dtype=np.int64)
                               for r in self.memory.regions])

    def send(self, pages: np.ndarray, tally: SendTally, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Send these pages (sorted page numbers): zero runs as markers, the rest raw or compressed."""
        for first, count in page_runs(pages):
            if cancelled():
                raise MigrationError("pre-copy", "cancelled")
            view = self.memory.view(first * PAGE_SIZE, count * PAGE_SIZE)
            used = np.asarray(np.frombuffer(view, dtype=np.uint64).reshape(count, WORDS_PER_PAGE).any(axis=1))
            for sub_first, sub_count, nonzero in _split(used):
                self._send_run(first + sub_first, sub_count, nonzero,
                               view[sub_first * PAGE_SIZE:(sub_first + sub_count) * PAGE_SIZE], tally)

    def _send_run(self, first: int, count: int, nonzero: bool, data: memoryview, tally: SendTally) -> None:
        gpa = first * PAGE_SIZE
        tally.pages += count
        if not nonzero:
            tally.zero_pages += count
            sequence = self.connection.send(MessageType.PAGES, PAGES.pack(gpa, count, Encoding.ZERO))
        else:
            encoding, payload = Encoding.RAW, data
            if self.compression is not None:
                compressed = self.compression[1](data)
                if len(compressed) < len(data):
                    encoding, payload = self.compression[0], memoryview(compressed)
            started = time.perf_counter()  # the wait for the (possibly limited) link is part of sending
            self.limiter.wait(len(payload))
            sequence = self.connection.send(MessageType.PAGES, PAGES.pack(gpa, count, encoding), payload)
            tally.send_seconds += time.perf_counter() - started
            tally.data_bytes += len(payload)
        tally.frames.append((sequence, first, count))


def _split(used: np.ndarray) -> Iterator[tuple[int, int, bool]]:
    """Runs of equal values in a boolean array: (start, length, value)."""
    edges = np.flatnonzero(np.diff(used.astype(np.int8))) + 1
    starts = np.concatenate(([0], edges)).tolist()
    ends = np.concatenate((edges, [len(used)])).tolist()
    for start, end in zip(starts, ends, strict=True):
        yield start, end - start, bool(used[start])


def excused_frames(frames: list[tuple[int, int, int]], dirtied: np.ndarray) -> list[int]:
    """Sequences of the frames holding a page written after it was read: their checksum may be stale."""
    if not frames or len(dirtied) == 0:
        return []
    firsts = np.fromiter((first for _, first, _ in frames), dtype=np.int64, count=len(frames))
    ends = firsts + np.fromiter((count for _, _, count in frames), dtype=np.int64, count=len(frames))
    index = np.searchsorted(dirtied, firsts)
    hit = (index < len(dirtied)) & (dirtied[np.minimum(index, len(dirtied) - 1)] < ends)
    return [frames[i][0] for i in np.flatnonzero(hit).tolist()]


class PageReceiver:
    """Applies PAGES frames to guest memory, straight from the socket for raw pages."""

    def __init__(self, memory: GuestMemory, connection: Connection) -> None:
        self.memory = memory
        self.connection = connection
        self.mismatched: set[int] = set()
        self.pages = 0
        self._header = bytearray(PAGES.size)
        self._decompressor = zstandard.ZstdDecompressor()

    def receive(self, length: int, sequence: int, checksum: int) -> None:
        if length < PAGES.size:
            raise MigrationError("stream", f"malformed PAGES frame {sequence}: {length} bytes")
        self.connection.receive_into(memoryview(self._header))
        gpa, count, encoding = PAGES.unpack(self._header)
        size = count * PAGE_SIZE
        if count == 0 or gpa % PAGE_SIZE or not self.memory.contains(gpa, size):
            raise MigrationError("stream", f"PAGES frame {sequence}: {count} pages at {gpa:#x} lie outside guest RAM "
                                 f"({self.memory.size >> 20} MiB)")
        data_length = length - PAGES.size
        crc = zlib.crc32(self._header)
        if encoding == Encoding.ZERO:
            if data_length:
                raise MigrationError("stream", f"PAGES frame {sequence}: zero run carries data")
            self.memory.discard(gpa, size)
        elif encoding == Encoding.RAW:
            if data_length != size:
                raise MigrationError("stream", f"PAGES frame {sequence}: {data_length} bytes for {count} pages")
            target = self.memory.view(gpa, size)
            self.connection.receive_into(target)
            crc = zlib.crc32(target, crc)
        elif encoding in (Encoding.LZ4, Encoding.ZSTD):
            compressed = bytearray(data_length)
            self.connection.receive_into(memoryview(compressed))
            crc = zlib.crc32(compressed, crc)
            if crc == checksum:
                self.memory.view(gpa, size)[:] = self._decompress(Encoding(encoding), compressed, size, sequence)
        else:
            raise MigrationError("stream", f"PAGES frame {sequence}: unknown encoding {encoding}")
        if crc != checksum:
            self.mismatched.add(sequence)
        self.pages += count

    def _decompress(self, encoding: Encoding, data: bytearray, size: int, sequence: int) -> bytes:
        try:
            if encoding == Encoding.LZ4:
                result: bytes = lz4.block.decompress(data, uncompressed_size=size)
            else:
                result = self._decompressor.decompress(data, max_output_size=size)
        except (lz4.block.LZ4BlockError, zstandard.ZstdError) as exc:
            raise MigrationError("stream", f"PAGES frame {sequence}: cannot decompress ({exc})") from None
        if len(result) != size:
            raise MigrationError("stream", f"PAGES frame {sequence}: decompressed to {len(result)} bytes, not {size}")
        return result

    def settle(self, excused: set[int]) -> None:
        """End of a round: every mismatched frame must have been excused by the source."""
        unexplained = self.mismatched - excused
        if unexplained:
            raise MigrationError("stream", f"checksum mismatch in page frame(s) {sorted(unexplained)[:5]}")
        self.mismatched.clear()
