"""Memory files: full images (sparse, mappable) and diff images (packed dirty pages), and reading them back."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from pyrovisor.arch.x86_64.layout import RamRange
from pyrovisor.errors import StateError
from pyrovisor.memory import GuestMemory, MemoryRegion
from pyrovisor.memory.region import PAGE_SIZE
from pyrovisor.snapshot.state import DIFF, FULL, MemoryImage, MemoryRange

HASH_CHUNK = 8 << 20
WORDS_PER_PAGE = PAGE_SIZE // 8


def nonzero_page_runs(view: memoryview) -> list[tuple[int, int]]:
    """(first page, page count) of each run of pages that hold a non-zero byte."""
    words = np.frombuffer(view, dtype=np.uint64).reshape(-1, WORDS_PER_PAGE)
    used = words.any(axis=1)
    edges = np.flatnonzero(np.diff(np.concatenate(([False], used, [False])).astype(np.int8)))
    return [(int(start), int(end - start)) for start, end in zip(edges[::2], edges[1::2], strict=True)]


def page_runs(pages: Iterable[int]) -> list[tuple[int, int]]:
    """Consecutive page numbers grouped as (first page, count)."""
    runs: list[tuple[int, int]] = []
    for page in sorted(pages):
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
    return runs


def write_full_image(memory: GuestMemory, path: Path) -> MemoryImage:
    """Every RAM region at a page-aligned offset; all-zero pages are left as holes in a sparse file."""
    ranges = []
    offset = 0
    with open(path, "xb") as handle:
        fd = handle.fileno()
        for region in memory.regions:
            for first, count in nonzero_page_runs(region.view):
                start = first * PAGE_SIZE
                _pwrite_all(fd, region.view[start:start + count * PAGE_SIZE], offset + start)
            ranges.append(MemoryRange(region.gpa, region.size, offset))
            offset += region.size
        os.ftruncate(fd, offset)
    return MemoryImage(kind=FULL, file=path.name, file_size=offset, sha256="", ranges=tuple(ranges))


def write_diff_image(memory: GuestMemory, pages: Iterable[int], path: Path) -> MemoryImage:
    """Only the given guest pages, packed one run after another."""
    ranges = []
    offset = 0
    with open(path, "xb") as handle:
        fd = handle.fileno()
        for first, count in page_runs(pages):
            gpa, size = first * PAGE_SIZE, count * PAGE_SIZE
            _pwrite_all(fd, memory.view(gpa, size), offset)
            ranges.append(MemoryRange(gpa, size, offset))
            offset += size
    return MemoryImage(kind=DIFF, file=path.name, file_size=offset, sha256="", ranges=tuple(ranges))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(memoryview(buffer)[:count])
    return digest.hexdigest()


def check_image_file(directory: Path, image: MemoryImage, verify: bool) -> Path:
    """The memory file's path once its size (and, with `verify`, its SHA-256) matches the state file."""
    path = directory / image.file
    source = str(path)
    if Path(image.file).name != image.file:
        raise StateError(source, "memory file name must not contain a directory")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise StateError(source, "memory file is missing") from None
    if size != image.file_size:
        raise StateError(source, f"memory file has {size} bytes, the state file says {image.file_size}")
    for memory_range in image.ranges:
        if memory_range.file_offset < 0 or memory_range.file_offset + memory_range.size > size:
            raise StateError(source, f"range at {memory_range.gpa:#x} lies outside the memory file")
    if verify and file_sha256(path) != image.sha256:
        raise StateError(source, "memory file checksum mismatch: the file is corrupt")
    return path


def open_full_image(directory: Path, image: MemoryImage, ram: Sequence[RamRange], lazy: bool,
                    verify: bool) -> GuestMemory:
    """Guest memory backed by a full image: mapped copy-on-write (lazy) or read into anonymous memory."""
    if image.kind != FULL:
        raise StateError(str(directory), f"expected a full memory image, found {image.kind}")
    expected = [(r.gpa, r.size) for r in ram]
    if [(r.gpa, r.size) for r in image.ranges] != expected:
        raise StateError(str(directory), "memory image regions do not match the machine's RAM layout")
    path = check_image_file(directory, image, verify=verify)
    regions: list[MemoryRegion] = []
    try:
        if lazy:
            for memory_range in image.ranges:
                regions.append(MemoryRegion.file_private(memory_range.gpa, memory_range.size, path,
                                                         memory_range.file_offset))
        else:
            with open(path, "rb", buffering=0) as handle:
                for memory_range in image.ranges:
                    region = MemoryRegion.anonymous(memory_range.gpa, memory_range.size)
                    regions.append(region)
                    _read_data_extents(handle, region.view, memory_range.file_offset, str(path))
    except BaseException:
        for region in regions:
            region.close()
        raise
    return GuestMemory(regions)


def _read_data_extents(handle: io.FileIO, into: memoryview, file_offset: int, source: str) -> None:
    """Read only the parts of a sparse file that hold data; holes stay untouched (zero) memory."""
    fd = handle.fileno()
    end = file_offset + len(into)
    position = file_offset
    while position < end:
        try:
            data_start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after `position`
            return
        if data_start >= end:
            return
        data_end = min(os.lseek(fd, data_start, os.SEEK_HOLE), end)
        handle.seek(data_start)
        _read_exact(handle, into[data_start - file_offset:data_end - file_offset], source)
        position = data_end


def apply_diff_image(directory: Path, image: MemoryImage, memory: GuestMemory, verify: bool) -> None:
    """Copy a diff image's pages over memory restored from its base."""
    if image.kind != DIFF:
        raise StateError(str(directory), f"expected a diff memory image, found {image.kind}")
    path = check_image_file(directory, image, verify=verify)
    for memory_range in image.ranges:
        if not memory.contains(memory_range.gpa, memory_range.size):
            raise StateError(str(path), f"diff range at {memory_range.gpa:#x} lies outside guest RAM")
    with open(path, "rb", buffering=0) as handle:
        for memory_range in image.ranges:
            handle.seek(memory_range.file_offset)
            _read_exact(handle, memory.view(memory_range.gpa, memory_range.size), str(path))


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


def _read_exact(handle: io.FileIO, into: memoryview, source: str) -> None:
    view = memoryview(into).cast("B")
    position = 0
    while position < len(view):
        count = handle.readinto(view[position:])
        if not count:
            raise StateError(source, "memory file ended early")
        position += count
