"""MachineState: everything but guest memory needed to rebuild a VM, and the checks that need no KVM."""

from __future__ import annotations

from dataclasses import dataclass

from pyrovisor.arch.x86_64.layout import RamRange, ram_ranges
from pyrovisor.config import MachineConfig
from pyrovisor.devices.manager import check_records
from pyrovisor.devices.platform import KINDS
from pyrovisor.errors import PyrovisorError, StateError
from pyrovisor.loader import LoadResult
from pyrovisor.persist.device import DeviceRecord
from pyrovisor.vstate.vcpu_state import VcpuState, check_vcpu_state
from pyrovisor.vstate.vm_state import VmState, check_vm_state


@dataclass(frozen=True)
class MachineState:
    """A VM as snapshots store it and live migration sends it: shared by snapshot, migration and sandbox."""

    config: MachineConfig
    kernel: LoadResult
    ram: tuple[RamRange, ...]
    vm: VmState
    vcpus: tuple[VcpuState, ...]
    devices: tuple[DeviceRecord, ...]


def check_machine_state(state: MachineState, source: str) -> None:
    """Consistency checks that need no KVM, done before anything is created."""
    try:
        state.config.validate()
    except PyrovisorError as exc:
        raise StateError(source, f"configuration: {exc}") from None
    if tuple((r.gpa, r.size) for r in state.ram) != tuple((r.gpa, r.size) for r in ram_ranges(state.config.memory_size)):
        raise StateError(source, "RAM layout does not match the configured memory size")
    if len(state.vcpus) != state.config.vcpus or [v.index for v in state.vcpus] != list(range(state.config.vcpus)):
        raise StateError(source, f"{len(state.vcpus)} vCPU states for {state.config.vcpus} vCPUs")
    for vcpu in state.vcpus:
        check_vcpu_state(vcpu, source)
    check_vm_state(state.vm, source)
    check_records(KINDS, state.devices, source)
