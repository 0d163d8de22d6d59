"""PageSet, the zero-page scan and the host write log: against plain sets and byte-by-byte reference answers."""

from __future__ import annotations

import mmap
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyrovisor.memory import MemoryRegion, PageSet
from pyrovisor.memory.write_log import HostWriteLog
from pyrovisor.memory.zero_pages import BLOCK_PAGES, content_runs, used_pages

PAGE = 4096
pages = st.lists(st.one_of(st.integers(0, 300), st.integers(0, 1 << 21)), max_size=60)


def reference_runs(numbers: set[int], limit: int | None = None) -> list[tuple[int, int]]:
    runs: list[list[int]] = []
    for page in sorted(numbers):
        if runs and runs[-1][0] + runs[-1][1] == page and (limit is None or runs[-1][1] < limit):
            runs[-1][1] += 1
        else:
            runs.append([page, 1])
    return [(first, count) for first, count in runs]


@given(pages, pages, st.sampled_from([None, 1, 3, 256]))
def test_page_sets_behave_like_sets_of_ints(first: list[int], second: list[int], limit: int | None) -> None:
    a, b = PageSet.of(first), PageSet.of(second)
    assert list(a) == a.pages() == sorted(set(first)) and len(a) == len(set(first))
    assert set(a | b) == set(first) | set(second)
    assert set(a & b) == set(first) & set(second)
    assert set(a - b) == set(first) - set(second)
    assert a.runs(limit) == reference_runs(set(first), limit)
    assert PageSet.of(reversed(first)) == a and PageSet.of(a) is a and bool(a) == bool(first)
    assert all(page in a for page in first) and -1 not in a and (max(first, default=0) + 1) not in a


@given(st.binary(max_size=64), st.sampled_from([0, 1, 13, 1 << 20]))
def test_a_kvm_dirty_bitmap_names_bit_n_as_page_first_plus_n(bitmap: bytes, first: int) -> None:
    expected = [first + 8 * index + bit for index, byte in enumerate(bitmap) for bit in range(8) if byte >> bit & 1]
    assert PageSet.from_bitmap(bitmap, first).pages() == expected


def test_spans_and_refusals() -> None:
    assert PageSet.span(5, 9).runs() == [(5, 4)] and not PageSet.span(9, 5)
    assert PageSet.of(range(3, 700)) == PageSet.span(3, 700)
    assert PageSet.span(0, 1000).runs(256) == [(0, 256), (256, 256), (512, 256), (768, 232)]
    for bad in (lambda: PageSet.of([3, -1]), lambda: PageSet(-1), lambda: PageSet.span(-2, 3)):
        with pytest.raises(ValueError):
            bad()
    assert repr(PageSet.of([1, 2, 3, 9])) == "PageSet(4 pages: 1-3, 9)"


@given(st.lists(st.tuples(st.integers(0, 2 * BLOCK_PAGES + 9), st.sampled_from([0, 1, 2047, 4095])), max_size=40),
       st.integers(1, 2 * BLOCK_PAGES + 10))
def test_zero_pages_are_found_page_by_page(writes: list[tuple[int, int]], count: int) -> None:
    with mmap.mmap(-1, count * PAGE) as memory:
        for page, offset in writes:
            if page < count:
                memory[page * PAGE + offset] = 0x5A
        view = memoryview(memory)
        try:
            expected = bytes(any(memory[page * PAGE:(page + 1) * PAGE]) for page in range(count))
            assert bytes(used_pages(view)) == expected
            runs = content_runs(view)
            assert b"".join(bytes([data]) * length for _, length, data in runs) == expected
            starts = [sum(length for _, length, _ in runs[:index]) for index in range(len(runs))]
            assert [first for first, _, _ in runs] == starts
            assert all(runs[i][2] != runs[i + 1][2] for i in range(len(runs) - 1))
        finally:
            view.release()


def test_host_write_log_marks_every_page_a_write_touches() -> None:
    regions = [MemoryRegion.anonymous(0, 1 << 20, huge_pages=False),
               MemoryRegion.anonymous(4 << 20, 1 << 20, huge_pages=False)]
    log = HostWriteLog(regions)
    try:
        log.record(0, 1)
        assert log.take() == PageSet(), "nothing is recorded before start"
        log.start()
        for gpa, size in ((PAGE - 1, 2), (7 * PAGE, 9 * PAGE), (20 * PAGE + 5, 0), (255 * PAGE, PAGE),
                          (4 << 20, 8 * PAGE + 1), ((5 << 20) - 1, 1)):
            log.record(gpa, size)
        expected = {0, 1, *range(7, 16), 255, *range(1024, 1033), 1279}
        assert set(log.take()) == expected
        assert log.take() == PageSet(), "taking clears"
        writers = [threading.Thread(target=lambda first=first: [log.record(page * PAGE, PAGE)
                                                                 for page in range(first, 256, 4)])
                   for first in range(4)]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join()
        assert set(log.take()) == set(range(256))
        log.stop()
    finally:
        for region in regions:
            region.close()
