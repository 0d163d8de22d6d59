"""Multiboot 1 kernels: find the header, load the image (ELF or the header's addresses), recognise the format."""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from pyrovisor.config import BOOT_MULTIBOOT, BOOT_PYROVISOR
from pyrovisor.errors import LoaderError
from pyrovisor.loader.elf import PAGE_SIZE, LoadedSegment, LoadResult, read_image
from pyrovisor.memory import GuestMemory

HEADER_MAGIC = 0x1BADB002
HEADER_SEARCH_BYTES = 8192  # the header lies 32-bit aligned within the image's first 8 KiB
HEADER_FIELDS = 3  # magic, flags, checksum; the a.out-kludge addresses follow
KLUDGE_FIELDS = 5  # header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr
FLAG_PAGE_ALIGN = 1 << 0  # modules on page boundaries
FLAG_MEMORY_INFO = 1 << 1  # mem_lower/mem_upper and the memory map
FLAG_VIDEO_MODE = 1 << 2  # a graphics mode (no display here: left in text mode, like QEMU)
FLAG_AOUT_KLUDGE = 1 << 16  # load from the header's address fields instead of the ELF headers
REQUIRED_FLAGS = 0xFFFF  # bits a loader must understand or refuse the image
UNDERSTOOD_FLAGS = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE
ADDRESS_LIMIT = 1 << 32  # the kernel is entered with paging off: everything below 4 GiB

ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True)
class MultibootHeader:
    offset: int  # of the magic in the file
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0

    @property
    def aout_kludge(self) -> bool:
        return bool(self.flags & FLAG_AOUT_KLUDGE)


@dataclass(frozen=True)
class MultibootKernel:
    header: MultibootHeader
    image: LoadResult
    format: str  # "ELF32", "ELF64" or "a.out kludge"


@dataclass(frozen=True)
class Reserved:
    """Guest physical memory the VMM writes its boot data to; a kernel may not load over it."""

    start: int
    end: int
    what: str


def find_header(data: bytes, name: str) -> MultibootHeader | None:
    """The first valid header in the first 8 KiB; None when there is no magic at all. A magic whose checksum
    is wrong (and no valid header) is an error, as is a required flag this loader does not know."""
    limit = min(len(data), HEADER_SEARCH_BYTES)
    bad_checksum: int | None = None
    for offset in range(0, limit - 4 * HEADER_FIELDS + 1, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, offset)
        if magic != HEADER_MAGIC:
            continue
        if (magic + flags + checksum) & 0xFFFFFFFF:
            bad_checksum = offset if bad_checksum is None else bad_checksum
            continue
        unknown = flags & REQUIRED_FLAGS & ~UNDERSTOOD_FLAGS
        if unknown:
            raise LoaderError(name, f"Multiboot header at offset {offset:#x} requires features this loader does "
                              f"not know (flags {unknown:#x})")
        if not flags & FLAG_AOUT_KLUDGE:
            return MultibootHeader(offset, flags)
        if offset + 4 * (HEADER_FIELDS + KLUDGE_FIELDS) > len(data):
            raise LoaderError(name, f"Multiboot header at offset {offset:#x} is cut short: its address fields "
                              "are missing")
        fields = struct.unpack_from("<5I", data, offset + 4 * HEADER_FIELDS)
        return MultibootHeader(offset, flags, *fields)
    if bad_checksum is not None:
        raise LoaderError(name, f"Multiboot header at offset {bad_checksum:#x} has a bad checksum "
                          "(magic + flags + checksum must be 0 modulo 2^32)")
    return None


def detect_protocol(path: Path) -> tuple[str, str]:
    """(boot protocol, what the file is) for `pyrovisor run`: a Multiboot header anywhere in the first 8 KiB
    makes a Multiboot kernel; otherwise an ELF64 is one of pyrovisor's own. Unreadable files and other formats
    are left to the ELF loader to report."""
    name = str(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(HEADER_SEARCH_BYTES)
    except OSError:
        return BOOT_PYROVISOR, "unreadable file"
    header = find_header(head, name)
    is_elf = head[:4] == ELF_MAGIC and len(head) > 4
    elf_class = {1: "ELF32", 2: "ELF64"}.get(head[4], "ELF") if is_elf else ""
    if header is not None:
        kind = "a.out kludge" if header.aout_kludge else elf_class or "no ELF headers"
        return BOOT_MULTIBOOT, f"Multiboot 1 kernel ({kind}), header at offset {header.offset:#x}"
    if elf_class == "ELF32":
        raise LoaderError(name, "32-bit ELF without a Multiboot header: pyrovisor runs ELF64 kernels (its own "
                          "boot protocol) and Multiboot kernels")
    return BOOT_PYROVISOR, f"{elf_class or 'not an ELF'} kernel for pyrovisor's boot protocol"


def load_multiboot(path: Path, memory: GuestMemory, reserved: tuple[Reserved, ...]) -> MultibootKernel:
    """Load a Multiboot kernel at its physical addresses, zeroing its bss, and check that it stays in RAM,
    below 4 GiB and clear of the VMM's boot data."""
    name = str(path)
    data = read_image(path)
    header = find_header(data, name)
    if header is None:
        raise LoaderError(name, "no Multiboot header in the first 8 KiB")
    if header.aout_kludge:
        pieces, entry, kind = _kludge_pieces(name, data, header)
    elif data[:4] == ELF_MAGIC:
        pieces, entry, kind = _elf_pieces(name, data)
    else:
        raise LoaderError(name, "the Multiboot header has no address fields (flag 16) and the file is not ELF")
    segments = []
    for segment, _ in pieces:
        _check_range(name, segment, memory, reserved)
        segments.append(segment)
    for segment, payload in pieces:
        memory.write(segment.physical_address, payload)
        memory.fill(segment.physical_address + segment.file_size, segment.memory_size - segment.file_size)
    if not any(s.physical_address <= entry < s.physical_address + s.memory_size for s in segments):
        raise LoaderError(name, f"entry point {entry:#x} is outside every loaded range")
    start = min(s.physical_address for s in segments)
    end = max(s.physical_address + s.memory_size for s in segments)
    image = LoadResult(path=name, entry=entry, ap_entry=None, segments=tuple(segments), image_start=start,
                       image_end=-(-end // PAGE_SIZE) * PAGE_SIZE)
    return MultibootKernel(header, image, kind)


Piece = tuple[LoadedSegment, bytes]


def _kludge_pieces(name: str, data: bytes, header: MultibootHeader) -> tuple[list[Piece], int, str]:
    """The image from the header's address fields: the file from `load_addr`'s offset, then zeroed bss."""
    where = "Multiboot header address fields"
    if header.load_addr > header.header_addr:
        raise LoaderError(name, f"{where}: load_addr {header.load_addr:#x} is above header_addr "
                          f"{header.header_addr:#x}")
    file_start = header.offset - (header.header_addr - header.load_addr)
    if file_start < 0:
        raise LoaderError(name, f"{where}: header_addr - load_addr ({header.header_addr - header.load_addr:#x}) "
                          f"is more than the header's offset in the file ({header.offset:#x})")
    if header.load_end_addr == 0:
        load_size = len(data) - file_start
    elif header.load_end_addr <= header.load_addr:
        raise LoaderError(name, f"{where}: load_end_addr {header.load_end_addr:#x} is not above load_addr "
                          f"{header.load_addr:#x}")
    else:
        load_size = header.load_end_addr - header.load_addr
        if file_start + load_size > len(data):
            raise LoaderError(name, f"{where}: load_end_addr {header.load_end_addr:#x} is past the end of the "
                              f"file ({len(data) - file_start:#x} bytes from load_addr)")
    end = header.load_addr + load_size
    if header.bss_end_addr and header.bss_end_addr < end:
        raise LoaderError(name, f"{where}: bss_end_addr {header.bss_end_addr:#x} is below the end of the loaded "
                          f"image {end:#x}")
    memory_size = max(header.bss_end_addr, end) - header.load_addr
    if not header.load_addr <= header.entry_addr < header.load_addr + memory_size:
        raise LoaderError(name, f"{where}: entry_addr {header.entry_addr:#x} is outside the image "
                          f"[{header.load_addr:#x}, {header.load_addr + memory_size:#x})")
    segment = LoadedSegment(header.load_addr, header.load_addr, load_size, memory_size, 7)
    return [(segment, data[file_start:file_start + load_size])], header.entry_addr, "a.out kludge"


def _elf_pieces(name: str, data: bytes) -> tuple[list[Piece], int, str]:
    try:
        elf = ELFFile(io.BytesIO(data))
        machine = {32: "EM_386", 64: "EM_X86_64"}[elf.elfclass]
        if elf["e_machine"] != machine:
            raise LoaderError(name, f"ELF{elf.elfclass} for {elf['e_machine']}, not {machine}")
        if elf["e_type"] != "ET_EXEC":
            raise LoaderError(name, f"type {elf['e_type']}: only executables (ET_EXEC) can be loaded")
        pieces: list[Piece] = []
        for segment in elf.iter_segments():
            if segment["p_type"] != "PT_LOAD" or segment["p_memsz"] == 0:
                continue
            loaded = LoadedSegment(segment["p_paddr"], segment["p_vaddr"], segment["p_filesz"], segment["p_memsz"],
                                   segment["p_flags"])
            if loaded.file_size > loaded.memory_size:
                raise LoaderError(name, f"segment at {loaded.physical_address:#x} has more file bytes than memory "
                                  "bytes")
            pieces.append((loaded, segment.data()))
        entry: int = elf["e_entry"]
    except ELFError as exc:
        raise LoaderError(name, f"malformed ELF: {exc}") from None
    if not pieces:
        raise LoaderError(name, "no loadable segments")
    for loaded, _ in pieces:  # an entry linked at a virtual address runs at the segment's physical one
        if loaded.virtual_address <= entry < loaded.virtual_address + loaded.memory_size:
            entry = loaded.physical_address + entry - loaded.virtual_address
            break
    return pieces, entry, f"ELF{elf.elfclass}"


def _check_range(name: str, segment: LoadedSegment, memory: GuestMemory, reserved: tuple[Reserved, ...]) -> None:
    start, end = segment.physical_address, segment.physical_address + segment.memory_size
    where = f"load range [{start:#x}, {end:#x})"
    if end > ADDRESS_LIMIT:
        raise LoaderError(name, f"{where} is above 4 GiB, out of reach with paging off")
    if not memory.contains(start, segment.memory_size):
        raise LoaderError(name, f"{where} is outside guest RAM ({memory.size >> 20} MiB); try a larger --memory")
    for area in reserved:
        if start < area.end and area.start < end:
            raise LoaderError(name, f"{where} overlaps the {area.what} at [{area.start:#x}, {area.end:#x})")
