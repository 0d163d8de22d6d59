"""KVM capabilities pyrovisor asks about, under their kernel names (KVM_CAP_*)."""

from __future__ import annotations

from enum import IntEnum

from pyrovisor.kvm import uapi


class Cap(IntEnum):
    """Argument of KVM_CHECK_EXTENSION. Values come from the generated uapi module."""

    IRQCHIP = uapi.KVM_CAP_IRQCHIP
    HLT = uapi.KVM_CAP_HLT
    USER_MEMORY = uapi.KVM_CAP_USER_MEMORY
    SET_TSS_ADDR = uapi.KVM_CAP_SET_TSS_ADDR
    EXT_CPUID = uapi.KVM_CAP_EXT_CPUID
    NR_VCPUS = uapi.KVM_CAP_NR_VCPUS
    MAX_VCPUS = uapi.KVM_CAP_MAX_VCPUS
    NR_MEMSLOTS = uapi.KVM_CAP_NR_MEMSLOTS
    MP_STATE = uapi.KVM_CAP_MP_STATE
    COALESCED_MMIO = uapi.KVM_CAP_COALESCED_MMIO
    COALESCED_PIO = uapi.KVM_CAP_COALESCED_PIO
    IOEVENTFD = uapi.KVM_CAP_IOEVENTFD
    IRQFD = uapi.KVM_CAP_IRQFD
    PIT2 = uapi.KVM_CAP_PIT2
    SET_GUEST_DEBUG = uapi.KVM_CAP_SET_GUEST_DEBUG
    VCPU_EVENTS = uapi.KVM_CAP_VCPU_EVENTS
    DEBUGREGS = uapi.KVM_CAP_DEBUGREGS
    XSAVE = uapi.KVM_CAP_XSAVE
    XSAVE2 = uapi.KVM_CAP_XSAVE2
    XCRS = uapi.KVM_CAP_XCRS
    ADJUST_CLOCK = uapi.KVM_CAP_ADJUST_CLOCK
    GET_TSC_KHZ = uapi.KVM_CAP_GET_TSC_KHZ
    TSC_CONTROL = uapi.KVM_CAP_TSC_CONTROL
    READONLY_MEM = uapi.KVM_CAP_READONLY_MEM
    IMMEDIATE_EXIT = uapi.KVM_CAP_IMMEDIATE_EXIT
    SYNC_REGS = uapi.KVM_CAP_SYNC_REGS
    SIGNAL_MSI = uapi.KVM_CAP_SIGNAL_MSI
    SPLIT_IRQCHIP = uapi.KVM_CAP_SPLIT_IRQCHIP
    MANUAL_DIRTY_LOG_PROTECT2 = uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    DIRTY_LOG_RING = uapi.KVM_CAP_DIRTY_LOG_RING
    DIRTY_LOG_RING_ACQ_REL = uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL
    X86_USER_SPACE_MSR = uapi.KVM_CAP_X86_USER_SPACE_MSR
    X86_MSR_FILTER = uapi.KVM_CAP_X86_MSR_FILTER
    X86_DISABLE_EXITS = uapi.KVM_CAP_X86_DISABLE_EXITS
    NESTED_STATE = uapi.KVM_CAP_NESTED_STATE
    SREGS2 = uapi.KVM_CAP_SREGS2
    BINARY_STATS_FD = uapi.KVM_CAP_BINARY_STATS_FD


# What `pyrovisor info` reports and why pyrovisor cares.
CAPABILITY_USES: dict[Cap, str] = {
    Cap.USER_MEMORY: "guest RAM from host memory (required)",
    Cap.IRQCHIP: "in-kernel LAPIC/IOAPIC/PIC (required)",
    Cap.IMMEDIATE_EXIT: "pausing and kicking vCPUs (required)",
    Cap.NR_VCPUS: "recommended vCPUs per VM",
    Cap.MAX_VCPUS: "maximum vCPUs per VM",
    Cap.NR_MEMSLOTS: "memory slots per VM",
    Cap.READONLY_MEM: "read-only memslots (write traps)",
    Cap.COALESCED_MMIO: "coalesced MMIO ring",
    Cap.COALESCED_PIO: "coalesced port I/O",
    Cap.IOEVENTFD: "ioeventfd doorbells",
    Cap.IRQFD: "irqfd interrupt injection",
    Cap.PIT2: "in-kernel PIT",
    Cap.XSAVE: "XSAVE state save/restore",
    Cap.XSAVE2: "XSAVE2 (size of the XSAVE area)",
    Cap.XCRS: "XCR0 save/restore",
    Cap.VCPU_EVENTS: "pending events save/restore",
    Cap.DEBUGREGS: "debug registers save/restore",
    Cap.MP_STATE: "vCPU run state save/restore",
    Cap.ADJUST_CLOCK: "kvmclock save/restore",
    Cap.GET_TSC_KHZ: "TSC frequency",
    Cap.TSC_CONTROL: "setting the guest TSC frequency",
    Cap.SET_GUEST_DEBUG: "single-step and breakpoints",
    Cap.MANUAL_DIRTY_LOG_PROTECT2: "manual dirty-log re-protection",
    Cap.DIRTY_LOG_RING: "dirty ring",
    Cap.DIRTY_LOG_RING_ACQ_REL: "dirty ring with acquire/release ordering",
    Cap.SYNC_REGS: "registers shared in kvm_run",
    Cap.X86_USER_SPACE_MSR: "MSR accesses forwarded to userspace",
    Cap.X86_MSR_FILTER: "MSR filters",
    Cap.NESTED_STATE: "nested virtualization state",
    Cap.SREGS2: "SREGS2 (PDPTRs)",
    Cap.BINARY_STATS_FD: "binary statistics (exit counters)",
}
