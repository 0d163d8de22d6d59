"""VcpuFd: a vCPU file descriptor, its mapped kvm_run page and the per-vCPU ioctls."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import weakref
from collections.abc import Iterable, Mapping
from typing import TypeVar

from pyrovisor.arch.x86_64.cpuid import CpuidEntry
from pyrovisor.errors import KvmError
from pyrovisor.kvm import uapi
from pyrovisor.kvm.exits import IMMEDIATE_EXIT_OFFSET, ExitDecoder, Interrupted, VcpuExit, field_offset
from pyrovisor.kvm.flexible import FlexibleBuffer
from pyrovisor.kvm.ioctl import ioctl_int, ioctl_ptr, ioctl_struct, raw_ioctl

PAGE_SIZE = 4096
KVM_RUN = uapi.KVM_RUN
_ioctl = raw_ioctl()
_S = TypeVar("_S", bound=ctypes.Structure)
_U64_AT = struct.Struct("<Q")
VALID_REGS_OFFSET = field_offset(uapi.kvm_run, "kvm_valid_regs")
# kvm_run.s.regs.sregs.cr3 as an index into the page read as 64-bit words (KVM_SYNC_X86_SREGS).
CR3_WORD = (field_offset(uapi.kvm_run, "s") + field_offset(uapi.kvm_sync_regs, "sregs")
            + field_offset(uapi.kvm_sregs, "cr3")) // 8


class VcpuFd:
    """One vCPU. `run()` enters the guest and returns the decoded exit."""

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int) -> None:
        self.fd = fd
        self.vcpu_id = vcpu_id
        self._close_fd = weakref.finalize(self, os.close, fd)  # closes the fd if the object is dropped unclosed
        try:
            self.run_page = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            self._close_fd()
            raise KvmError("mmap of kvm_run", exc.errno or 0) from None
        self._decoder = ExitDecoder(self.run_page)

    # --- running --------------------------------------------------------------------------------
    def run(self) -> VcpuExit:
        """KVM_RUN once. A signal or immediate_exit gives `Interrupted`, and so does EAGAIN: a vCPU waiting for
        INIT/SIPI (KVM_MP_STATE_UNINITIALIZED) returns it when woken, to be run again."""
        if _ioctl(self.fd, KVM_RUN, None) < 0:
            error = ctypes.get_errno()
            if error in (errno.EINTR, errno.EAGAIN):
                return Interrupted()
            raise KvmError("KVM_RUN", error)
        return self._decoder.decode()

    def set_immediate_exit(self, value: bool) -> None:
        self.run_page[IMMEDIATE_EXIT_OFFSET] = 1 if value else 0

    @property
    def exit_reason(self) -> int:
        return self._decoder.exit_reason()

    def share_sregs(self, enabled: bool) -> None:
        """Ask KVM to copy the special registers into kvm_run on every exit (KVM_SYNC_REGS), or stop asking.

        While shared, `sregs_words()[CR3_WORD]` is the guest's CR3 at the last exit: no KVM_GET_SREGS ioctl."""
        _U64_AT.pack_into(self.run_page, VALID_REGS_OFFSET, uapi.KVM_SYNC_X86_SREGS if enabled else 0)

    def sregs_words(self) -> memoryview:
        """The kvm_run page as 64-bit words, to read shared registers by index (see `share_sregs`)."""
        return memoryview(self.run_page).cast("Q")

    def coalesced_mmio_ring(self) -> memoryview:
        """The coalesced MMIO/PIO ring page inside the vCPU mapping."""
        offset = uapi.KVM_COALESCED_MMIO_PAGE_OFFSET * PAGE_SIZE
        return memoryview(self.run_page)[offset:offset + PAGE_SIZE]

    def map_dirty_ring(self, ring_bytes: int) -> mmap.mmap:
        """The vCPU's dirty ring (KVM_CAP_DIRTY_LOG_RING must be enabled on the VM first)."""
        return mmap.mmap(self.fd, ring_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                         offset=uapi.KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE)

    # --- registers ------------------------------------------------------------------------------
    def get_regs(self) -> uapi.kvm_regs:
        return self._get(uapi.kvm_regs, uapi.KVM_GET_REGS, "KVM_GET_REGS")

    def set_regs(self, regs: uapi.kvm_regs) -> None:
        ioctl_struct(self.fd, uapi.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> uapi.kvm_sregs:
        return self._get(uapi.kvm_sregs, uapi.KVM_GET_SREGS, "KVM_GET_SREGS")

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        ioctl_struct(self.fd, uapi.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_fpu(self) -> uapi.kvm_fpu:
        return self._get(uapi.kvm_fpu, uapi.KVM_GET_FPU, "KVM_GET_FPU")

    def set_fpu(self, fpu: uapi.kvm_fpu) -> None:
        ioctl_struct(self.fd, uapi.KVM_SET_FPU, fpu, "KVM_SET_FPU")

    def get_xsave(self) -> uapi.kvm_xsave:
        return self._get(uapi.kvm_xsave, uapi.KVM_GET_XSAVE, "KVM_GET_XSAVE")

    def set_xsave(self, xsave: uapi.kvm_xsave) -> None:
        ioctl_struct(self.fd, uapi.KVM_SET_XSAVE, xsave, "KVM_SET_XSAVE")

    def get_xcrs(self) -> uapi.kvm_xcrs:
        return self._get(uapi.kvm_xcrs, uapi.KVM_GET_XCRS, "KVM_GET_XCRS")

    def set_xcrs(self, xcrs: uapi.kvm_xcrs) -> None:
        ioctl_struct(self.fd, uapi.KVM_SET_XCRS, xcrs, "KVM_SET_XCRS")

    def get_debugregs(self) -> uapi.kvm_debugregs:
        return self._get(uapi.kvm_debugregs, uapi.KVM_GET_DEBUGREGS, "KVM_GET_DEBUGREGS")

    def set_debugregs(self, debugregs: uapi.kvm_debugregs) -> None:
        ioctl_struct(self.fd, uapi.KVM_SET_DEBUGREGS, debugregs, "KVM_SET_DEBUGREGS")

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """Values of the given MSRs. KVM stops at the first one it cannot read: those are left out."""
        wanted = list(indices)
        buffer = FlexibleBuffer(uapi.kvm_msrs, uapi.kvm_msr_entry, len(wanted))
        buffer.header.nmsrs = len(wanted)
        for entry, index in zip(buffer.entries, wanted, strict=True):
            entry.index = index
        count = ioctl_ptr(self.fd, uapi.KVM_GET_MSRS, buffer.address, "KVM_GET_MSRS")
        return {int(entry.index): int(entry.data) for entry in buffer.entries[:count]}

    def set_msrs(self, values: Mapping[int, int]) -> int:
        """Write MSRs; returns how many KVM accepted (it stops at the first it refuses)."""
        buffer = FlexibleBuffer(uapi.kvm_msrs, uapi.kvm_msr_entry, len(values))
        buffer.header.nmsrs = len(values)
        for entry, (index, value) in zip(buffer.entries, values.items(), strict=True):
            entry.index = index
            entry.data = value
        return ioctl_ptr(self.fd, uapi.KVM_SET_MSRS, buffer.address, "KVM_SET_MSRS")

    def set_cpuid2(self, entries: Iterable[CpuidEntry]) -> None:
        wanted = list(entries)
        buffer = FlexibleBuffer(uapi.kvm_cpuid2, uapi.kvm_cpuid_entry2, len(wanted))
        buffer.header.nent = len(wanted)
        for raw, entry in zip(buffer.entries, wanted, strict=True):
            raw.function, raw.index, raw.flags = entry.function, entry.index, entry.flags
            raw.eax, raw.ebx, raw.ecx, raw.edx = entry.eax, entry.ebx, entry.ecx, entry.edx
        ioctl_ptr(self.fd, uapi.KVM_SET_CPUID2, buffer.address, "KVM_SET_CPUID2")

    def get_cpuid2(self, capacity: int = 256) -> tuple[CpuidEntry, ...]:
        buffer = FlexibleBuffer(uapi.kvm_cpuid2, uapi.kvm_cpuid_entry2, capacity)
        buffer.header.nent = capacity
        ioctl_ptr(self.fd, uapi.KVM_GET_CPUID2, buffer.address, "KVM_GET_CPUID2")
        return tuple(CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                     for e in buffer.entries[:buffer.header.nent])

    # --- interrupt and run state --------------------------------------------------------------
    def get_lapic(self) -> uapi.kvm_lapic_state:
        return self._get(uapi.kvm_lapic_state, uapi.KVM_GET_LAPIC, "KVM_GET_LAPIC")

    def set_lapic(self, lapic: uapi.kvm_lapic_state) -> None:
        ioctl_struct(self.fd, uapi.KVM_SET_LAPIC, lapic, "KVM_SET_LAPIC")

    def get_vcpu_events(self) -> uapi.kvm_vcpu_events:
        return self._get(uapi.kvm_vcpu_events, uapi.KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS")

    def set_vcpu_events(self, events: uapi.kvm_vcpu_events) -> None:
        ioctl_struct(self.fd, uapi.KVM_SET_VCPU_EVENTS, events, "KVM_SET_VCPU_EVENTS")

    def get_mp_state(self) -> int:
        state = self._get(uapi.kvm_mp_state, uapi.KVM_GET_MP_STATE, "KVM_GET_MP_STATE")
        return int(state.mp_state)

    def set_mp_state(self, mp_state: int) -> None:
        ioctl_struct(self.fd, uapi.KVM_SET_MP_STATE, uapi.kvm_mp_state(mp_state=mp_state), "KVM_SET_MP_STATE")

    def interrupt(self, vector: int) -> None:
        """Inject an external interrupt (only without an in-kernel irqchip)."""
        ioctl_struct(self.fd, uapi.KVM_INTERRUPT, uapi.kvm_interrupt(irq=vector), "KVM_INTERRUPT")

    def nmi(self) -> None:
        ioctl_int(self.fd, uapi.KVM_NMI, 0, "KVM_NMI")

    # --- debugging, translation, time -----------------------------------------------------------
    def set_guest_debug(self, control: int, debugreg: Iterable[int] = ()) -> None:
        request = uapi.kvm_guest_debug(control=control)
        for index, value in enumerate(debugreg):
            request.arch.debugreg[index] = value
        ioctl_struct(self.fd, uapi.KVM_SET_GUEST_DEBUG, request, "KVM_SET_GUEST_DEBUG")

    def translate(self, linear_address: int) -> uapi.kvm_translation:
        request = uapi.kvm_translation(linear_address=linear_address)
        ioctl_struct(self.fd, uapi.KVM_TRANSLATE, request, "KVM_TRANSLATE")
        return request

    def get_tsc_khz(self) -> int:
        return ioctl_int(self.fd, uapi.KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        ioctl_int(self.fd, uapi.KVM_SET_TSC_KHZ, khz, "KVM_SET_TSC_KHZ")

    def get_stats_fd(self) -> int:
        return ioctl_int(self.fd, uapi.KVM_GET_STATS_FD, 0, "KVM_GET_STATS_FD")

    # --- helpers --------------------------------------------------------------------------------
    def _get(self, kind: type[_S], request: int, name: str) -> _S:
        value = kind()
        ioctl_struct(self.fd, request, value, name)
        return value

    def close(self) -> None:
        """Unmap kvm_run and close the fd. The fd number is retired first, so a thread still using this
        object gets EBADF rather than reaching a file that reuses the number."""
        if self.fd < 0:
            return
        self.fd = -1
        try:
            self._decoder.close()
            self.run_page.close()
        finally:
            self._close_fd()

