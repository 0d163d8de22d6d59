"""Packs user programs (ELF files linked with programs/user.ld) into the OS's program archive.

Usage: mkarchive.py OUTPUT PROGRAM.elf...   (the program's name is the file name without .elf)
Layout (guests/os/include/os/abi.h): header, entries, then each image at a page-aligned offset.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

from elf64 import PF_W, PT_LOAD, Elf

MAGIC = 0x41525950  # "PYRA"
VERSION = 1
PAGE = 4096
NAME_MAX = 16
HEADER = struct.Struct("<IIII")
ENTRY = struct.Struct("<16sQQQQQQ")


def round_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def image_of(path: Path) -> tuple[bytes, int, int, int, int]:
    """(image bytes, load address, entry, rw_start, rw_end) of one program."""
    elf = Elf(path.read_bytes())
    loads = [s for s in elf.segments() if s.type == PT_LOAD and s.memsz]
    writable = [s for s in loads if s.flags & PF_W]
    if not loads or len(writable) > 1:
        raise SystemExit(f"{path}: expected an image segment and at most one writable segment")
    load_va = min(s.paddr for s in loads)
    if load_va % PAGE:
        raise SystemExit(f"{path}: image not page-aligned at {load_va:#x}")
    end = max(s.paddr + s.filesz for s in loads)
    image = bytearray(round_up(end - load_va, PAGE))
    for segment in loads:
        image[segment.paddr - load_va:segment.paddr - load_va + segment.filesz] = \
            elf.data[segment.offset:segment.offset + segment.filesz]
    rw_start = writable[0].vaddr if writable else load_va + len(image)
    rw_end = writable[0].vaddr + writable[0].memsz if writable else rw_start
    if load_va + len(image) > rw_start:
        raise SystemExit(f"{path}: the image ({len(image)} bytes) runs into the writable region at {rw_start:#x}")
    return bytes(image), load_va, elf.entry, rw_start, rw_end


def main() -> None:
    output, programs = Path(sys.argv[1]), [Path(arg) for arg in sys.argv[2:]]
    images = [image_of(path) for path in programs]
    offset = round_up(HEADER.size + ENTRY.size * len(programs), PAGE)
    table, blobs = [], []
    for path, (image, load_va, entry, rw_start, rw_end) in zip(programs, images, strict=True):
        name = path.stem.encode()
        if len(name) >= NAME_MAX:
            raise SystemExit(f"{path}: program name longer than {NAME_MAX - 1} characters")
        table.append(ENTRY.pack(name, offset, len(image), load_va, entry, rw_start, rw_end))
        blobs.append(image)
        offset += len(image)
    head = HEADER.pack(MAGIC, VERSION, len(programs), ENTRY.size) + b"".join(table)
    data = head + bytes(round_up(len(head), PAGE) - len(head)) + b"".join(blobs)
    output.write_bytes(data)


if __name__ == "__main__":
    main()
