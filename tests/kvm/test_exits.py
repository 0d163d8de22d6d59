"""Real KVM exits from byte guests: port I/O, MMIO to unbacked memory, HLT, read-only memslots."""

from __future__ import annotations

import pytest
from byte_vm import (
    HLT,
    IN_AL_DX,
    MOV_DWORD_RBX_EAX,
    MOV_EAX_DWORD_RBX,
    OUT_DX_AL,
    OUT_DX_EAX,
    UNBACKED_GPA,
    byte_vm,
    mov_al,
    mov_dx,
    mov_eax,
    mov_rbx,
)

from pyrovisor.kvm.exits import Hlt, IoIn, IoOut, MmioRead, MmioWrite
from pyrovisor.kvm.vm import MEM_READONLY
from pyrovisor.memory import MemoryRegion

pytestmark = pytest.mark.kvm


def test_pio_out_then_hlt() -> None:
    with byte_vm(mov_al(0x41) + mov_dx(0x3F8) + OUT_DX_AL + HLT) as machine:
        first = machine.vcpu.run()
        assert isinstance(first, IoOut)
        assert (first.port, first.size, first.data, first.value) == (0x3F8, 1, b"A", 0x41)
        assert isinstance(machine.vcpu.run(), Hlt)


def test_pio_in_value_reaches_the_guest() -> None:
    code = mov_dx(0x60) + IN_AL_DX + mov_dx(0x61) + OUT_DX_AL + HLT
    with byte_vm(code) as machine:
        request = machine.vcpu.run()
        assert isinstance(request, IoIn) and (request.port, request.size, request.count) == (0x60, 1, 1)
        request.respond(0x5A)
        echo = machine.vcpu.run()
        assert isinstance(echo, IoOut) and (echo.port, echo.value) == (0x61, 0x5A)


def test_mmio_write_to_unbacked_address() -> None:
    code = mov_rbx(UNBACKED_GPA + 0x10) + mov_eax(0xDEADBEEF) + MOV_DWORD_RBX_EAX + HLT
    with byte_vm(code) as machine:
        write = machine.vcpu.run()
        assert isinstance(write, MmioWrite)
        assert (write.address, write.data, write.value) == (UNBACKED_GPA + 0x10, b"\xef\xbe\xad\xde", 0xDEADBEEF)
        assert isinstance(machine.vcpu.run(), Hlt)


def test_mmio_read_from_unbacked_address() -> None:
    code = mov_rbx(UNBACKED_GPA) + MOV_EAX_DWORD_RBX + mov_dx(0x80) + OUT_DX_EAX + HLT
    with byte_vm(code) as machine:
        read = machine.vcpu.run()
        assert isinstance(read, MmioRead) and (read.address, read.size) == (UNBACKED_GPA, 4)
        read.respond(0x12345678)
        out = machine.vcpu.run()
        assert isinstance(out, IoOut) and (out.port, out.size, out.value) == (0x80, 4, 0x12345678)


def test_hlt_exits_without_an_irqchip() -> None:
    with byte_vm(HLT) as machine:
        assert isinstance(machine.vcpu.run(), Hlt)
        assert machine.vcpu.get_regs().rip == 0x100001


def test_write_to_readonly_memslot_arrives_as_mmio_and_leaves_memory_unchanged() -> None:
    readonly_gpa = 0x2000000  # 32 MiB, past the 16 MiB of RAM
    code = (mov_rbx(readonly_gpa + 0x20) + MOV_EAX_DWORD_RBX + mov_dx(0x80) + OUT_DX_EAX
            + mov_eax(0xCAFEF00D) + MOV_DWORD_RBX_EAX + HLT)
    with byte_vm(code) as machine:
        region = MemoryRegion.anonymous(readonly_gpa, 2 << 20)
        region.view[0x20:0x24] = (0x11223344).to_bytes(4, "little")
        machine.vm.add_memslot(region, MEM_READONLY)
        read_back = machine.vcpu.run()
        assert isinstance(read_back, IoOut) and read_back.value == 0x11223344, "reads are served from memory"
        trapped = machine.vcpu.run()
        assert isinstance(trapped, MmioWrite)
        assert (trapped.address, trapped.value, len(trapped.data)) == (readonly_gpa + 0x20, 0xCAFEF00D, 4)
        assert isinstance(machine.vcpu.run(), Hlt)
        assert bytes(region.view[0x20:0x24]) == (0x11223344).to_bytes(4, "little")
        machine.vm.remove_memslot(machine.vm.memslots[-1].slot)
        region.close()
