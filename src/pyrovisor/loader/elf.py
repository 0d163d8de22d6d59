"""Loads an x86-64 ELF executable into guest memory at its physical addresses (pyelftools)."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from pyrovisor.errors import GuestMemoryError, LoaderError
from pyrovisor.memory import GuestMemory

AP_ENTRY_SYMBOL = "ap_start"
PAGE_SIZE = 4096


@dataclass(frozen=True)
class LoadedSegment:
    physical_address: int
    virtual_address: int
    file_size: int
    memory_size: int
    flags: int  # PF_X=1, PF_W=2, PF_R=4


@dataclass(frozen=True)
class LoadResult:
    path: str
    entry: int
    ap_entry: int | None
    segments: tuple[LoadedSegment, ...]
    image_start: int  # lowest physical address loaded
    image_end: int  # one past the highest, rounded up to a page


def load_elf(path: Path, memory: GuestMemory, lowest_physical: int,
             virtual_to_physical: Callable[[int], int | None], image: bytes | None = None) -> LoadResult:
    """Copy every PT_LOAD segment of `path` to its p_paddr and zero its bss.

    `virtual_to_physical` says how the boot page tables map a virtual address; each segment's
    virtual address must map to its physical address there, so the entry point is reachable.
    `image` is the file's content when the caller has read it already (so that what is loaded is
    exactly what it measured).
    """
    name = str(path)
    data = read_image(path) if image is None else image
    if data[:4] != b"\x7fELF":
        raise LoaderError(name, "not an ELF file")
    try:
        return _load(name, ELFFile(io.BytesIO(data)), memory, lowest_physical, virtual_to_physical)
    except ELFError as exc:
        raise LoaderError(name, f"malformed ELF: {exc}") from None


def read_image(path: Path) -> bytes:
    """A kernel image file's bytes, or a LoaderError saying why they cannot be read."""
    name = str(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise LoaderError(name, "no such file") from None
    except IsADirectoryError:
        raise LoaderError(name, "is a directory, not a kernel image") from None
    except PermissionError:
        raise LoaderError(name, "permission denied") from None
    except OSError as exc:
        raise LoaderError(name, exc.strerror or "cannot read") from None


def _load(name: str, elf: ELFFile, memory: GuestMemory, lowest_physical: int,
          virtual_to_physical: Callable[[int], int | None]) -> LoadResult:
    if elf.elfclass != 64:
        raise LoaderError(name, f"{elf.elfclass}-bit ELF; pyrovisor runs x86-64 (64-bit) guests")
    if elf["e_machine"] != "EM_X86_64":
        raise LoaderError(name, f"machine is {elf['e_machine']}, not EM_X86_64")
    if elf["e_type"] != "ET_EXEC":
        raise LoaderError(name, f"type {elf['e_type']}: only statically linked executables (ET_EXEC) can be loaded")
    segments = []
    for segment in elf.iter_segments():
        if segment["p_type"] != "PT_LOAD" or segment["p_memsz"] == 0:
            continue
        loaded = LoadedSegment(segment["p_paddr"], segment["p_vaddr"], segment["p_filesz"],
                               segment["p_memsz"], segment["p_flags"])
        _check_segment(name, loaded, memory, lowest_physical, virtual_to_physical)
        segments.append((loaded, segment))
    if not segments:
        raise LoaderError(name, "no loadable segments")
    for loaded, segment in segments:
        try:
            memory.write(loaded.physical_address, segment.data())
            memory.fill(loaded.physical_address + loaded.file_size, loaded.memory_size - loaded.file_size)
        except GuestMemoryError as exc:
            raise LoaderError(name, str(exc)) from None
    entry = elf["e_entry"]
    if not any(s.virtual_address <= entry < s.virtual_address + s.memory_size for s, _ in segments):
        raise LoaderError(name, f"entry point {entry:#x} is outside every loadable segment")
    start = min(s.physical_address for s, _ in segments)
    end = max(s.physical_address + s.memory_size for s, _ in segments)
    return LoadResult(
        path=name,
        entry=entry,
        ap_entry=_symbol(elf, AP_ENTRY_SYMBOL),
        segments=tuple(s for s, _ in segments),
        image_start=start,
        image_end=-(-end // PAGE_SIZE) * PAGE_SIZE,
    )


def _check_segment(name: str, segment: LoadedSegment, memory: GuestMemory, lowest_physical: int,
                   virtual_to_physical: Callable[[int], int | None]) -> None:
    where = f"segment at physical {segment.physical_address:#x} (+{segment.memory_size:#x})"
    if segment.file_size > segment.memory_size:
        raise LoaderError(name, f"{where} has more file bytes than memory bytes")
    if segment.physical_address < lowest_physical:
        raise LoaderError(name, f"{where} is below {lowest_physical:#x}, which is reserved for boot data")
    if not memory.contains(segment.physical_address, segment.memory_size):
        raise LoaderError(name, f"{where} does not fit in guest RAM ({memory.size >> 20} MiB); try a larger --memory")
    if virtual_to_physical(segment.virtual_address) != segment.physical_address:
        raise LoaderError(name, f"{where} is linked at virtual {segment.virtual_address:#x}, which the boot page "
                          "tables do not map to that physical address (link at VA == PA or at the kernel map)")


def _symbol(elf: ELFFile, wanted: str) -> int | None:
    table = elf.get_section_by_name(".symtab")
    if not isinstance(table, SymbolTableSection):
        return None
    for symbol in table.get_symbol_by_name(wanted) or ():
        value: int = symbol["st_value"]
        return value
    return None
