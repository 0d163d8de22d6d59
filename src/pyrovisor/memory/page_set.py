"""PageSet: a set of guest page frame numbers held as a bitmap in one Python int (bit n = page n)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

_FLAG_TO_DIGIT = bytes.maketrans(b"\x00\x01", b"01")


class PageSet:
    """An immutable set of page frame numbers.

    Union, intersection and the size are one pass over the bitmap in C (a 1 GiB guest's 262,144 pages are
    32 KiB of bits), whatever the number of pages in the set; only `runs`, `pages` and iteration cost time
    per run or per page. KVM's dirty bitmaps convert in one step (`from_bitmap`).
    """

    __slots__ = ("bits",)

    def __init__(self, bits: int = 0) -> None:
        if bits < 0:
            raise ValueError("a page bitmap cannot be negative")
        self.bits = bits

    @classmethod
    def from_bitmap(cls, bitmap: bytes | bytearray | memoryview, first_page: int = 0) -> PageSet:
        """Bit n of `bitmap` (byte n // 8, bit n % 8: KVM's dirty log layout) is page first_page + n."""
        return cls(int.from_bytes(bitmap, "little") << first_page)

    @classmethod
    def span(cls, first: int, end: int) -> PageSet:
        """The pages [first, end)."""
        if first < 0:
            raise ValueError(f"page {first} is negative")
        return cls(((1 << (end - first)) - 1) << first if end > first else 0)

    @classmethod
    def of(cls, pages: Iterable[int]) -> PageSet:
        """The set of these page numbers (in any order, repeats allowed); a PageSet is returned as it is."""
        if isinstance(pages, PageSet):
            return pages
        if isinstance(pages, range) and pages.step == 1:
            return cls.span(pages.start, pages.stop)
        numbers = pages if isinstance(pages, list) else list(pages)
        if not numbers:
            return cls()
        low, high = min(numbers), max(numbers)
        if low < 0:
            raise ValueError(f"page {low} is negative")
        span = high - low + 1
        if len(numbers) * 20 < span:  # a few pages far apart: set bits (a bitmap is 8 times smaller than flags)
            bitmap = bytearray((span + 7) >> 3)
            for page in numbers:
                offset = page - low
                bitmap[offset >> 3] |= 1 << (offset & 7)
            return cls(int.from_bytes(bitmap, "little") << low)
        flags = bytearray(span)  # a byte per page is quicker to set than a bit
        if low:
            for page in numbers:
                flags[page - low] = 1
        else:
            for page in numbers:
                flags[page] = 1
        return cls(int(flags[::-1].translate(_FLAG_TO_DIGIT), 2) << low)  # binary digits, highest page first

    def runs(self, limit: int | None = None) -> list[tuple[int, int]]:
        """(first page, count) of each run of consecutive pages, in order; with a limit, none is longer."""
        bits = self.bits
        runs: list[tuple[int, int]] = []
        if not bits:
            return runs
        low = (bits & -bits).bit_length() - 1  # skip the empty pages below the first (memory above 4 GiB)
        digits = format(bits >> low, "b")[::-1]  # digits[i] == "1": page low + i is in the set
        find = digits.find
        start = 0
        while start >= 0:
            end = find("0", start)
            if end < 0:
                end = len(digits)
            count = end - start
            if limit is None or count <= limit:
                runs.append((low + start, count))
            else:
                runs.extend((low + first, min(limit, end - first)) for first in range(start, end, limit))
            start = find("1", end)
        return runs

    def pages(self) -> list[int]:
        """The page numbers in ascending order."""
        pages: list[int] = []
        append, extend = pages.append, pages.extend
        for first, count in self.runs():
            if count == 1:
                append(first)
            else:
                extend(range(first, first + count))
        return pages

    def __iter__(self) -> Iterator[int]:
        for first, count in self.runs():
            yield from range(first, first + count)

    def __len__(self) -> int:
        return self.bits.bit_count()

    def __bool__(self) -> bool:
        return self.bits != 0

    def __contains__(self, page: object) -> bool:
        return isinstance(page, int) and page >= 0 and (self.bits >> page) & 1 == 1

    def __or__(self, other: PageSet) -> PageSet:
        return PageSet(self.bits | other.bits)

    def __and__(self, other: PageSet) -> PageSet:
        return PageSet(self.bits & other.bits)

    def __sub__(self, other: PageSet) -> PageSet:
        return PageSet(self.bits & ~other.bits)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PageSet) and other.bits == self.bits

    def __hash__(self) -> int:
        return hash(self.bits)

    def __repr__(self) -> str:
        runs = self.runs()
        shown = ", ".join(str(first) if count == 1 else f"{first}-{first + count - 1}"
                          for first, count in runs[:8])
        return f"PageSet({len(self)} pages: {shown}{', ...' if len(runs) > 8 else ''})"
