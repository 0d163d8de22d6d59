"""x86-64 paging: entry bits, a table of levels, one walk loop for 4- and 5-level tables, boot tables."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import IntFlag

from pyrovisor.arch.x86_64.layout import (
    DIRECT_MAP_BASE,
    KERNEL_MAP_BASE,
    KERNEL_MAP_SIZE,
    MMIO_HOLE_END,
    MMIO_HOLE_START,
    PAGE_SIZE,
    GiB,
    RamRange,
)
from pyrovisor.errors import GuestMemoryError


class Pte(IntFlag):
    PRESENT = 1 << 0
    WRITABLE = 1 << 1
    USER = 1 << 2
    WRITE_THROUGH = 1 << 3
    CACHE_DISABLE = 1 << 4
    ACCESSED = 1 << 5
    DIRTY = 1 << 6
    HUGE = 1 << 7  # PS: this entry maps a page (PDPT: 1 GiB, PD: 2 MiB)
    GLOBAL = 1 << 8
    NO_EXECUTE = 1 << 63


ADDRESS_MASK = 0x000F_FFFF_FFFF_F000  # bits 12..51
ENTRIES_PER_TABLE = 512


@dataclass(frozen=True)
class PagingLevel:
    """One level of a page-table walk: the VA bits it indexes and whether it may map a page."""

    name: str
    shift: int
    can_map_page: bool  # a PS entry here maps a page of size 1 << shift; the last level always maps

    def index(self, virtual_address: int) -> int:
        return (virtual_address >> self.shift) & (ENTRIES_PER_TABLE - 1)

    @property
    def page_size(self) -> int:
        return 1 << self.shift


LEVELS_4 = (
    PagingLevel("PML4", 39, False),
    PagingLevel("PDPT", 30, True),
    PagingLevel("PD", 21, True),
    PagingLevel("PT", 12, True),
)
LEVELS_5 = (PagingLevel("PML5", 48, False), *LEVELS_4)


@dataclass(frozen=True)
class Translation:
    """A successful walk: where the address lands and the effective permissions of the path."""

    virtual_address: int
    physical_address: int
    page_size: int
    writable: bool
    user: bool
    executable: bool
    entries: tuple[tuple[str, int, int], ...]  # (level name, entry address, entry value) in walk order


class TranslationFault(GuestMemoryError):
    """The walk hit a non-present entry (what the CPU would report as a page fault)."""

    def __init__(self, virtual_address: int, level: str, entry_address: int) -> None:
        self.virtual_address = virtual_address
        self.level = level
        self.entry_address = entry_address
        super().__init__(entry_address, 8, f"virtual address {virtual_address:#x} not mapped at {level}")


def canonical(virtual_address: int, levels: tuple[PagingLevel, ...] = LEVELS_4) -> bool:
    top_bit = levels[0].shift + 8
    upper = virtual_address >> top_bit
    return upper in (0, (1 << (64 - top_bit)) - 1)


def walk(read_u64: Callable[[int], int], root: int, virtual_address: int,
         levels: tuple[PagingLevel, ...] = LEVELS_4) -> Translation:
    """Translate `virtual_address` through the tables at physical `root` (CR3), as the MMU does."""
    if not canonical(virtual_address, levels):
        raise TranslationFault(virtual_address, "canonical check", root)
    table = root & ADDRESS_MASK
    writable = user = executable = True
    visited: list[tuple[str, int, int]] = []
    for depth, level in enumerate(levels):
        entry_address = table + 8 * level.index(virtual_address)
        entry = read_u64(entry_address)
        visited.append((level.name, entry_address, entry))
        if not entry & Pte.PRESENT:
            raise TranslationFault(virtual_address, level.name, entry_address)
        writable &= bool(entry & Pte.WRITABLE)
        user &= bool(entry & Pte.USER)
        executable &= not entry & Pte.NO_EXECUTE
        is_last = depth == len(levels) - 1
        if is_last or (level.can_map_page and entry & Pte.HUGE):
            page_mask = level.page_size - 1
            frame = entry & ADDRESS_MASK & ~page_mask
            return Translation(virtual_address, frame | (virtual_address & page_mask), level.page_size,
                               writable, user, executable, tuple(visited))
        table = entry & ADDRESS_MASK
    raise AssertionError("unreachable: the last level always maps")


@dataclass(frozen=True)
class Mapping:
    """One present leaf entry: a page of `size` bytes at `virtual_address` mapping `physical_address`."""

    virtual_address: int
    physical_address: int
    size: int
    writable: bool
    user: bool


def mappings(read_u64: Callable[[int], int], root: int, start: int = 0, end: int = 1 << 47,
             levels: tuple[PagingLevel, ...] = LEVELS_4) -> Iterator[Mapping]:
    """Every present leaf under `root` for virtual addresses in [start, end), in address order, through
    the same table of levels as `walk`. `start` and `end` count the upper half without its sign extension
    (0x8000_0000_0000 for 4 levels); the mappings carry canonical addresses."""
    top_bit = levels[0].shift + 8  # 47 for 4 levels, 56 for 5

    def canonical_address(va: int) -> int:
        return va | ((1 << 64) - (1 << (top_bit + 1))) if va >> top_bit & 1 else va  # sign-extend to 64 bits

    def leaves(table: int, depth: int, table_va: int, writable: bool, user: bool) -> Iterator[Mapping]:
        level = levels[depth]
        span = 1 << level.shift
        for index in range(ENTRIES_PER_TABLE):
            va = table_va + index * span
            if va + span <= start or va >= end:
                continue
            entry = read_u64(table + 8 * index)
            if not entry & Pte.PRESENT:
                continue
            entry_writable, entry_user = writable and bool(entry & Pte.WRITABLE), user and bool(entry & Pte.USER)
            if depth == len(levels) - 1 or (level.can_map_page and entry & Pte.HUGE):
                yield Mapping(canonical_address(va), entry & ADDRESS_MASK & ~(span - 1), span, entry_writable,
                              entry_user)
            else:
                yield from leaves(entry & ADDRESS_MASK, depth + 1, va, entry_writable, entry_user)

    return leaves(root & ADDRESS_MASK, 0, 0, True, True)


@dataclass(frozen=True)
class BootPageTables:
    """Where the boot tables live and what they map."""

    root: int
    pages_used: int
    identity_limit: int  # VA == PA below this address


def build_boot_page_tables(ram: tuple[RamRange, ...], write_u64: Callable[[int, int], None],
                           area_start: int, area_end: int) -> BootPageTables:
    """Write the boot page tables (2 MiB pages, supervisor-only) into [area_start, area_end).

    Maps physical [0, max(4 GiB, end of RAM)) three times through one shared PDPT:
    identity (VA == PA), the direct map at DIRECT_MAP_BASE, and the first GiB at KERNEL_MAP_BASE.
    The 3-4 GiB MMIO hole (LAPIC, IOAPIC) is mapped uncached. Accessed and dirty bits are preset,
    so the guest's first accesses never write to the tables (which would show up in dirty logs).
    """
    limit = max(MMIO_HOLE_END, _round_up(max(r.end for r in ram), GiB))
    gigabytes = limit // GiB
    pages_needed = 3 + gigabytes  # PML4, shared PDPT, kernel-map PDPT, one PD per GiB
    if area_start + pages_needed * PAGE_SIZE > area_end:
        raise GuestMemoryError(area_start, pages_needed * PAGE_SIZE, "boot page-table area too small for this RAM size")
    pml4 = area_start
    pdpt = pml4 + PAGE_SIZE
    kernel_pdpt = pdpt + PAGE_SIZE
    first_pd = kernel_pdpt + PAGE_SIZE
    table_flags = Pte.PRESENT | Pte.WRITABLE | Pte.ACCESSED
    for gigabyte in range(gigabytes):
        pd = first_pd + gigabyte * PAGE_SIZE
        write_u64(pdpt + 8 * gigabyte, pd | table_flags)
        for slot in range(ENTRIES_PER_TABLE):
            physical = gigabyte * GiB + slot * (2 << 20)
            flags = table_flags | Pte.HUGE | Pte.DIRTY
            if MMIO_HOLE_START <= physical < MMIO_HOLE_END:
                flags |= Pte.CACHE_DISABLE | Pte.WRITE_THROUGH
            write_u64(pd + 8 * slot, physical | flags)
    write_u64(pml4 + 8 * LEVELS_4[0].index(0), pdpt | table_flags)
    write_u64(pml4 + 8 * LEVELS_4[0].index(DIRECT_MAP_BASE), pdpt | table_flags)
    write_u64(pml4 + 8 * LEVELS_4[0].index(KERNEL_MAP_BASE), kernel_pdpt | table_flags)
    for gigabyte in range(KERNEL_MAP_SIZE // GiB):
        index = LEVELS_4[1].index(KERNEL_MAP_BASE) + gigabyte
        write_u64(kernel_pdpt + 8 * index, (first_pd + gigabyte * PAGE_SIZE) | table_flags)
    return BootPageTables(root=pml4, pages_used=pages_needed, identity_limit=limit)


def boot_alias_to_physical(virtual_address: int, identity_limit: int) -> int | None:
    """The physical address the boot tables map `virtual_address` to, or None if they do not map it."""
    if 0 <= virtual_address < identity_limit:
        return virtual_address
    if DIRECT_MAP_BASE <= virtual_address < DIRECT_MAP_BASE + identity_limit:
        return virtual_address - DIRECT_MAP_BASE
    if KERNEL_MAP_BASE <= virtual_address < KERNEL_MAP_BASE + KERNEL_MAP_SIZE:
        return virtual_address - KERNEL_MAP_BASE
    return None


def _round_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment
