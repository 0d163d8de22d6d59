"""Saving and restoring everything KVM holds for one vCPU, as a plain VcpuState."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from pyrovisor.arch.x86_64.cpuid import CpuidEntry
from pyrovisor.errors import KvmError, StateError
from pyrovisor.kvm import Cap, Kvm, VcpuFd, uapi
from pyrovisor.kvm.exits import Interrupted

# MSRs that must be written after the others (KVM derives state from them) — none need reordering on
# x86 today, but IA32_TSC is written last so the guest's time starts from the saved value.
MSR_IA32_TSC = 0x10


@dataclass(frozen=True)
class VcpuState:
    """One vCPU, as raw KVM structures (their layout is the kernel's stable ABI) plus decoded lists."""

    index: int
    cpuid: tuple[CpuidEntry, ...]
    regs: bytes
    sregs: bytes
    fpu: bytes
    xsave: bytes
    xcrs: bytes
    msrs: tuple[tuple[int, int], ...]
    lapic: bytes
    events: bytes
    mp_state: int
    debugregs: bytes
    tsc_khz: int = 0  # the guest's TSC frequency; 0 where the host does not report it


_STRUCTS = {
    "regs": uapi.kvm_regs,
    "sregs": uapi.kvm_sregs,
    "fpu": uapi.kvm_fpu,
    "xsave": uapi.kvm_xsave,
    "xcrs": uapi.kvm_xcrs,
    "lapic": uapi.kvm_lapic_state,
    "events": uapi.kvm_vcpu_events,
    "debugregs": uapi.kvm_debugregs,
}


def complete_pending_io(vcpu: VcpuFd) -> None:
    """Finish an exit's I/O inside KVM without running guest code, so the saved state is consistent.

    KVM completes a port or MMIO access only when KVM_RUN is entered again; with immediate_exit set
    it completes it and returns at once.
    """
    vcpu.set_immediate_exit(True)
    try:
        result = vcpu.run()
    finally:
        vcpu.set_immediate_exit(False)
    if not isinstance(result, Interrupted):
        raise StateError(f"vCPU {vcpu.vcpu_id}", f"completing pending I/O gave {result!r}, not an interrupted run")


def read_all_msrs(vcpu: VcpuFd, indices: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """Values of every MSR in `indices`. KVM lists them as saved state: one it cannot read is an error,
    since a state without it would restore a different machine."""
    got = vcpu.get_msrs(indices)
    if len(got) != len(indices):
        missing = indices[len(got)]
        raise StateError(f"vCPU {vcpu.vcpu_id}", f"KVM cannot read MSR {missing:#x}, which it lists as saved "
                         "state; the vCPU cannot be saved completely")
    return tuple((index, got[index]) for index in indices)


def host_tsc_khz(vcpu: VcpuFd) -> int:
    """The vCPU's TSC frequency in kHz, or 0 where the host does not report it."""
    try:
        return vcpu.get_tsc_khz()
    except KvmError:
        return 0


def save_vcpu(vcpu: VcpuFd, msr_indices: tuple[int, ...]) -> VcpuState:
    """Capture a stopped vCPU (its thread parked outside KVM_RUN, pending I/O completed)."""
    return VcpuState(
        index=vcpu.vcpu_id,
        cpuid=vcpu.get_cpuid2(),
        regs=bytes(vcpu.get_regs()),
        sregs=bytes(vcpu.get_sregs()),
        fpu=bytes(vcpu.get_fpu()),
        xsave=bytes(vcpu.get_xsave()),
        xcrs=bytes(vcpu.get_xcrs()),
        msrs=read_all_msrs(vcpu, msr_indices),
        lapic=bytes(vcpu.get_lapic()),
        events=bytes(vcpu.get_vcpu_events()),
        mp_state=vcpu.get_mp_state(),
        debugregs=bytes(vcpu.get_debugregs()),
        tsc_khz=host_tsc_khz(vcpu),
    )


def check_vcpu_state(state: VcpuState, source: str) -> None:
    """Refuse a state whose raw structures do not have this kernel's sizes (before touching any vCPU)."""
    for name, kind in _STRUCTS.items():
        size = len(getattr(state, name))
        if size != ctypes.sizeof(kind):
            raise StateError(source, f"vCPU {state.index} {name}: {size} bytes, this host's {kind.__name__} has "
                             f"{ctypes.sizeof(kind)}")


def restore_vcpu(vcpu: VcpuFd, state: VcpuState, kvm: Kvm) -> None:
    """Load a saved state into a fresh vCPU, in the order KVM needs (CPUID first, LAPIC after MSRs)."""
    vcpu.set_cpuid2(state.cpuid)
    _restore_tsc_frequency(vcpu, state)
    vcpu.set_regs(uapi.kvm_regs.from_buffer_copy(state.regs))
    if kvm.check_extension(Cap.XSAVE):
        vcpu.set_xsave(uapi.kvm_xsave.from_buffer_copy(state.xsave))
    else:
        vcpu.set_fpu(uapi.kvm_fpu.from_buffer_copy(state.fpu))
    if kvm.check_extension(Cap.XCRS):
        vcpu.set_xcrs(uapi.kvm_xcrs.from_buffer_copy(state.xcrs))
    vcpu.set_sregs(uapi.kvm_sregs.from_buffer_copy(state.sregs))
    ordered = [(index, value) for index, value in state.msrs if index != MSR_IA32_TSC]
    ordered += [(index, value) for index, value in state.msrs if index == MSR_IA32_TSC]
    written = vcpu.set_msrs(dict(ordered))
    if written != len(ordered):
        index = ordered[written][0]
        raise KvmError("KVM_SET_MSRS", 0, f"vCPU {state.index}: MSR {index:#x} refused by this host")
    vcpu.set_mp_state(state.mp_state)
    vcpu.set_lapic(uapi.kvm_lapic_state.from_buffer_copy(state.lapic))
    events = uapi.kvm_vcpu_events.from_buffer_copy(state.events)
    events.flags |= (uapi.KVM_VCPUEVENT_VALID_NMI_PENDING | uapi.KVM_VCPUEVENT_VALID_SIPI_VECTOR
                     | uapi.KVM_VCPUEVENT_VALID_SHADOW)
    vcpu.set_vcpu_events(events)
    vcpu.set_debugregs(uapi.kvm_debugregs.from_buffer_copy(state.debugregs))


def _restore_tsc_frequency(vcpu: VcpuFd, state: VcpuState) -> None:
    """Give the vCPU the TSC frequency the guest calibrated against, or refuse: a guest whose clock
    suddenly runs at another rate keeps wrong time."""
    here = host_tsc_khz(vcpu)
    if not state.tsc_khz or not here or here == state.tsc_khz:
        return
    try:
        vcpu.set_tsc_khz(state.tsc_khz)
    except (KvmError, OverflowError) as exc:  # OverflowError: more than the ioctl's int can say
        raise StateError(f"vCPU {state.index}", f"the guest's TSC ran at {state.tsc_khz} kHz; this host's runs at "
                         f"{here} kHz and KVM cannot set it ({exc})") from None
