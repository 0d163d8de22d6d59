"""Boot page tables and the table-driven walker."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyrovisor.arch.x86_64 import layout
from pyrovisor.arch.x86_64.paging import (
    LEVELS_5,
    Pte,
    TranslationFault,
    boot_alias_to_physical,
    build_boot_page_tables,
    walk,
)
from pyrovisor.memory import GuestMemory, MemoryRegion

GiB = 1 << 30


@pytest.fixture(scope="module")
def boot_tables():
    memory = GuestMemory([MemoryRegion.anonymous(0, 64 << 20)])
    tables = build_boot_page_tables(layout.ram_ranges(64 << 20), memory.write_u64,
                                    layout.PAGE_TABLES_GPA, layout.PAGE_TABLES_END)
    yield memory, tables
    memory.close()


@pytest.mark.parametrize("virtual, physical", [
    (0x100000, 0x100000),
    (0x12345678, 0x12345678),
    (layout.DIRECT_MAP_BASE + 0x3456789, 0x3456789),
    (layout.KERNEL_MAP_BASE + 0x100123, 0x100123),
    (layout.LAPIC_GPA + 0x20, layout.LAPIC_GPA + 0x20),
])
def test_aliases_translate(boot_tables, virtual: int, physical: int) -> None:
    memory, tables = boot_tables
    translation = walk(memory.read_u64, tables.root, virtual)
    assert translation.physical_address == physical
    assert translation.page_size == 2 << 20
    assert translation.writable and not translation.user and translation.executable
    assert [name for name, _, _ in translation.entries] == ["PML4", "PDPT", "PD"]
    assert boot_alias_to_physical(virtual, tables.identity_limit) == physical


def test_hole_is_uncached_and_ram_is_not(boot_tables) -> None:
    memory, tables = boot_tables
    _, _, hole_entry = walk(memory.read_u64, tables.root, layout.IOAPIC_GPA).entries[-1]
    _, _, ram_entry = walk(memory.read_u64, tables.root, 0x200000).entries[-1]
    assert hole_entry & Pte.CACHE_DISABLE and not ram_entry & Pte.CACHE_DISABLE
    assert ram_entry & Pte.ACCESSED and ram_entry & Pte.DIRTY


@pytest.mark.parametrize("virtual", [4 * GiB + 0x1000, 0x0000_7000_0000_0000, layout.KERNEL_MAP_BASE + GiB,
                                     0x0000_8000_0000_0000])
def test_unmapped_or_non_canonical_addresses_fault(boot_tables, virtual: int) -> None:
    memory, tables = boot_tables
    with pytest.raises(TranslationFault):
        walk(memory.read_u64, tables.root, virtual)
    assert boot_alias_to_physical(virtual, tables.identity_limit) is None


def test_large_ram_gets_tables_above_four_gib() -> None:
    writes: dict[int, int] = {}
    ranges = layout.ram_ranges(5 * GiB)
    tables = build_boot_page_tables(ranges, writes.__setitem__, layout.PAGE_TABLES_GPA, layout.PAGE_TABLES_END)
    assert ranges[1].gpa == 4 * GiB and ranges[1].end == 6 * GiB
    assert tables.identity_limit == 6 * GiB
    translation = walk(lambda address: writes.get(address, 0), tables.root, 6 * GiB - 8)
    assert translation.physical_address == 6 * GiB - 8


def test_five_level_walk_with_four_kib_pages() -> None:
    """A hand-built 5-level chain down to a 4 KiB page, with the user and NX bits combined along the path."""
    entries = {}
    tables = [0x1000, 0x2000, 0x3000, 0x4000, 0x5000]
    virtual = (3 << 48) | (5 << 39) | (7 << 30) | (9 << 21) | (11 << 12) | 0x123
    indices = [3, 5, 7, 9, 11]
    for level, (table, index) in enumerate(zip(tables, indices, strict=False)):
        target = tables[level + 1] if level < 4 else 0xABCDE000
        flags = Pte.PRESENT | Pte.WRITABLE | Pte.USER
        if level == 4:
            flags |= Pte.NO_EXECUTE
        entries[table + 8 * index] = target | flags
    translation = walk(lambda address: entries.get(address, 0), tables[0], virtual, LEVELS_5)
    assert translation.physical_address == 0xABCDE123
    assert translation.page_size == 4096 and translation.user and not translation.executable


@given(st.integers(0, (64 << 20) - 1))
def test_identity_map_is_exact_for_all_ram(boot_tables, address: int) -> None:
    memory, tables = boot_tables
    assert walk(memory.read_u64, tables.root, address).physical_address == address


def test_mappings_lists_every_present_leaf_in_address_order() -> None:
    from pyrovisor.arch.x86_64.paging import mappings

    entries = {
        0x1000: 0x2000 | 0x7,  # PML4[0] -> PDPT, user, writable
        0x2000: 0x3000 | 0x7,  # PDPT[0] -> PD
        0x3000 + 8 * 1: 0x400000 | 0x87,  # PD[1]: a 2 MiB page at VA 2 MiB
        0x3000 + 8 * 2: 0x4000 | 0x7,  # PD[2] -> PT
        0x4000 + 8 * 5: 0x9000 | 0x5,  # PT[5]: a read-only 4 KiB page at VA 4 MiB + 20 KiB
        0x4000 + 8 * 6: 0xA000 | 0x2,  # not present
        0x1000 + 8 * 256: 0x5000 | 0x3,  # PML4[256] -> a supervisor table
        0x5000: 0x40000000 | 0x83,  # a 1 GiB supervisor page at the start of the upper half
    }
    found = list(mappings(lambda address: entries.get(address, 0), 0x1000))
    assert [(m.virtual_address, m.physical_address, m.size, m.writable, m.user) for m in found] == [
        (0x200000, 0x400000, 0x200000, True, True),
        (0x405000, 0x9000, 0x1000, False, True),
    ]  # the upper half is beyond the default end (the lower half's 1 << 47)
    upper = list(mappings(lambda address: entries.get(address, 0), 0x1000, start=1 << 47, end=1 << 48))
    assert [(m.virtual_address, m.size, m.user) for m in upper] == [(0xFFFF800000000000, 1 << 30, False)]
    window = list(mappings(lambda address: entries.get(address, 0), 0x1000, start=0x400000, end=0x406000))
    assert [m.virtual_address for m in window] == [0x405000]
