"""What a snapshot adds to the machine state: where its memory is and which snapshot it is a diff of."""

from __future__ import annotations

from dataclasses import dataclass

from pyrovisor.introspect.watch import Watch
from pyrovisor.persist.machine import MachineState

FULL = "full"
DIFF = "diff"


@dataclass(frozen=True)
class MemoryRange:
    """Guest bytes [gpa, gpa+size) are stored at `file_offset` in the memory file."""

    gpa: int
    size: int
    file_offset: int


@dataclass(frozen=True)
class MemoryImage:
    kind: str  # FULL: every RAM region; DIFF: only the pages written since the base
    file: str  # name of the memory file, in the snapshot's directory
    file_size: int
    sha256: str
    ranges: tuple[MemoryRange, ...]


@dataclass(frozen=True)
class BaseReference:
    """The snapshot a diff applies to: its directory (relative to the diff's) and its identity."""

    directory: str
    snapshot_id: str


@dataclass(frozen=True)
class SnapshotState:
    """A state file's content: the machine, where its memory is, and what it is a diff of."""

    snapshot_id: str
    created: str
    pyrovisor_version: str
    machine: MachineState
    memory: MemoryImage
    base: BaseReference | None = None
    watches: tuple[Watch, ...] = ()  # write watches armed when it was taken: re-armed on restore
