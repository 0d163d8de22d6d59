"""The OS guest's program archive (its initrd): which programs it holds and where their images lie."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from pyrovisor.errors import LoaderError

ARCHIVE_MAGIC = 0x41525950  # "PYRA"
ARCHIVE_VERSION = 1
_HEADER = struct.Struct("<IIII")  # magic, version, count, entry size
_ENTRY = struct.Struct("<16sQQQQQQ")  # name, offset, image size, load address, entry, rw start, rw end


@dataclass(frozen=True)
class ArchiveEntry:
    name: str
    offset: int  # of the image in the archive (page-aligned)
    image_size: int
    load_va: int  # where a process sees the image
    entry: int
    rw_start: int
    rw_end: int

    def contains(self, address: int) -> bool:
        """True for an address inside the program's image as its process sees it."""
        return self.load_va <= address < self.load_va + self.image_size


def read_archive(data: bytes, source: str = "archive") -> tuple[ArchiveEntry, ...]:
    if len(data) < _HEADER.size:
        raise LoaderError(source, "too short for a program archive")
    magic, version, count, entry_size = _HEADER.unpack_from(data)
    if magic != ARCHIVE_MAGIC or version != ARCHIVE_VERSION or entry_size != _ENTRY.size:
        raise LoaderError(source, f"not a version {ARCHIVE_VERSION} program archive (magic {magic:#x})")
    if _HEADER.size + count * _ENTRY.size > len(data):
        raise LoaderError(source, f"{count} entries do not fit in {len(data)} bytes")
    entries = []
    for index in range(count):
        name, *numbers = _ENTRY.unpack_from(data, _HEADER.size + index * _ENTRY.size)
        entry = ArchiveEntry(name.rstrip(b"\0").decode(errors="replace"), *numbers)
        if entry.offset + entry.image_size > len(data):
            raise LoaderError(source, f"program {entry.name} lies past the end of the archive")
        entries.append(entry)
    return tuple(entries)


def load_archive(path: Path) -> tuple[ArchiveEntry, ...]:
    try:
        return read_archive(path.read_bytes(), str(path))
    except OSError as exc:
        raise LoaderError(str(path), exc.strerror or "cannot read") from None
