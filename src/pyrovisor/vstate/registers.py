"""Conversions between the architecture's plain register dataclasses and KVM's structs."""

from __future__ import annotations

from pyrovisor.arch.x86_64.boot import EntryState
from pyrovisor.arch.x86_64.descriptors import Segment
from pyrovisor.kvm import VcpuFd, uapi

DATA_SEGMENT_NAMES = ("ds", "es", "fs", "gs", "ss")


def to_kvm_segment(segment: Segment) -> uapi.kvm_segment:
    return uapi.kvm_segment(base=segment.base, limit=segment.limit, selector=segment.selector, type=segment.type,
                            present=segment.present, dpl=segment.dpl, db=segment.db, s=segment.s, l=segment.l,
                            g=segment.g, avl=segment.avl, unusable=segment.unusable)


def from_kvm_segment(raw: uapi.kvm_segment) -> Segment:
    return Segment(base=raw.base, limit=raw.limit, selector=raw.selector, type=raw.type, present=raw.present,
                   dpl=raw.dpl, db=raw.db, s=raw.s, l=raw.l, g=raw.g, avl=raw.avl, unusable=raw.unusable)


def apply_entry_state(vcpu: VcpuFd, state: EntryState) -> None:
    """Load an entry state into a vCPU, keeping what KVM initialised that the state does not say (APIC base)."""
    sregs = vcpu.get_sregs()
    sregs.cs = to_kvm_segment(state.code)
    for name in DATA_SEGMENT_NAMES:
        setattr(sregs, name, to_kvm_segment(state.data))
    sregs.tr = to_kvm_segment(state.tr)
    sregs.gdt.base, sregs.gdt.limit = state.gdt.base, state.gdt.limit
    sregs.idt.base, sregs.idt.limit = state.idt.base, state.idt.limit
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = state.cr0, state.cr3, state.cr4, state.efer
    vcpu.set_sregs(sregs)
    regs = uapi.kvm_regs()
    regs.rip, regs.rsp, regs.rflags = state.rip, state.rsp, state.rflags
    regs.rdi, regs.rsi = state.rdi, state.rsi
    vcpu.set_regs(regs)
