"""The page-discard port: requests read from guest memory, ranges released, malformed input ignored."""

from __future__ import annotations

import struct

from pyrovisor.devices.page_discard import MAX_RANGES, SIGNATURE, PageDiscard, PageDiscardState
from pyrovisor.memory import GuestMemory, MemoryRegion

PAGE = 4096


def make_memory() -> GuestMemory:
    return GuestMemory([MemoryRegion.anonymous(0, 64 * PAGE, huge_pages=False)])


def request(ranges: list[tuple[int, int]], count: int | None = None) -> bytes:
    header = struct.pack("<II", len(ranges) if count is None else count, 0)
    return header + b"".join(struct.pack("<QQ", gpa, pages) for gpa, pages in ranges)


def zeroing_device(memory: GuestMemory) -> PageDiscard:
    return PageDiscard(memory.read, lambda gpa, size: memory.fill(gpa, size, 0))


def test_a_request_zeroes_every_range_and_nothing_else() -> None:
    memory = make_memory()
    try:
        memory.fill(0, 64 * PAGE, 0xAB)
        memory.write(0, request([(8 * PAGE, 2), (20 * PAGE, 1)]))
        device = zeroing_device(memory)
        device.write(0, 4, 0)
        assert memory.read(8 * PAGE, 2 * PAGE) == bytes(2 * PAGE)
        assert memory.read(20 * PAGE, PAGE) == bytes(PAGE)
        assert memory.read(10 * PAGE, 10 * PAGE) == b"\xab" * (10 * PAGE)
        assert memory.read(21 * PAGE, 8) == b"\xab" * 8
        assert device.save() == PageDiscardState(requests=1, pages=3, rejected=0)
    finally:
        memory.close()


def test_the_signature_identifies_the_device() -> None:
    device = PageDiscard(lambda gpa, size: bytes(size), lambda gpa, size: None)
    assert device.read(0, 4) == SIGNATURE
    assert device.read(0, 1) == 0xFF
    assert device.read(4, 4) == 0xFFFFFFFF


def test_malformed_requests_are_counted_not_raised() -> None:
    memory = make_memory()
    released: list[tuple[int, int]] = []
    try:
        device = PageDiscard(memory.read, lambda gpa, size: released.append((gpa, size)))
        memory.write(0, request([(PAGE + 1, 1), (2 * PAGE, 0), (3 * PAGE, 1)]))
        device.write(0, 4, 0)  # one good range among two bad ones
        assert released == [(3 * PAGE, PAGE)]
        memory.write(PAGE, request([], count=MAX_RANGES + 1))
        device.write(0, 4, PAGE)  # too many ranges: the whole request is refused
        device.write(0, 4, 1 << 40)  # the request itself lies outside RAM
        device.write(4, 4, 0)  # wrong offset
        device.write(0, 1, 0)  # wrong size
        assert released == [(3 * PAGE, PAGE)]
        assert device.save() == PageDiscardState(requests=3, pages=1, rejected=6)
    finally:
        memory.close()


def test_ranges_outside_ram_are_rejected_by_the_release_callable() -> None:
    memory = make_memory()
    try:
        device = zeroing_device(memory)
        memory.write(0, request([(60 * PAGE, 8), (PAGE, 1)]))  # the first runs past the end of RAM
        device.write(0, 4, 0)
        assert device.save() == PageDiscardState(requests=1, pages=1, rejected=1)
    finally:
        memory.close()


def test_state_round_trips() -> None:
    state = PageDiscardState(requests=3, pages=700, rejected=2)
    device = PageDiscard(lambda gpa, size: bytes(size), lambda gpa, size: None, state)
    assert device.save() == state
