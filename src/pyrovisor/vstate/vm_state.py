"""The VM-wide state KVM holds — the in-kernel interrupt controllers and the clock — saved and restored."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Self

from pyrovisor.errors import StateError
from pyrovisor.kvm import VmFd, uapi

IRQCHIP_IDS = (uapi.KVM_IRQCHIP_PIC_MASTER, uapi.KVM_IRQCHIP_PIC_SLAVE, uapi.KVM_IRQCHIP_IOAPIC)


@dataclass(frozen=True)
class VmState:
    irqchips: tuple[bytes, ...]  # kvm_irqchip for the PIC master, PIC slave and IOAPIC
    clock: bytes  # kvm_clock_data


def save_vm_state(vm: VmFd) -> VmState:
    return VmState(irqchips=tuple(bytes(vm.get_irqchip(chip)) for chip in IRQCHIP_IDS),
                   clock=bytes(vm.get_clock()))


def check_vm_state(state: VmState, source: str) -> None:
    if len(state.irqchips) != len(IRQCHIP_IDS):
        raise StateError(source, f"{len(state.irqchips)} interrupt controllers, expected {len(IRQCHIP_IDS)}")
    for raw in state.irqchips:
        if len(raw) != ctypes.sizeof(uapi.kvm_irqchip):
            raise StateError(source, f"interrupt controller state of {len(raw)} bytes")
    if len(state.clock) != ctypes.sizeof(uapi.kvm_clock_data):
        raise StateError(source, f"clock state of {len(state.clock)} bytes")


def restore_vm_state(vm: VmFd, state: VmState) -> None:
    """Restore after the vCPUs (their LAPICs are in place) so routed interrupts land where they should."""
    for raw in state.irqchips:
        vm.set_irqchip(uapi.kvm_irqchip.from_buffer_copy(raw))
    clock = uapi.kvm_clock_data.from_buffer_copy(state.clock)
    clock.flags = 0  # resume from the saved value: the guest does not see the time it spent saved
    vm.set_clock(clock)


class KernelDevices:
    """The PICs, the IOAPIC and the clock that KVM emulates for the whole VM (Persist protocol)."""

    def __init__(self, vm: VmFd) -> None:
        self._vm = vm

    def save(self) -> VmState:
        return save_vm_state(self._vm)

    @classmethod
    def restore(cls, args: VmFd, state: VmState) -> Self:
        restore_vm_state(args, state)
        return cls(args)
