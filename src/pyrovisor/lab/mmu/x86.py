"""x86-64 paging structures as the lab's MMU builds them: levels, page sizes, and guest and EPT entry formats.

Guest tables use the x86-64 format (present, writable, user, accessed, dirty, PS for 2 MiB and 1 GiB
pages; Intel SDM vol. 3, "4-Level Paging and 5-Level Paging"). Nested tables use the EPT format (read,
write, execute, memory type, bit 7 for a large page; Intel SDM vol. 3, "The Extended Page Table
Mechanism"). Both are radix trees of 512 eight-byte entries per 4 KiB table, indexed by 9 address bits
per level, so one walk loop serves both; only the bits that say "present" and "maps a page" differ.
The EPT bits below are kept here, beside `pyrovisor.arch.x86_64.paging`, which has the guest format.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pyrovisor.arch.x86_64.paging import ADDRESS_MASK, ENTRIES_PER_TABLE, LEVELS_4, LEVELS_5, PagingLevel, Pte
from pyrovisor.errors import ConfigError

ENTRY_BYTES = 8
TABLE_BYTES = ENTRIES_PER_TABLE * ENTRY_BYTES
FRAME_SHIFT = 12

PAGE_SIZES = {"4K": 1 << 12, "2M": 1 << 21, "1G": 1 << 30}


class Ept(enum.IntFlag):
    """EPT entry bits (Intel SDM vol. 3, EPT paging-structure entries)."""

    READ = 1 << 0
    WRITE = 1 << 1
    EXECUTE = 1 << 2
    MEMORY_TYPE_WB = 6 << 3  # bits 5:3 of a leaf entry: write-back
    LARGE = 1 << 7  # in a PDPTE or PDE: the entry maps a 1 GiB or 2 MiB page
    ACCESSED = 1 << 8
    DIRTY = 1 << 9


GUEST_TABLE_BITS = Pte.PRESENT | Pte.WRITABLE | Pte.USER | Pte.ACCESSED
GUEST_LEAF_BITS = GUEST_TABLE_BITS | Pte.DIRTY
EPT_TABLE_BITS = Ept.READ | Ept.WRITE | Ept.EXECUTE | Ept.ACCESSED
EPT_LEAF_BITS = EPT_TABLE_BITS | Ept.MEMORY_TYPE_WB | Ept.DIRTY
PRESENT_BITS = {"guest": int(Pte.PRESENT), "ept": int(Ept.READ | Ept.WRITE | Ept.EXECUTE)}
LARGE_BIT = int(Pte.HUGE)  # bit 7 in both formats
assert int(Ept.LARGE) == LARGE_BIT


@dataclass(frozen=True)
class PagingSide:
    """One dimension of translation: how many table levels and which page size its leaves map."""

    levels: int = 4
    page_size: int = PAGE_SIZES["4K"]

    def __post_init__(self) -> None:
        if self.levels not in (4, 5):
            raise ConfigError("paging levels", self.levels, "x86-64 tables have 4 or 5 levels")
        if self.page_size not in PAGE_SIZES.values():
            raise ConfigError("page size", self.page_size, "choose 4K, 2M or 1G")

    @property
    def table_levels(self) -> tuple[PagingLevel, ...]:
        return LEVELS_5 if self.levels == 5 else LEVELS_4

    @property
    def page_shift(self) -> int:
        return self.page_size.bit_length() - 1

    @property
    def leaf(self) -> int:
        """Index of the level whose entries map pages (0 is the root)."""
        return next(i for i, level in enumerate(self.table_levels) if level.shift == self.page_shift)

    @property
    def walked_levels(self) -> int:
        """Entries one cold walk reads on this side: the levels from the root down to the leaf."""
        return self.leaf + 1

    @property
    def address_bits(self) -> int:
        return self.table_levels[0].shift + 9

    def describe(self) -> str:
        name = next(k for k, v in PAGE_SIZES.items() if v == self.page_size)
        return f"{self.levels}-level, {name} pages"


def parse_page_size(text: str) -> int:
    key = text.strip().upper().removesuffix("IB").removesuffix("B")
    if key not in PAGE_SIZES:
        raise ConfigError("page size", text, "choose 4K, 2M or 1G")
    return PAGE_SIZES[key]


def entry_index(address: int, level: PagingLevel) -> int:
    return (address >> level.shift) & (ENTRIES_PER_TABLE - 1)


__all__ = ["ADDRESS_MASK", "ENTRIES_PER_TABLE", "PAGE_SIZES", "Ept", "PagingSide", "Pte", "entry_index",
           "parse_page_size"]
