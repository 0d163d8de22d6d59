"""Memory files: full images (sparse, mappable) and diff images (packed dirty pages), and reading them back."""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from pyrovisor.arch.x86_64.layout import RamRange
from pyrovisor.errors import StateError
from pyrovisor.memory import GuestMemory, MemoryRegion, PageSet
from pyrovisor.memory.region import PAGE_SIZE
from pyrovisor.memory.zero_pages import content_runs
from pyrovisor.snapshot.file_format import SnapshotFile, create_private_file, open_snapshot_file
from pyrovisor.snapshot.state import DIFF, FULL, MemoryImage, MemoryRange


def nonzero_page_runs(view: memoryview) -> list[tuple[int, int]]:
    """(first page, page count) of each run of pages that hold a non-zero byte."""
    return [(first, count) for first, count, data in content_runs(view) if data]


def page_runs(pages: Iterable[int]) -> list[tuple[int, int]]:
    """Consecutive page numbers (in any order; a PageSet as it is) grouped as (first page, count)."""
    return PageSet.of(pages).runs()


def write_full_image(memory: GuestMemory, path: Path) -> MemoryImage:
    """Every RAM region at a page-aligned offset; all-zero pages are left as holes in a sparse file.
    The file is new (never an existing one) and has mode 0600."""
    ranges = []
    offset = 0
    fd = create_private_file(path, "memory file")
    try:
        for region in memory.regions:
            for first, count in nonzero_page_runs(region.view):
                start = first * PAGE_SIZE
                _pwrite_all(fd, region.view[start:start + count * PAGE_SIZE], offset + start)
            ranges.append(MemoryRange(region.gpa, region.size, offset))
            offset += region.size
        os.ftruncate(fd, offset)
    finally:
        os.close(fd)
    return MemoryImage(kind=FULL, file=path.name, file_size=offset, sha256="", ranges=tuple(ranges))


def write_diff_image(memory: GuestMemory, pages: Iterable[int], path: Path) -> MemoryImage:
    """Only the given guest pages (a PageSet, or page numbers), packed one run after another, in a new file
    of mode 0600."""
    ranges = []
    offset = 0
    fd = create_private_file(path, "memory file")
    try:
        for first, count in page_runs(pages):
            gpa, size = first * PAGE_SIZE, count * PAGE_SIZE
            _pwrite_all(fd, memory.view(gpa, size), offset)
            ranges.append(MemoryRange(gpa, size, offset))
            offset += size
    finally:
        os.close(fd)
    return MemoryImage(kind=DIFF, file=path.name, file_size=offset, sha256="", ranges=tuple(ranges))


def file_sha256(path: Path) -> str:
    with open_snapshot_file(path, "memory file") as file:
        return file.sha256()


def check_file_name(name: str, source: str) -> None:
    """A memory file is named by a plain file name in the snapshot's directory, nothing else."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise StateError(source, f"memory file name {name!r} is not a plain file name")


def check_memory_image(image: MemoryImage, kind: str, ram: Sequence[RamRange], source: str) -> None:
    """Every field of a memory image description, checked before any file is opened or mapped.

    Ranges must be page-aligned and non-empty, must not overlap in the file or in guest memory, must
    end where the file ends, and must lie in guest RAM (a full image: be exactly the RAM ranges)."""
    if image.kind != kind:
        raise StateError(source, f"expected a {kind} memory image, found {image.kind!r}")
    check_file_name(image.file, source)
    for index, memory_range in enumerate(image.ranges):
        where = f"memory range {index}"
        for field, value in (("gpa", memory_range.gpa), ("file_offset", memory_range.file_offset)):
            if value < 0 or value % PAGE_SIZE:
                raise StateError(source, f"{where}: {field} {value:#x} is not a page-aligned address")
        if memory_range.size <= 0 or memory_range.size % PAGE_SIZE:
            raise StateError(source, f"{where}: size {memory_range.size:#x} is not a positive multiple of "
                             f"{PAGE_SIZE} bytes")
    _check_disjoint(image.ranges, [r.gpa for r in image.ranges], "guest memory", source)
    _check_disjoint(image.ranges, [r.file_offset for r in image.ranges], "the memory file", source)
    end = max((r.file_offset + r.size for r in image.ranges), default=0)
    if image.file_size != end:
        raise StateError(source, f"file_size {image.file_size} disagrees with the ranges, which end at {end}")
    if kind == FULL:
        if [(r.gpa, r.size) for r in image.ranges] != [(r.gpa, r.size) for r in ram]:
            raise StateError(source, "memory image regions do not match the machine's RAM layout")
        return
    for index, memory_range in enumerate(image.ranges):
        if not any(r.gpa <= memory_range.gpa and memory_range.gpa + memory_range.size <= r.end for r in ram):
            raise StateError(source, f"memory range {index}: diff range at {memory_range.gpa:#x} "
                             f"(+{memory_range.size:#x}) lies outside guest RAM")


def _check_disjoint(ranges: Sequence[MemoryRange], starts: Sequence[int], space: str, source: str) -> None:
    """No two ranges (starting at `starts`, with their sizes) share a byte."""
    ordered = sorted(range(len(ranges)), key=starts.__getitem__)
    for before, after in itertools.pairwise(ordered):
        if starts[before] + ranges[before].size > starts[after]:
            raise StateError(source, f"memory ranges {before} and {after} overlap in {space}")


def _open_image_file(directory: Path, image: MemoryImage, verify: bool) -> SnapshotFile:
    """The memory file, open, once its size (and, with `verify`, its SHA-256) matches the state file."""
    file = open_snapshot_file(directory / image.file, "memory file")
    try:
        if file.size != image.file_size:
            raise StateError(file.source, f"memory file has {file.size} bytes, the state file says {image.file_size}")
        if verify and file.sha256() != image.sha256:
            raise StateError(file.source, "memory file checksum mismatch: the file is corrupt")
    except BaseException:
        file.close()
        raise
    return file


def open_full_image(directory: Path, image: MemoryImage, ram: Sequence[RamRange], lazy: bool,
                    verify: bool) -> GuestMemory:
    """Guest memory backed by a full image: mapped copy-on-write (lazy) or read into anonymous memory."""
    check_memory_image(image, FULL, ram, str(directory))
    regions: list[MemoryRegion] = []
    with _open_image_file(directory, image, verify=verify) as file:
        try:
            for memory_range in image.ranges:
                if lazy:
                    regions.append(_map_private(file, memory_range))
                else:
                    region = MemoryRegion.anonymous(memory_range.gpa, memory_range.size)
                    regions.append(region)
                    _read_data_extents(file, region.view, memory_range.file_offset)
        except BaseException:
            for region in regions:
                region.close()
            raise
    return GuestMemory(regions)


def _map_private(file: SnapshotFile, memory_range: MemoryRange) -> MemoryRegion:
    try:
        return MemoryRegion.file_private(memory_range.gpa, memory_range.size, file.reopen_path,
                                         memory_range.file_offset)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise StateError(file.source, f"cannot map the memory file: {reason}") from None


def _read_data_extents(file: SnapshotFile, into: memoryview, file_offset: int) -> None:
    """Read only the parts of a sparse file that hold data; holes stay untouched (zero) memory."""
    end = file_offset + len(into)
    position = file_offset
    while position < end:
        try:
            data_start = os.lseek(file.fd, position, os.SEEK_DATA)
            if data_start >= end:
                return
            data_end = min(os.lseek(file.fd, data_start, os.SEEK_HOLE), end)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after `position`
                return
            raise StateError(file.source, f"cannot read the memory file: {os.strerror(exc.errno or 0)}") from None
        with into[data_start - file_offset:data_end - file_offset] as part:
            file.read_into(part, data_start)
        position = data_end


def apply_diff_image(directory: Path, image: MemoryImage, memory: GuestMemory, verify: bool) -> None:
    """Copy a diff image's pages over memory restored from its base."""
    ram = [RamRange(region.gpa, region.size) for region in memory.regions]
    check_memory_image(image, DIFF, ram, str(directory))
    with _open_image_file(directory, image, verify=verify) as file:
        for memory_range in image.ranges:
            with memory.view(memory_range.gpa, memory_range.size) as target:  # released even on an error
                file.read_into(target, memory_range.file_offset)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written
