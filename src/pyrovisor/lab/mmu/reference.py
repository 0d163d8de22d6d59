"""The straightforward walker: one access at a time, every page-table entry read from simulated memory.

On a TLB miss the walk first asks the paging-structure caches, deepest level first, for the table
that the longest cached prefix of the address leads to; the walk starts there (or at the root) and
reads one entry per level down to the leaf, filling the caches it missed. In a nested walk the guest's
tables are guest-physical: before reading a guest table the walker translates its address through the
nested TLB or, on a miss, an EPT walk with its own caches, and it translates the data's guest-physical
address the same way at the end. A cached guest table pointer is host-physical (a "combined" entry),
so a hit skips the nested translation of that table too. This is the model's definition; the batch
walker must reproduce its counts exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

from pyrovisor.arch.x86_64.paging import TranslationFault
from pyrovisor.lab.mmu.caches import LruCache
from pyrovisor.lab.mmu.config import MmuConfig
from pyrovisor.lab.mmu.counts import DATA_ACCESS, GUEST_REFERENCE, NESTED_REFERENCE, WalkCounts
from pyrovisor.lab.mmu.memory import PhysicalMemory
from pyrovisor.lab.mmu.tables import EPT_FORMAT, GUEST_FORMAT, EntryFormat, Machine
from pyrovisor.lab.mmu.x86 import ADDRESS_MASK, ENTRIES_PER_TABLE, LARGE_BIT, PagingSide

INDEX_MASK = ENTRIES_PER_TABLE - 1


class ReferenceWalker:
    """An MMU walking `machine`'s tables with the caches `config` describes."""

    def __init__(self, machine: Machine, config: MmuConfig, record: bool = False) -> None:
        self.machine = machine
        self.config = config
        self.memory: PhysicalMemory = machine.host_memory if config.nested else machine.native_memory
        self.tlb = LruCache(config.tlb)
        self.pwc = [LruCache(config.pwc) for _ in range(machine.guest.leaf)]
        self.nested_tlb = LruCache(config.nested_tlb)
        self.nested_pwc = [LruCache(config.nested_pwc) for _ in range(machine.host.leaf)]
        self._tlb_shift = config.tlb_page_shift
        self._virtual_mask = machine.virtual_mask
        self.accesses = self.walks = self.guest_references = self.nested_references = 0
        self.nested_lookups = self.nested_walks = 0
        self.histogram: list[int] = []
        # With record=True: every reference in order, as (kind, physical address); kinds as in `counts`.
        self.recorded: list[tuple[int, int]] | None = [] if record else None

    def access(self, virtual: int) -> int:
        """Translate one virtual address to a (host-)physical one, counting what it costs."""
        virtual &= self._virtual_mask
        self.accesses += 1
        key = virtual >> self._tlb_shift
        offset = virtual & ((1 << self._tlb_shift) - 1)
        frame = self.tlb.lookup(key)
        if frame is not None:
            self._record(DATA_ACCESS, frame | offset)
            return frame | offset
        self.walks += 1
        before = self.guest_references + self.nested_references
        physical = self._walk(virtual)
        self.tlb.fill(key, physical - offset)
        made = self.guest_references + self.nested_references - before
        if made >= len(self.histogram):
            self.histogram.extend([0] * (made + 1 - len(self.histogram)))
        self.histogram[made] += 1
        self._record(DATA_ACCESS, physical)
        return physical

    def run(self, trace: Iterable[int]) -> WalkCounts:
        for virtual in trace:
            self.access(virtual)
        return self.counts()

    def counts(self) -> WalkCounts:
        return WalkCounts(
            accesses=self.accesses, walks=self.walks, guest_references=self.guest_references,
            nested_references=self.nested_references, nested_lookups=self.nested_lookups,
            nested_walks=self.nested_walks, pwc_hits=tuple(c.hits for c in self.pwc),
            nested_pwc_hits=tuple(c.hits for c in self.nested_pwc) if self.config.nested else (),
            references_histogram=tuple(self.histogram),
        )

    def _walk(self, virtual: int) -> int:
        guest = self.machine.guest
        start, table = _cached_start(self.pwc, guest, virtual)
        if table is None:
            table = self._to_host(self.machine.cr3)
        for depth in range(start, guest.leaf + 1):
            entry = self._read(table, virtual, guest, depth, GUEST_FORMAT)
            self.guest_references += 1
            if depth < guest.leaf:
                table = self._to_host(entry & ADDRESS_MASK)
                self.pwc[depth].fill(virtual >> guest.table_levels[depth].shift, table)
        page = guest.page_size - 1
        return self._to_host((entry & ADDRESS_MASK & ~page) | (virtual & page))

    def _to_host(self, guest_physical: int) -> int:
        """Guest-physical -> host-physical (identity on bare metal), through the nested TLB or an EPT walk."""
        if not self.config.nested:
            return guest_physical
        host = self.machine.host
        self.nested_lookups += 1
        key = guest_physical >> host.page_shift
        offset = guest_physical & (host.page_size - 1)
        frame = self.nested_tlb.lookup(key)
        if frame is not None:
            return frame | offset
        self.nested_walks += 1
        start, table = _cached_start(self.nested_pwc, host, guest_physical)
        if table is None:
            table = self.machine.eptp
        for depth in range(start, host.leaf + 1):
            entry = self._read(table, guest_physical, host, depth, EPT_FORMAT)
            self.nested_references += 1
            if depth < host.leaf:
                table = entry & ADDRESS_MASK
                self.nested_pwc[depth].fill(guest_physical >> host.table_levels[depth].shift, table)
        frame = entry & ADDRESS_MASK & ~(host.page_size - 1)
        self.nested_tlb.fill(key, frame)
        return frame | offset

    def _read(self, table: int, address: int, side: PagingSide, depth: int, entry_format: EntryFormat) -> int:
        level = side.table_levels[depth]
        entry_address = table + 8 * ((address >> level.shift) & INDEX_MASK)
        entry = self.memory.read(entry_address)
        self._record(NESTED_REFERENCE if entry_format is EPT_FORMAT else GUEST_REFERENCE, entry_address)
        maps_page = depth == side.leaf and depth < len(side.table_levels) - 1
        if not entry & entry_format.present_bits or bool(entry & LARGE_BIT) != maps_page:
            raise TranslationFault(address, f"{entry_format.name} {level.name}", entry_address)
        return entry


    def _record(self, kind: int, address: int) -> None:
        if self.recorded is not None:
            self.recorded.append((kind, address))


def _cached_start(caches: list[LruCache], side: PagingSide, address: int) -> tuple[int, int | None]:
    """Probe the paging-structure caches deepest level first: (level to start reading at, its table or None)."""
    for depth in range(side.leaf - 1, -1, -1):
        table = caches[depth].lookup(address >> side.table_levels[depth].shift)
        if table is not None:
            return depth + 1, table
    return 0, None
