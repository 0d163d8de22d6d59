"""VmFd: a VM file descriptor and the VM-wide ioctls."""

from __future__ import annotations

import ctypes
import os
import weakref

from pyrovisor.kvm import uapi
from pyrovisor.kvm.caps import Cap
from pyrovisor.kvm.ioctl import ioctl_int, ioctl_ptr, ioctl_struct
from pyrovisor.kvm.vcpu import VcpuFd

PAGE_SIZE = 4096

# Memslot flags (KVM_MEM_*).
MEM_LOG_DIRTY_PAGES = uapi.KVM_MEM_LOG_DIRTY_PAGES
MEM_READONLY = uapi.KVM_MEM_READONLY

DIRTY_GFN_DIRTY = uapi.KVM_DIRTY_GFN_F_DIRTY
DIRTY_GFN_RESET = uapi.KVM_DIRTY_GFN_F_RESET
DIRTY_GFN_SIZE = 16  # struct kvm_dirty_gfn

IRQCHIP_PIC_MASTER = uapi.KVM_IRQCHIP_PIC_MASTER
IRQCHIP_PIC_SLAVE = uapi.KVM_IRQCHIP_PIC_SLAVE
IRQCHIP_IOAPIC = uapi.KVM_IRQCHIP_IOAPIC


def dirty_bitmap_bytes(memory_size: int) -> int:
    """Size of a dirty bitmap for a slot: one bit per page, rounded up to 64-bit words."""
    pages = memory_size // PAGE_SIZE
    return (pages + 63) // 64 * 8


class VmFd:
    """One KVM VM. Methods are named after the ioctls they issue."""

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        self.fd = fd
        self.vcpu_mmap_size = vcpu_mmap_size
        self._close_fd = weakref.finalize(self, os.close, fd)  # closes the fd if the object is dropped unclosed

    # --- capabilities ---------------------------------------------------------------------------
    def check_extension(self, cap: Cap | int) -> int:
        return ioctl_int(self.fd, uapi.KVM_CHECK_EXTENSION, int(cap), "KVM_CHECK_EXTENSION")

    def enable_cap(self, cap: Cap | int, *args: int, flags: int = 0) -> None:
        request = uapi.kvm_enable_cap()
        request.cap = int(cap)
        request.flags = flags
        for index, value in enumerate(args):
            request.args[index] = value
        ioctl_struct(self.fd, uapi.KVM_ENABLE_CAP, request, "KVM_ENABLE_CAP")

    # --- memory -------------------------------------------------------------------------------
    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int, userspace_addr: int,
                               flags: int = 0) -> None:
        """Create, move, resize or (memory_size=0) delete memslot `slot`."""
        region = uapi.kvm_userspace_memory_region(slot=slot, flags=flags, guest_phys_addr=guest_phys_addr,
                                                  memory_size=memory_size, userspace_addr=userspace_addr)
        ioctl_struct(self.fd, uapi.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def get_dirty_log(self, slot: int, memory_size: int) -> bytearray:
        """Bitmap of the pages of `slot` written since the last call (bit n = page n)."""
        bitmap = bytearray(dirty_bitmap_bytes(memory_size))
        holder = (ctypes.c_char * len(bitmap)).from_buffer(bitmap)
        request = uapi.kvm_dirty_log(slot=slot)
        request.dirty_bitmap = ctypes.addressof(holder)
        ioctl_struct(self.fd, uapi.KVM_GET_DIRTY_LOG, request, "KVM_GET_DIRTY_LOG")
        del holder
        return bitmap

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: bytes | bytearray) -> None:
        """Re-protect the pages whose bits are set (with MANUAL_DIRTY_LOG_PROTECT2 enabled)."""
        buffer = ctypes.create_string_buffer(bytes(bitmap), len(bitmap))
        request = uapi.kvm_clear_dirty_log(slot=slot, num_pages=num_pages, first_page=first_page)
        request.dirty_bitmap = ctypes.addressof(buffer)
        ioctl_struct(self.fd, uapi.KVM_CLEAR_DIRTY_LOG, request, "KVM_CLEAR_DIRTY_LOG")

    def reset_dirty_rings(self) -> int:
        return ioctl_int(self.fd, uapi.KVM_RESET_DIRTY_RINGS, 0, "KVM_RESET_DIRTY_RINGS")

    # --- interrupt controllers and timers -------------------------------------------------------
    def create_irqchip(self) -> None:
        ioctl_int(self.fd, uapi.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self, flags: int = 0) -> None:
        config = uapi.kvm_pit_config(flags=flags)
        ioctl_struct(self.fd, uapi.KVM_CREATE_PIT2, config, "KVM_CREATE_PIT2")

    def set_tss_addr(self, address: int) -> None:
        # The argument is an unsigned long, usually just below 4 GiB: too wide for fcntl's C int.
        ioctl_ptr(self.fd, uapi.KVM_SET_TSS_ADDR, address, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, address: int) -> None:
        value = ctypes.c_uint64(address)
        ioctl_ptr(self.fd, uapi.KVM_SET_IDENTITY_MAP_ADDR, ctypes.addressof(value), "KVM_SET_IDENTITY_MAP_ADDR")

    def irq_line(self, irq: int, level: int) -> None:
        request = uapi.kvm_irq_level(level=level)
        request.irq = irq
        ioctl_struct(self.fd, uapi.KVM_IRQ_LINE, request, "KVM_IRQ_LINE")

    def signal_msi(self, address: int, data: int) -> int:
        message = uapi.kvm_msi(address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=data)
        return ioctl_struct(self.fd, uapi.KVM_SIGNAL_MSI, message, "KVM_SIGNAL_MSI")

    def get_irqchip(self, chip_id: int) -> uapi.kvm_irqchip:
        chip = uapi.kvm_irqchip(chip_id=chip_id)
        ioctl_struct(self.fd, uapi.KVM_GET_IRQCHIP, chip, "KVM_GET_IRQCHIP")
        return chip

    def set_irqchip(self, chip: uapi.kvm_irqchip) -> None:
        ioctl_struct(self.fd, uapi.KVM_SET_IRQCHIP, chip, "KVM_SET_IRQCHIP")

    def get_pit2(self) -> uapi.kvm_pit_state2:
        state = uapi.kvm_pit_state2()
        ioctl_struct(self.fd, uapi.KVM_GET_PIT2, state, "KVM_GET_PIT2")
        return state

    def set_pit2(self, state: uapi.kvm_pit_state2) -> None:
        ioctl_struct(self.fd, uapi.KVM_SET_PIT2, state, "KVM_SET_PIT2")

    def get_clock(self) -> uapi.kvm_clock_data:
        clock = uapi.kvm_clock_data()
        ioctl_struct(self.fd, uapi.KVM_GET_CLOCK, clock, "KVM_GET_CLOCK")
        return clock

    def set_clock(self, clock: uapi.kvm_clock_data) -> None:
        ioctl_struct(self.fd, uapi.KVM_SET_CLOCK, clock, "KVM_SET_CLOCK")

    # --- fast I/O paths ---------------------------------------------------------------------------
    def register_coalesced_mmio(self, address: int, size: int, pio: bool = False) -> None:
        zone = uapi.kvm_coalesced_mmio_zone(addr=address, size=size)
        zone.pio = int(pio)
        ioctl_struct(self.fd, uapi.KVM_REGISTER_COALESCED_MMIO, zone, "KVM_REGISTER_COALESCED_MMIO")

    def unregister_coalesced_mmio(self, address: int, size: int, pio: bool = False) -> None:
        zone = uapi.kvm_coalesced_mmio_zone(addr=address, size=size)
        zone.pio = int(pio)
        ioctl_struct(self.fd, uapi.KVM_UNREGISTER_COALESCED_MMIO, zone, "KVM_UNREGISTER_COALESCED_MMIO")

    def ioeventfd(self, event_fd: int, address: int, length: int, datamatch: int | None = None,
                  pio: bool = False, deassign: bool = False) -> None:
        """Make guest writes to `address` signal `event_fd` in the kernel, without an exit to userspace."""
        flags = 0
        if datamatch is not None:
            flags |= uapi.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= uapi.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= uapi.KVM_IOEVENTFD_FLAG_DEASSIGN
        request = uapi.kvm_ioeventfd(datamatch=datamatch or 0, addr=address, len=length, fd=event_fd, flags=flags)
        ioctl_struct(self.fd, uapi.KVM_IOEVENTFD, request, "KVM_IOEVENTFD")

    def irqfd(self, event_fd: int, gsi: int, resample_fd: int | None = None, deassign: bool = False) -> None:
        """Make a write to `event_fd` raise interrupt `gsi` in the kernel."""
        flags = 0
        if deassign:
            flags |= uapi.KVM_IRQFD_FLAG_DEASSIGN
        if resample_fd is not None:
            flags |= uapi.KVM_IRQFD_FLAG_RESAMPLE
        request = uapi.kvm_irqfd(fd=event_fd, gsi=gsi, flags=flags, resamplefd=resample_fd or 0)
        ioctl_struct(self.fd, uapi.KVM_IRQFD, request, "KVM_IRQFD")

    # --- vCPUs and statistics -------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int) -> VcpuFd:
        fd = ioctl_int(self.fd, uapi.KVM_CREATE_VCPU, vcpu_id, "KVM_CREATE_VCPU")
        return VcpuFd(fd, vcpu_id, self.vcpu_mmap_size)

    def get_stats_fd(self) -> int:
        return ioctl_int(self.fd, uapi.KVM_GET_STATS_FD, 0, "KVM_GET_STATS_FD")

    def close(self) -> None:
        if self.fd >= 0:
            self.fd = -1
            self._close_fd()
