"""Page tables for a set of pages: the guest's x86-64 tables and the host's EPT, built in memory.

The guest maps every page it is given (at its page size: the pages a trace touches, or every page of
a footprint the program has allocated) to a guest-physical frame chosen at random, as a guest whose
physical memory has been in use for a while; its tables are allocated from a contiguous
guest-physical area, root first. The host's EPT maps every guest-physical page that holds a guest
table or mapped data (at the host's page size) to a random host-physical frame, and its own
tables come from a host-physical area. The guest's tables then live, word for word, in the host frames
the EPT maps them to, which is where a nested walk reads them. The same guest tables at their
guest-physical addresses serve as a bare-metal machine for the native comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pyrovisor.arch.x86_64.paging import TranslationFault
from pyrovisor.lab.mmu.memory import PhysicalMemory, distinct
from pyrovisor.lab.mmu.x86 import (
    ADDRESS_MASK,
    ENTRIES_PER_TABLE,
    ENTRY_BYTES,
    EPT_LEAF_BITS,
    EPT_TABLE_BITS,
    FRAME_SHIFT,
    GUEST_LEAF_BITS,
    GUEST_TABLE_BITS,
    LARGE_BIT,
    PRESENT_BITS,
    PagingSide,
)

GiB = 1 << 30
GUEST_TABLE_AREA = 0x10_0000  # guest-physical: the guest's page tables start at 1 MiB
HOST_TABLE_AREA = 0x10_0000  # host-physical: the EPT starts at 1 MiB
DATA_AREA_ALIGNMENT = 4 * GiB
INDEX_MASK = ENTRIES_PER_TABLE - 1

FOUR_LEVELS = PagingSide()
RowsOf = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class EntryFormat:
    name: str
    table_bits: int
    leaf_bits: int
    present_bits: int


GUEST_FORMAT = EntryFormat("guest", int(GUEST_TABLE_BITS), int(GUEST_LEAF_BITS), PRESENT_BITS["guest"])
EPT_FORMAT = EntryFormat("EPT", int(EPT_TABLE_BITS), int(EPT_LEAF_BITS), PRESENT_BITS["ept"])


def table_count(side: PagingSide, pages: np.ndarray) -> int:
    """Tables needed to map `pages` (page numbers at the side's page size): the root plus one per prefix."""
    addresses = pages << side.page_shift
    return 1 + sum(len(distinct(addresses >> (level.shift + 9))) for level in side.table_levels[1: side.leaf + 1])


def build_radix(memory: PhysicalMemory, side: PagingSide, entry_format: EntryFormat, pages: np.ndarray,
                targets: np.ndarray, first_frame: int) -> np.ndarray:
    """Write tables mapping page numbers `pages` to page-aligned addresses `targets`; return the table frames.

    Frames are allocated from `first_frame` upwards: the root, then every table of the next level in
    address order, and so on. The root is the first frame returned.
    """
    levels = side.table_levels
    addresses = np.asarray(pages, dtype=np.int64) << side.page_shift
    level_tables: list[np.ndarray] = [np.zeros(len(addresses), dtype=np.int64) + first_frame]
    next_frame = first_frame + 1
    frames = [np.array([first_frame], dtype=np.int64)]
    for level in levels[1: side.leaf + 1]:
        prefixes = distinct(addresses >> (level.shift + 9))
        level_tables.append(next_frame + np.searchsorted(prefixes, addresses >> (level.shift + 9)).astype(np.int64))
        frames.append(np.arange(next_frame, next_frame + len(prefixes), dtype=np.int64))
        next_frame += len(prefixes)
    all_frames = np.concatenate(frames)
    memory.back(all_frames)
    large = LARGE_BIT if side.leaf < len(levels) - 1 else 0
    for depth, level in enumerate(levels[: side.leaf + 1]):
        entry_addresses = (level_tables[depth] << FRAME_SHIFT) + ENTRY_BYTES * ((addresses >> level.shift) & INDEX_MASK)
        if depth < side.leaf:
            values = (level_tables[depth + 1] << FRAME_SHIFT) | entry_format.table_bits
        else:
            values = np.asarray(targets, dtype=np.int64) | entry_format.leaf_bits | large
        memory.write_many(entry_addresses, values)
    return all_frames


def walk_many(rows_of: RowsOf, words: np.ndarray, root: int, addresses: np.ndarray, side: PagingSide,
              entry_format: EntryFormat) -> tuple[np.ndarray, np.ndarray]:
    """Translate many addresses at once, reading the real entries; no caches, nothing counted.

    Returns the address of the table read at each level (shape: addresses x walked levels) and the
    translated addresses. Raises TranslationFault at the first entry that is not present or maps a
    page where the side's page size says it should not.
    """
    levels = side.table_levels
    addresses = np.asarray(addresses, dtype=np.int64)
    tables = np.empty((len(addresses), side.walked_levels), dtype=np.int64)
    table = np.full(len(addresses), root, dtype=np.int64)
    expect_large = side.leaf < len(levels) - 1
    for depth, level in enumerate(levels[: side.leaf + 1]):
        tables[:, depth] = table
        rows = rows_of(table >> FRAME_SHIFT)
        entries = words[rows, (addresses >> level.shift) & INDEX_MASK].astype(np.int64)
        bad = (entries & entry_format.present_bits) == 0
        large = (entries & LARGE_BIT) != 0
        bad |= large != (expect_large and depth == side.leaf)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            entry_address = int(table[first]) + ENTRY_BYTES * ((int(addresses[first]) >> level.shift) & INDEX_MASK)
            raise TranslationFault(int(addresses[first]), f"{entry_format.name} {level.name}", entry_address)
        table = entries & ADDRESS_MASK
    offset = side.page_size - 1
    return tables, (table & ~offset) | (addresses & offset)


@dataclass(frozen=True)
class TableView:
    """Where a contiguous run of table frames sits in some memory: frame number -> row, in O(1)."""

    first_frame: int
    rows: np.ndarray

    def rows_of(self, frames: np.ndarray) -> np.ndarray:
        index = frames - self.first_frame
        if len(index) and (index.min() < 0 or index.max() >= len(self.rows)):
            raise TranslationFault(0, "table view", int(frames[(index < 0) | (index >= len(self.rows))][0]) << 12)
        rows: np.ndarray = self.rows[index]
        return rows


@dataclass(frozen=True)
class Machine:
    """A guest on a host: the guest's tables and the host's EPT, built for the pages of one trace."""

    guest: PagingSide
    host: PagingSide
    cr3: int  # guest-physical address of the guest's root table
    eptp: int  # host-physical address of the EPT's root table
    native_memory: PhysicalMemory  # the guest's tables at their guest-physical addresses (bare metal)
    host_memory: PhysicalMemory  # the EPT, and the guest's tables in the frames the EPT maps them to
    native_view: TableView  # guest tables in native_memory
    nested_view: TableView  # guest tables in host_memory
    guest_tables: int
    nested_tables: int

    @property
    def virtual_mask(self) -> int:
        return (1 << self.guest.address_bits) - 1

    def guest_walk(self, virtual: np.ndarray, nested: bool) -> tuple[np.ndarray, np.ndarray]:
        """Guest-physical addresses of the guest tables read for each address, and the data's guest-physical address."""
        view = self.nested_view if nested else self.native_view
        words = self.host_memory.words if nested else self.native_memory.words
        return walk_many(view.rows_of, words, self.cr3, virtual & self.virtual_mask, self.guest, GUEST_FORMAT)

    def host_walk(self, guest_physical: np.ndarray) -> np.ndarray:
        """Host-physical addresses for guest-physical ones, through the EPT."""
        _, host_physical = walk_many(self.host_memory.rows_of, self.host_memory.words, self.eptp, guest_physical,
                                     self.host, EPT_FORMAT)
        return host_physical

    def translate(self, virtual: np.ndarray) -> np.ndarray:
        """Virtual -> host-physical, the functional answer both walkers must reproduce."""
        _, guest_physical = self.guest_walk(virtual, nested=True)
        return self.host_walk(guest_physical)


def build_machine(virtual: np.ndarray, guest: PagingSide = FOUR_LEVELS, host: PagingSide = FOUR_LEVELS,
                  seed: int = 0) -> Machine:
    """Map every page `virtual` touches in a guest, and the guest's memory in a host's EPT (to map a whole
    footprint, include one address per page of it: `traces.footprint_pages`)."""
    rng = np.random.default_rng(seed)
    virtual = np.asarray(virtual, dtype=np.int64) & ((1 << guest.address_bits) - 1)
    pages = distinct(virtual >> guest.page_shift)

    guest_tables = table_count(guest, pages)
    table_end = GUEST_TABLE_AREA + guest_tables * (1 << FRAME_SHIFT)
    data_base = _align_up(table_end, max(DATA_AREA_ALIGNMENT, guest.page_size))
    slots = rng.choice(2 * len(pages), size=len(pages), replace=False).astype(np.int64)
    data_pages = data_base + slots * guest.page_size
    native_memory = PhysicalMemory("guest-physical")
    table_frames = build_radix(native_memory, guest, GUEST_FORMAT, pages, data_pages, GUEST_TABLE_AREA >> FRAME_SHIFT)
    cr3 = int(table_frames[0]) << FRAME_SHIFT
    native_view = TableView(int(table_frames[0]), native_memory.rows_of(table_frames))

    _, data_guest_physical = walk_many(native_view.rows_of, native_memory.words, cr3, virtual, guest, GUEST_FORMAT)
    host_pages = distinct(np.concatenate([data_guest_physical >> host.page_shift,
                                           (table_frames << FRAME_SHIFT) >> host.page_shift]))
    host_slots = rng.choice(2 * len(host_pages), size=len(host_pages), replace=False).astype(np.int64)
    host_base = _align_up(HOST_TABLE_AREA + table_count(host, host_pages) * (1 << FRAME_SHIFT),
                          max(DATA_AREA_ALIGNMENT, host.page_size))
    host_memory = PhysicalMemory("host-physical")
    ept_frames = build_radix(host_memory, host, EPT_FORMAT, host_pages, host_base + host_slots * host.page_size,
                             HOST_TABLE_AREA >> FRAME_SHIFT)
    eptp = int(ept_frames[0]) << FRAME_SHIFT

    machine_without_view = Machine(guest, host, cr3, eptp, native_memory, host_memory, native_view, native_view,
                                   guest_tables, len(ept_frames))
    table_host_frames = machine_without_view.host_walk(table_frames << FRAME_SHIFT) >> FRAME_SHIFT
    host_memory.copy_frames(native_memory, table_frames, table_host_frames)
    nested_view = TableView(int(table_frames[0]), host_memory.rows_of(table_host_frames))
    return Machine(guest, host, cr3, eptp, native_memory, host_memory, native_view, nested_view,
                   guest_tables, len(ept_frames))


def _align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment
