"""The 32-bit protected-mode entry state a Multiboot boot loader leaves: flat segments, paging off."""

from __future__ import annotations

import struct

from pyrovisor.arch.x86_64.boot import CR0_ET, CR0_PE, RFLAGS_RESERVED, DescriptorTable, EntryState
from pyrovisor.arch.x86_64.descriptors import Segment, flat_segment

FLAT_CS = 0x08
FLAT_DS = 0x10
# 4 GiB, base 0, 32-bit, accessed bit preset (VMX entry checks want it; the CPU never writes the GDT).
_FLAT_CODE32 = 0x00CF9B000000FFFF
_FLAT_DATA32 = 0x00CF93000000FFFF

FLAT_CODE_SEGMENT = flat_segment(_FLAT_CODE32, FLAT_CS)
FLAT_DATA_SEGMENT = flat_segment(_FLAT_DATA32, FLAT_DS)
# TR as after reset (a busy 32-bit TSS at 0): protected mode needs a usable TR, and the kernel loads its own.
RESET_TASK_REGISTER = Segment(base=0, limit=0xFFFF, selector=0, type=11, present=1, dpl=0, db=0, s=0, l=0, g=0)
PROTECTED_MODE_CR0 = CR0_PE | CR0_ET


def flat_gdt() -> bytes:
    """Null, flat 32-bit code (0x08), flat data (0x10): what the entry segments were loaded from."""
    return struct.pack("<QQQ", 0, _FLAT_CODE32, _FLAT_DATA32)


def protected_mode_entry(entry: int, gdt_base: int, stack_top: int) -> EntryState:
    """CS a flat 32-bit code segment, the others flat data, CR0 = PE|ET (paging, PAE and long mode off),
    interrupts off, no IDT. EAX and EBX (the Multiboot magic and information address) are set apart."""
    return EntryState(
        code=FLAT_CODE_SEGMENT,
        data=FLAT_DATA_SEGMENT,
        tr=RESET_TASK_REGISTER,
        gdt=DescriptorTable(gdt_base, len(flat_gdt()) - 1),
        idt=DescriptorTable(0, 0),
        cr0=PROTECTED_MODE_CR0,
        cr3=0,
        cr4=0,
        efer=0,
        rip=entry,
        rsp=stack_top,
        rflags=RFLAGS_RESERVED,
        rdi=0,
        rsi=0,
    )
