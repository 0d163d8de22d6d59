"""Vm: a KVM VM with the memory slots it owns, its interrupt controller and dirty logging."""

from __future__ import annotations

from dataclasses import dataclass

from pyrovisor.errors import ConfigError
from pyrovisor.kvm import Cap, Kvm, VcpuFd, VmFd
from pyrovisor.kvm.vm import MEM_LOG_DIRTY_PAGES, MEM_READONLY
from pyrovisor.memory import GuestMemory, MemoryRegion


@dataclass
class Memslot:
    """A KVM memory slot and the region backing it; the slot pins the region while it exists."""

    slot: int
    region: MemoryRegion
    flags: int

    @property
    def dirty_logging(self) -> bool:
        return bool(self.flags & MEM_LOG_DIRTY_PAGES)

    @property
    def readonly(self) -> bool:
        return bool(self.flags & MEM_READONLY)


class KvmInterruptLine:
    """An interrupt output wired to a GSI of the in-kernel irqchip (KVM_IRQ_LINE)."""

    def __init__(self, vm: VmFd, gsi: int) -> None:
        self._vm = vm
        self.gsi = gsi

    def set_level(self, high: bool) -> None:
        self._vm.irq_line(self.gsi, 1 if high else 0)


class Vm:
    """A VM fd plus the memslots it owns. Closing it deletes the slots before unpinning memory."""

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self.fd = kvm.create_vm()
        self._memslots: dict[int, Memslot] = {}
        self.max_memslots = kvm.check_extension(Cap.NR_MEMSLOTS) or 32

    # --- memory -------------------------------------------------------------------------------
    @property
    def memslots(self) -> tuple[Memslot, ...]:
        return tuple(self._memslots[slot] for slot in sorted(self._memslots))

    def add_memslot(self, region: MemoryRegion, flags: int = 0) -> Memslot:
        slot = next(index for index in range(self.max_memslots + 1) if index not in self._memslots)
        if slot >= self.max_memslots:
            raise ConfigError("memory slots", slot, f"this host allows {self.max_memslots}")
        region.pin()
        try:
            self.fd.set_user_memory_region(slot, region.gpa, region.size, region.host_address, flags)
        except BaseException:
            region.unpin()
            raise
        memslot = Memslot(slot, region, flags)
        self._memslots[slot] = memslot
        return memslot

    def add_guest_memory(self, memory: GuestMemory, flags: int = 0) -> tuple[Memslot, ...]:
        return tuple(self.add_memslot(region, flags) for region in memory.regions)

    def set_memslot_flags(self, slot: int, flags: int) -> None:
        """Change a slot's flags (e.g. start or stop dirty logging) in place."""
        memslot = self._memslots[slot]
        self.fd.set_user_memory_region(slot, memslot.region.gpa, memslot.region.size,
                                       memslot.region.host_address, flags)
        memslot.flags = flags

    def remove_memslot(self, slot: int) -> MemoryRegion:
        memslot = self._memslots.pop(slot)
        self.fd.set_user_memory_region(slot, memslot.region.gpa, 0, memslot.region.host_address, 0)
        memslot.region.unpin()
        return memslot.region

    def get_dirty_log(self, slot: int) -> bytearray:
        memslot = self._memslots[slot]
        return self.fd.get_dirty_log(slot, memslot.region.size)

    # --- devices and vCPUs --------------------------------------------------------------------
    def create_irqchip(self) -> None:
        self.fd.create_irqchip()

    def interrupt_line(self, gsi: int) -> KvmInterruptLine:
        return KvmInterruptLine(self.fd, gsi)

    def create_vcpu(self, vcpu_id: int) -> VcpuFd:
        return self.fd.create_vcpu(vcpu_id)

    def remove_all_memslots(self) -> None:
        """Delete every memslot, so KVM no longer refers to guest memory and it can be unmapped."""
        for slot in list(self._memslots):
            self.remove_memslot(slot)

    def close(self) -> None:
        """Delete every memslot (so KVM no longer refers to the memory), then close the VM fd.

        vCPU fds should be closed first: they keep the VM alive in the kernel.
        """
        try:
            if self.fd.fd >= 0:
                self.remove_all_memslots()
        finally:
            self.fd.close()
