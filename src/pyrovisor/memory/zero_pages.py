"""Which pages of guest memory hold only zero bytes: memcmp against zeros, a block of pages at a time."""

from __future__ import annotations

from pyrovisor.memory.region import PAGE_SIZE

BLOCK_PAGES = 64
_BLOCK = BLOCK_PAGES * PAGE_SIZE
# `bytearray == buffer` is one memcmp; `bytes == memoryview` and `memoryview == ...` compare item by item through
# the struct machinery (about ten times slower on a page of zeros). So the zeros are bytearrays, on the left.
_ZERO_PAGE = bytearray(PAGE_SIZE)
_ZERO_BLOCK = bytearray(_BLOCK)
_BLOCK_UNUSED = bytes(BLOCK_PAGES)


def used_pages(view: memoryview) -> bytearray:
    """One byte per page of `view` (bytes, a whole number of pages): 1 where the page holds a non-zero byte,
    0 where it is all zeros. A block of pages that is all zeros costs one comparison."""
    size = len(view)
    used = bytearray()
    page_used = _ZERO_PAGE.__ne__
    page_at = view.__getitem__
    for block in range(0, size, _BLOCK):
        end = min(block + _BLOCK, size)
        if end - block == _BLOCK and _ZERO_BLOCK == view[block:end]:  # noqa: SIM300 (bytearray on the left)
            used += _BLOCK_UNUSED
        else:
            slices = map(slice, range(block, end, PAGE_SIZE), range(block + PAGE_SIZE, end + PAGE_SIZE, PAGE_SIZE))
            used.extend(map(page_used, map(page_at, slices)))
    return used


def content_runs(view: memoryview) -> list[tuple[int, int, bool]]:
    """(first page, count, holds data) of each run of pages of `view` that are all zero or all hold data."""
    used = used_pages(view)
    runs: list[tuple[int, int, bool]] = []
    start, total = 0, len(used)
    while start < total:
        data = used[start]
        end = used.find(0 if data else 1, start)
        if end < 0:
            end = total
        runs.append((start, end - start, data == 1))
        start = end
    return runs
