"""Memslot splitting: lay a RAM region out as read-only slots over chosen page runs and writable slots between."""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Sequence

from pyrovisor.errors import ConfigError, GuestMemoryError
from pyrovisor.kvm.vm import MEM_READONLY
from pyrovisor.memory import MemoryRegion
from pyrovisor.memory.region import PAGE_SIZE
from pyrovisor.vstate.vm import Memslot, Vm

PageRun = tuple[int, int]  # [start, end) guest physical, page-aligned


class RegionPiece(MemoryRegion):
    """Part of a region's mapping. Closing it releases its own views on the mapping and leaves the mapping mapped."""

    def close(self) -> None:
        if self.pinned:
            raise GuestMemoryError(self.gpa, self.size, "this piece is still in use by a memslot")
        self.view.release()
        self._anchor = None


def sub_region(region: MemoryRegion, gpa: int, size: int) -> RegionPiece:
    """A region over [gpa, gpa+size) of `region`'s own mapping (no copy): what a piece's memslot pins."""
    if gpa < region.gpa or gpa + size > region.end:
        raise ConfigError("memory slot piece", (hex(gpa), size), f"lies outside {region!r}")
    mapping = region.view.obj
    assert isinstance(mapping, mmap.mmap)
    mapping_start = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    offset = region.host_address - mapping_start + (gpa - region.gpa)
    return RegionPiece(gpa, size, mapping, offset, region.backing)


def slots_of(vm: Vm, region: MemoryRegion) -> list[Memslot]:
    """The memslots that map (parts of) `region`, in address order."""
    return sorted((memslot for memslot in vm.memslots
                   if region.gpa <= memslot.region.gpa < region.end), key=lambda memslot: memslot.region.gpa)


def pieces(region: MemoryRegion, readonly_runs: Sequence[PageRun]) -> list[tuple[int, int, bool]]:
    """(gpa, size, readonly) pieces that tile `region`: the runs read-only, the gaps between them writable."""
    result: list[tuple[int, int, bool]] = []
    position = region.gpa
    for start, end in sorted(readonly_runs):
        if start % PAGE_SIZE or end % PAGE_SIZE or not region.gpa <= start < end <= region.end:
            raise ConfigError("read-only page run", (hex(start), hex(end)), f"must be page-aligned inside {region!r}")
        if start < position:
            raise ConfigError("read-only page run", (hex(start), hex(end)), "overlaps the previous run")
        if start > position:
            result.append((position, start - position, False))
        result.append((start, end - start, True))
        position = end
    if position < region.end:
        result.append((position, region.end - position, False))
    return result


def relayout(vm: Vm, region: MemoryRegion, readonly_runs: Sequence[PageRun]) -> None:
    """Replace the slots of `region` with pieces: read-only over `readonly_runs`, writable elsewhere (one slot for
    the whole region when there are no runs). The vCPUs must be parked (or not started).

    Deleting a slot drops KVM's shadow page-table entries for it, so the guest sees the new permissions at once;
    the memory itself is never copied. Dirty logging, if on, carries over to every piece: harvest before calling,
    since a deleted slot's dirty bits are gone.
    """
    old = slots_of(vm, region)
    base_flags = (old[0].flags if old else 0) & ~MEM_READONLY
    layout = pieces(region, readonly_runs)
    for memslot in old:
        vm.remove_memslot(memslot.slot)
        if isinstance(memslot.region, RegionPiece):
            memslot.region.close()  # its views on the mapping, so that the region can be unmapped later
    added: list[Memslot] = []
    try:
        for gpa, size, readonly in layout:
            piece = region if (gpa, size) == (region.gpa, region.size) else sub_region(region, gpa, size)
            added.append(vm.add_memslot(piece, base_flags | (MEM_READONLY if readonly else 0)))
    except BaseException:  # never leave a hole in the guest's RAM: back to one writable slot
        for memslot in added:
            vm.remove_memslot(memslot.slot)
            if isinstance(memslot.region, RegionPiece):
                memslot.region.close()
        vm.add_memslot(region, base_flags)
        raise
