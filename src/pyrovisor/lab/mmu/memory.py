"""Simulated physical memory: sparse 4 KiB frames of 512 little 64-bit words, read and written by address.

Only frames that hold page tables need contents, so memory is sparse: each backed frame is one row of
a numpy array, found through a dictionary (one address at a time) or a sorted index (many at once).
Reading an unbacked frame is an error, as a walk must never wander outside the tables it built.
"""

from __future__ import annotations

import numpy as np

from pyrovisor.errors import GuestMemoryError
from pyrovisor.lab.mmu.x86 import ENTRIES_PER_TABLE, ENTRY_BYTES, FRAME_SHIFT

WORD_MASK = ENTRIES_PER_TABLE - 1


def distinct(values: np.ndarray) -> np.ndarray:
    """The sorted distinct values of an integer array, by sorting: np.unique on NumPy 2.4 takes a hash-table
    path that is about a hundred times slower on large arrays of random int64 values."""
    ordered = np.sort(np.asarray(values).ravel())
    if len(ordered) == 0:
        return ordered
    keep = np.empty(len(ordered), dtype=bool)
    keep[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


class PhysicalMemory:
    """A physical address space whose backed frames are rows of `words` (uint64, 512 per frame)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.words = np.zeros((16, ENTRIES_PER_TABLE), dtype=np.uint64)
        self._row_of: dict[int, int] = {}
        self._frames: list[int] = []
        self._index: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def backed_frames(self) -> int:
        return len(self._frames)

    def back(self, frames: np.ndarray) -> np.ndarray:
        """Give every frame in `frames` a zeroed row if it has none; return the rows, in order."""
        frames = np.asarray(frames, dtype=np.int64)
        for frame in distinct(frames).tolist():
            if frame not in self._row_of:
                self._row_of[frame] = len(self._frames)
                self._frames.append(frame)
        if len(self._frames) > len(self.words):
            grown = np.zeros((max(len(self._frames), 2 * len(self.words)), ENTRIES_PER_TABLE), dtype=np.uint64)
            grown[: len(self.words)] = self.words
            self.words = grown
        self._index = None
        return self.rows_of(frames)

    def rows_of(self, frames: np.ndarray) -> np.ndarray:
        """Rows of backed frames, vectorized; raises if any frame is not backed."""
        frames = np.asarray(frames, dtype=np.int64)
        if self._index is None:
            keys = np.asarray(self._frames, dtype=np.int64)
            order = np.argsort(keys)
            self._index = (keys[order], order.astype(np.int64))
        keys, rows = self._index
        slots = np.searchsorted(keys, frames)
        slots_in_range = np.minimum(slots, max(len(keys) - 1, 0))
        found = (slots < len(keys)) & (keys[slots_in_range] == frames) if len(keys) else np.zeros(len(frames), bool)
        if not found.all():
            missing = int(frames[~found][0])
            raise GuestMemoryError(missing << FRAME_SHIFT, 1 << FRAME_SHIFT, f"frame not backed in {self.name} memory")
        return rows[slots_in_range]

    def read(self, address: int) -> int:
        """One 8-byte read (the reference walker's every memory reference goes through here)."""
        row = self._row_of.get(address >> FRAME_SHIFT)
        if row is None:
            raise GuestMemoryError(address, ENTRY_BYTES, f"read outside the backed frames of {self.name} memory")
        return int(self.words[row, (address >> 3) & WORD_MASK])

    def write(self, address: int, value: int) -> None:
        row = self._row_of.get(address >> FRAME_SHIFT)
        if row is None:
            raise GuestMemoryError(address, ENTRY_BYTES, f"write outside the backed frames of {self.name} memory")
        self.words[row, (address >> 3) & WORD_MASK] = value

    def read_many(self, addresses: np.ndarray) -> np.ndarray:
        addresses = np.asarray(addresses, dtype=np.int64)
        rows = self.rows_of(addresses >> FRAME_SHIFT)
        words: np.ndarray = self.words[rows, (addresses >> 3) & WORD_MASK].astype(np.int64)
        return words

    def write_many(self, addresses: np.ndarray, values: np.ndarray) -> None:
        addresses = np.asarray(addresses, dtype=np.int64)
        rows = self.rows_of(addresses >> FRAME_SHIFT)
        self.words[rows, (addresses >> 3) & WORD_MASK] = np.asarray(values, dtype=np.int64).astype(np.uint64)

    def copy_frames(self, source: PhysicalMemory, source_frames: np.ndarray, target_frames: np.ndarray) -> None:
        """Copy whole frames from another memory (how a guest's tables come to live in host frames)."""
        rows = self.back(target_frames)
        self.words[rows] = source.words[source.rows_of(source_frames)]
