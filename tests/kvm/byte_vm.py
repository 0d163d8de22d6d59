"""A minimal VM for hand-assembled byte guests: boot page tables and GDT, no irqchip, one vCPU at CPL0."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pyrovisor.arch.x86_64 import layout
from pyrovisor.arch.x86_64.boot import long_mode_entry
from pyrovisor.arch.x86_64.descriptors import boot_gdt, tss_image
from pyrovisor.arch.x86_64.paging import build_boot_page_tables
from pyrovisor.kvm import Cap, Kvm, VcpuFd, uapi
from pyrovisor.memory import GuestMemory, MemoryRegion
from pyrovisor.vstate.registers import apply_entry_state
from pyrovisor.vstate.vm import Memslot, Vm

CODE_GPA = 0x100000
MEMORY_SIZE = 16 << 20
UNBACKED_GPA = 0x10000000  # 256 MiB: mapped by the boot tables, no memslot


@dataclass
class ByteVm:
    kvm: Kvm
    vm: Vm
    memory: GuestMemory
    vcpus: list[VcpuFd]
    slot: Memslot

    @property
    def vcpu(self) -> VcpuFd:
        return self.vcpus[0]


@contextmanager
def byte_vm(code: bytes, memslot_flags: int = 0, vcpu_count: int = 1, dirty_ring_bytes: int = 0,
            irqchip: bool = False, manual_dirty_protect: bool = False) -> Iterator[ByteVm]:
    """Run `code` at CPL0 from CODE_GPA on every vCPU (RSI = vCPU index); CPL0 is emulated on kvm_pvm hosts."""
    kvm = Kvm()
    vm = Vm(kvm)
    memory = GuestMemory([MemoryRegion.anonymous(0, MEMORY_SIZE)])
    tables = build_boot_page_tables(layout.ram_ranges(MEMORY_SIZE), memory.write_u64,
                                    layout.PAGE_TABLES_GPA, layout.PAGE_TABLES_END)
    gdt = boot_gdt([layout.tss_gpa(index) for index in range(vcpu_count)])
    memory.write(layout.GDT_GPA, gdt)
    for index in range(vcpu_count):
        memory.write(layout.tss_gpa(index), tss_image())
    memory.write(CODE_GPA, code)
    if manual_dirty_protect:
        vm.fd.enable_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2, uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    if irqchip:
        vm.create_irqchip()
    slot = vm.add_memslot(memory.regions[0], memslot_flags)
    if dirty_ring_bytes:
        vm.fd.enable_cap(Cap.DIRTY_LOG_RING, dirty_ring_bytes)
    vcpus = [vm.create_vcpu(index) for index in range(vcpu_count)]
    for index, vcpu in enumerate(vcpus):
        vcpu.set_cpuid2(kvm.get_supported_cpuid())
        apply_entry_state(vcpu, long_mode_entry(index, CODE_GPA, tables.root, len(gdt) - 1, layout.BOOT_INFO_GPA))
    try:
        yield ByteVm(kvm, vm, memory, vcpus, slot)
    finally:
        for vcpu in vcpus:
            vcpu.close()
        vm.close()
        memory.close()
        kvm.close()


def imm64(value: int) -> bytes:
    return value.to_bytes(8, "little")


def imm32(value: int) -> bytes:
    return value.to_bytes(4, "little")


# Hand-assembled x86-64 instructions (Intel syntax in the names).
HLT = b"\xf4"
OUT_DX_AL = b"\xee"
OUT_DX_EAX = b"\xef"
IN_AL_DX = b"\xec"
MOV_EAX_DWORD_RBX = b"\x8b\x03"  # mov eax, [rbx]
MOV_DWORD_RBX_EAX = b"\x89\x03"  # mov [rbx], eax
JMP_SELF = b"\xeb\xfe"
INC_QWORD_RBX = b"\x48\xff\x03"  # inc qword [rbx]
JMP_BACK_5 = b"\xeb\xfb"  # jmp to the instruction 5 bytes before the next one
LEA_RBX_RSI8_PLUS = b"\x48\x8d\x1c\xf5"  # lea rbx, [rsi*8 + disp32]
INC_EAX = b"\xff\xc0"
DEC_ECX = b"\xff\xc9"


def mov_ecx(value: int) -> bytes:
    return b"\xb9" + imm32(value)


def jnz_back(distance: int) -> bytes:
    """jnz to `distance` bytes before the end of this 2-byte instruction."""
    return b"\x75" + (-distance & 0xFF).to_bytes(1, "little")


def mov_al(value: int) -> bytes:
    return b"\xb0" + bytes([value])


def mov_dx(port: int) -> bytes:
    return b"\x66\xba" + port.to_bytes(2, "little")


def mov_eax(value: int) -> bytes:
    return b"\xb8" + imm32(value)


def mov_rbx(value: int) -> bytes:
    return b"\x48\xbb" + imm64(value)


def out_imm8_al(port: int) -> bytes:
    return b"\xe6" + bytes([port])
