"""GuestMemory: bounds checks, typed access, regions, tracking, discard and pinning."""

from __future__ import annotations

import ctypes

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyrovisor.errors import ConfigError, GuestMemoryError
from pyrovisor.memory import GuestMemory, MemoryRegion

MiB = 1 << 20


@pytest.fixture
def split_memory() -> GuestMemory:
    """Two regions with a hole between them: [0, 2 MiB) and [4 MiB, 6 MiB)."""
    memory = GuestMemory([MemoryRegion.anonymous(0, 2 * MiB), MemoryRegion.anonymous(4 * MiB, 2 * MiB)])
    yield memory
    memory.close()


def test_typed_round_trip_little_endian(split_memory: GuestMemory) -> None:
    split_memory.write_u64(0x1000, 0x1122334455667788)
    assert split_memory.read(0x1000, 8) == bytes.fromhex("8877665544332211")
    assert split_memory.read_u32(0x1004) == 0x11223344
    split_memory.write_u16(4 * MiB, 0xBEEF)
    assert split_memory.read_u8(4 * MiB) == 0xEF


def test_access_into_hole_reports_the_address(split_memory: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError) as info:
        split_memory.read(3 * MiB, 4)
    assert info.value.gpa == 3 * MiB
    with pytest.raises(GuestMemoryError) as info:
        split_memory.write(2 * MiB - 2, b"abcd")  # runs off the end of the first region
    assert "2 MiB" in str(info.value) or info.value.gpa == 2 * MiB - 2
    assert split_memory.read(2 * MiB - 2, 2) == b"\0\0", "a refused write changes nothing"


def test_typed_access_cannot_straddle_a_region_end(split_memory: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError):
        split_memory.read_u64(6 * MiB - 4)
    with pytest.raises(GuestMemoryError):
        split_memory.write_u32(-4, 1)


def test_value_too_large_is_refused(split_memory: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError):
        split_memory.write_u8(0, 256)


def test_adjacent_regions_behave_as_one_range() -> None:
    memory = GuestMemory([MemoryRegion.anonymous(0, MiB), MemoryRegion.anonymous(MiB, MiB)])
    try:
        memory.write(MiB - 3, b"spanning")
        assert memory.read(MiB - 3, 8) == b"spanning"
        buffer = bytearray(8)
        memory.read_into(MiB - 3, buffer)
        assert bytes(buffer) == b"spanning"
    finally:
        memory.close()


def test_overlapping_regions_are_rejected() -> None:
    first, second = MemoryRegion.anonymous(0, 2 * MiB), MemoryRegion.anonymous(MiB, MiB)
    with pytest.raises(ConfigError):
        GuestMemory([first, second])
    first.close()
    second.close()


def test_read_obj_and_write_obj() -> None:
    class Pair(ctypes.Structure):
        _fields_ = (("a", ctypes.c_uint32), ("b", ctypes.c_uint64))

    memory = GuestMemory([MemoryRegion.anonymous(0, MiB)])
    memory.write_obj(0x100, Pair(7, 1 << 40))
    copy = memory.read_obj(0x100, Pair)
    assert (copy.a, copy.b) == (7, 1 << 40)
    memory.close()


def test_tracking_records_pages_written_by_the_host(split_memory: GuestMemory) -> None:
    split_memory.start_tracking()
    split_memory.write(0x1FFE, b"abcd")  # pages 1 and 2
    split_memory.write_u64(4 * MiB, 1)  # page 1024
    split_memory.fill(0x5000, 0x2000)  # pages 5 and 6
    assert split_memory.take_tracked_pages().pages() == [1, 2, 5, 6, 1024]
    assert split_memory.take_tracked_pages().pages() == []
    split_memory.stop_tracking()
    with pytest.raises(GuestMemoryError):
        split_memory.take_tracked_pages()


def test_discard_returns_zero_pages(split_memory: GuestMemory) -> None:
    split_memory.write(0x3000, b"\xff" * 0x1000)
    split_memory.discard(0x3000, 0x1000)
    assert split_memory.read(0x3000, 0x1000) == bytes(0x1000)
    with pytest.raises(GuestMemoryError):
        split_memory.discard(0x3001, 0x1000)


def test_memfd_discard_punches_a_hole() -> None:
    memory = GuestMemory([MemoryRegion.memfd(0, MiB)])
    memory.write(0, b"\x01" * 4096)
    memory.discard(0, 4096)
    assert memory.read(0, 4096) == bytes(4096)
    memory.close()


def test_pinned_region_cannot_be_unmapped() -> None:
    region = MemoryRegion.anonymous(0, MiB)
    region.pin()
    with pytest.raises(GuestMemoryError, match="in use"):
        region.close()
    region.unpin()
    region.close()
    assert region.closed
    with pytest.raises(GuestMemoryError):
        region.pin()


def test_file_private_region_is_copy_on_write(tmp_path) -> None:
    path = tmp_path / "image"
    path.write_bytes(b"A" * 8192)
    memory = GuestMemory([MemoryRegion.file_private(0, 8192, path)])
    assert memory.read(0, 4) == b"AAAA"
    memory.write(0, b"BBBB")
    assert memory.read(0, 4) == b"BBBB"
    memory.close()
    assert path.read_bytes()[:4] == b"AAAA", "guest writes never reach the file"


def test_misaligned_region_is_refused() -> None:
    with pytest.raises(ConfigError):
        MemoryRegion.anonymous(0, 1000)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3 * MiB - 1), st.binary(min_size=1, max_size=64)), max_size=30))
def test_behaves_like_a_bytearray_with_a_hole(writes: list[tuple[int, bytes]]) -> None:
    """Model check: writes that fit land exactly as in a flat model; writes touching the hole change nothing."""
    memory = GuestMemory([MemoryRegion.anonymous(0, MiB), MemoryRegion.anonymous(2 * MiB, MiB)])
    model = bytearray(3 * MiB)
    try:
        for address, data in writes:
            end = address + len(data)
            fits = end <= MiB or (address >= 2 * MiB and end <= 3 * MiB)
            if fits:
                memory.write(address, data)
                model[address:end] = data
            else:
                with pytest.raises(GuestMemoryError):
                    memory.write(address, data)
        for address, data in writes:
            end = address + len(data)
            if end <= MiB or (address >= 2 * MiB and end <= 3 * MiB):
                assert memory.read(address, len(data)) == bytes(model[address:end])
    finally:
        memory.close()
