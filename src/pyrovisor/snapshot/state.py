"""MachineState: everything needed to rebuild a VM, as plain frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Self, TypeVar

from pyrovisor.arch.x86_64.layout import RamRange
from pyrovisor.config import MachineConfig
from pyrovisor.devices.debug_exit import DebugExitState
from pyrovisor.devices.serial import SerialState
from pyrovisor.loader import LoadResult
from pyrovisor.vstate.vcpu_state import VcpuState
from pyrovisor.vstate.vm_state import VmState

S = TypeVar("S")
A = TypeVar("A", contravariant=True)


class Persist(Protocol[S, A]):
    """A component that saves itself as a plain State and is rebuilt from one plus constructor arguments
    (the live things a State cannot hold: file descriptors, callbacks, interrupt lines)."""

    def save(self) -> S: ...

    @classmethod
    def restore(cls, args: A, state: S) -> Self: ...


FULL = "full"
DIFF = "diff"


@dataclass(frozen=True)
class DeviceStates:
    serial: SerialState
    debug_exit: DebugExitState


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
class MachineState:
    """Everything but guest memory needed to rebuild a VM (snapshots and live migration)."""

    config: MachineConfig
    kernel: LoadResult
    ram: tuple[RamRange, ...]
    vm: VmState
    vcpus: tuple[VcpuState, ...]
    devices: DeviceStates


@dataclass(frozen=True)
class SnapshotState:
    """A state file's content: the machine, where its memory is, and what it is a diff of."""

    snapshot_id: str
    created: str
    pyrovisor_version: str
    machine: MachineState
    memory: MemoryImage
    base: BaseReference | None = None
