"""KVM_GET_DIRTY_LOG reports exactly the pages the guest wrote, round after round."""

from __future__ import annotations

import pytest
from byte_vm import HLT, MOV_DWORD_RBX_EAX, byte_vm, mov_eax, mov_rbx, out_imm8_al

from pyrovisor.kvm.exits import Hlt, IoOut
from pyrovisor.kvm.vm import MEM_LOG_DIRTY_PAGES

pytestmark = pytest.mark.kvm

ROUND_ONE = [0x400, 0x401, 0x555, 0xFFF]  # page numbers
ROUND_TWO = [0x402, 0x777]


def writes_to(pages: list[int]) -> bytes:
    code = mov_eax(0x5EED)
    for page in pages:
        code += mov_rbx(page * 4096 + 0x18) + MOV_DWORD_RBX_EAX
    return code


def set_bits(bitmap: bytearray) -> list[int]:
    return [index * 8 + bit for index, byte in enumerate(bitmap) for bit in range(8) if byte >> bit & 1]


def test_dirty_log_returns_exactly_the_written_pages() -> None:
    code = writes_to(ROUND_ONE) + out_imm8_al(0xF4) + writes_to(ROUND_TWO) + out_imm8_al(0xF4) + HLT
    with byte_vm(code, MEM_LOG_DIRTY_PAGES) as machine:
        slot = machine.slot.slot
        assert set_bits(machine.vm.get_dirty_log(slot)) == [], "host writes before the run are not logged"
        assert isinstance(machine.vcpu.run(), IoOut)
        assert set_bits(machine.vm.get_dirty_log(slot)) == ROUND_ONE
        assert isinstance(machine.vcpu.run(), IoOut)
        assert set_bits(machine.vm.get_dirty_log(slot)) == ROUND_TWO, "getting the log resets it"
        assert isinstance(machine.vcpu.run(), Hlt)
        assert set_bits(machine.vm.get_dirty_log(slot)) == []
        assert machine.memory.read_u32(0x555 * 4096 + 0x18) == 0x5EED
