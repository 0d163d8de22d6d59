"""Program headers and symbols of an ELF64 file, read with pyelftools, for the guest build's tools."""

from __future__ import annotations

import io
from dataclasses import dataclass

from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

PT_LOAD = 1
PF_X, PF_W, PF_R = 1, 2, 4
STT_OBJECT, STT_FUNC = 1, 2
_SEGMENT_TYPES = {"PT_LOAD": PT_LOAD}
_SYMBOL_KINDS = {"STT_OBJECT": STT_OBJECT, "STT_FUNC": STT_FUNC}


@dataclass(frozen=True)
class Segment:
    type: int  # PT_LOAD, or 0 for any other kind
    flags: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class Symbol:
    name: str
    value: int
    size: int
    kind: int  # STT_OBJECT, STT_FUNC, or 0 for any other kind


class Elf:
    """An ELF64 little-endian file held in memory."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._elf = ELFFile(io.BytesIO(data))
        if self._elf.elfclass != 64 or not self._elf.little_endian:
            raise ValueError("not a little-endian ELF64 file")
        self.entry: int = self._elf.header["e_entry"]

    def segments(self) -> list[Segment]:
        return [Segment(_SEGMENT_TYPES.get(s["p_type"], 0), s["p_flags"], s["p_offset"], s["p_vaddr"], s["p_paddr"],
                        s["p_filesz"], s["p_memsz"]) for s in self._elf.iter_segments()]

    def symbols(self) -> list[Symbol]:
        table = self._elf.get_section_by_name(".symtab")
        if not isinstance(table, SymbolTableSection):
            return []
        return [Symbol(s.name, s["st_value"], s["st_size"], _SYMBOL_KINDS.get(s["st_info"]["type"], 0))
                for s in table.iter_symbols() if s.name and s["st_shndx"] != "SHN_UNDEF"]
