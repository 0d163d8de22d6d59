"""capture_machine: the state of a paused (or not yet started) VM, memory excepted."""

from __future__ import annotations

from pyrovisor.arch.x86_64.layout import RamRange
from pyrovisor.snapshot.state import DeviceStates, MachineState
from pyrovisor.vmm import Vmm
from pyrovisor.vstate.vcpu_state import save_vcpu
from pyrovisor.vstate.vm_state import save_vm_state


def capture_machine(vmm: Vmm) -> MachineState:
    """Read every vCPU, the VM and the devices. The vCPUs must be parked (paused) or never started."""
    msr_indices = vmm.kvm.get_msr_index_list()
    return MachineState(
        config=vmm.config,
        kernel=vmm.kernel,
        ram=tuple(RamRange(region.gpa, region.size) for region in vmm.memory.regions),
        vm=save_vm_state(vmm.vm.fd),
        vcpus=tuple(save_vcpu(vcpu.fd, msr_indices) for vcpu in vmm.vcpus),
        devices=DeviceStates(serial=vmm.console.save(), debug_exit=vmm.debug_exit.save()),
    )
