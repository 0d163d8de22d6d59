"""The register state in which pyrovisor starts each vCPU: 64-bit long mode, paging on, CPL0."""

from __future__ import annotations

from dataclasses import dataclass

from pyrovisor.arch.x86_64.descriptors import (
    KERNEL_CODE_SEGMENT,
    KERNEL_DATA_SEGMENT,
    Segment,
    tss_segment,
)
from pyrovisor.arch.x86_64.layout import GDT_GPA, boot_stack_top, tss_gpa

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
RFLAGS_RESERVED = 1 << 1
RFLAGS_IF = 1 << 9

BOOT_CR0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
BOOT_CR4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
BOOT_EFER = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE


@dataclass(frozen=True)
class DescriptorTable:
    base: int
    limit: int


@dataclass(frozen=True)
class EntryState:
    """Everything KVM_SET_SREGS/KVM_SET_REGS need to start a vCPU at a 64-bit entry point."""

    code: Segment
    data: Segment
    tr: Segment
    gdt: DescriptorTable
    idt: DescriptorTable
    cr0: int
    cr3: int
    cr4: int
    efer: int
    rip: int
    rsp: int
    rflags: int
    rdi: int
    rsi: int


def long_mode_entry(vcpu_index: int, entry: int, page_table_root: int, gdt_limit: int,
                    boot_info_gpa: int) -> EntryState:
    """vCPU `vcpu_index` enters `entry` with RDI = boot info, RSI = its index, RSP = its boot stack.

    Interrupts are off and the IDT is empty: the guest installs its own before enabling them.
    """
    return EntryState(
        code=KERNEL_CODE_SEGMENT,
        data=KERNEL_DATA_SEGMENT,
        tr=tss_segment(tss_gpa(vcpu_index), vcpu_index),
        gdt=DescriptorTable(GDT_GPA, gdt_limit),
        idt=DescriptorTable(0, 0),
        cr0=BOOT_CR0,
        cr3=page_table_root,
        cr4=BOOT_CR4,
        efer=BOOT_EFER,
        rip=entry,
        rsp=boot_stack_top(vcpu_index),
        rflags=RFLAGS_RESERVED,
        rdi=boot_info_gpa,
        rsi=vcpu_index,
    )
