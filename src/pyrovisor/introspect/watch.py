"""Watch: one write watch over guest-physical byte ranges, as the monitor arms it and a snapshot saves it."""

from __future__ import annotations

from dataclasses import dataclass

PAGE_SIZE = 4096
MODES = ("memslot", "uffd")


@dataclass(frozen=True)
class Watch:
    """A watched set of guest-physical byte ranges, how it was asked for, and where its records go."""

    id: int
    kind: str  # "physical", "virtual" or "symbol"
    target: str  # what the user named: an address, "pid 3 0x400000", a symbol
    ranges: tuple[tuple[int, int], ...]  # (gpa, size), the bytes whose writes are logged
    log: str | None = None  # a JSON-lines file the records are appended to
    mode: str = "memslot"  # "memslot": read-only memslot, full records; "uffd": userfaultfd write protection, address only

    def covers(self, gpa: int, size: int) -> bool:
        return any(start < gpa + size and gpa < start + length for start, length in self.ranges)

    def pages(self) -> set[int]:
        return {page for start, length in self.ranges
                for page in range(start // PAGE_SIZE, (start + length - 1) // PAGE_SIZE + 1)}
