"""KVM features beyond plain exits, each exercised on a real VM: coalesced MMIO, ioeventfd, irqfd,
manual dirty-log protection with KVM_CLEAR_DIRTY_LOG, single-stepping."""

from __future__ import annotations

import os
import time

import pytest
from byte_vm import (
    DEC_ECX,
    HLT,
    INC_EAX,
    MOV_DWORD_RBX_EAX,
    UNBACKED_GPA,
    byte_vm,
    jnz_back,
    mov_al,
    mov_eax,
    mov_ecx,
    mov_rbx,
    out_imm8_al,
)
from test_dirty_log import set_bits, writes_to

from pyrovisor.devices.bus import Bus, PortBus
from pyrovisor.kvm import uapi
from pyrovisor.kvm.coalesced import CAPACITY, CoalescedRing
from pyrovisor.kvm.exits import Debug, Hlt, IoOut, MmioWrite
from pyrovisor.kvm.vm import IRQCHIP_PIC_MASTER, MEM_LOG_DIRTY_PAGES
from pyrovisor.vstate.run_control import RunControl, RunOutcome, StopReason
from pyrovisor.vstate.vcpu import Vcpu, VcpuArgs

pytestmark = pytest.mark.kvm


def store_loop(count: int) -> bytes:
    """mov [rbx], eax; inc eax — `count` times, eax starting at 0, then `out 0xf4` and hlt."""
    body = MOV_DWORD_RBX_EAX + INC_EAX + DEC_ECX
    return mov_rbx(UNBACKED_GPA) + mov_eax(0) + mov_ecx(count) + body + jnz_back(len(body) + 2) + \
        out_imm8_al(0xF4) + HLT


def test_coalesced_mmio_batches_writes_and_keeps_their_order() -> None:
    writes = 500
    with byte_vm(store_loop(writes)) as machine:
        machine.vm.fd.register_coalesced_mmio(UNBACKED_GPA, 4096)
        ring = CoalescedRing(machine.vcpu.coalesced_mmio_ring())
        values: list[int] = []
        exits = 0
        while True:
            result = machine.vcpu.run()
            exits += 1
            values += [int.from_bytes(write.data, "little") for write in ring.drain()]
            if isinstance(result, MmioWrite):  # the write that found the ring full
                values.append(result.value)
            elif isinstance(result, IoOut):
                break
        assert values == list(range(writes)), "every write arrives once, in order"
        assert exits <= writes // (CAPACITY - 1) + 2, f"{exits} exits for {writes} writes"
        ring.close()


class Recorder:
    """A device that records what it is written, tagged with its name."""

    def __init__(self, name: str, seen: list[tuple[str, int]]) -> None:
        self.name = name
        self.seen = seen

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.seen.append((self.name, value))


def test_coalesced_writes_reach_the_bus_before_the_exit_that_follows_them() -> None:
    """Through the vCPU run loop: the device sees all buffered writes, then the marker port write."""
    writes = 300
    with byte_vm(store_loop(writes)) as machine:
        machine.vm.fd.register_coalesced_mmio(UNBACKED_GPA, 4096)
        seen: list[tuple[str, int]] = []
        ports, mmio = PortBus(), Bus("MMIO")
        mmio.insert(UNBACKED_GPA, 4096, Recorder("mmio", seen), "recorder")
        ports.insert(0xF4, 1, Recorder("marker", seen), "marker")
        control = RunControl()
        vcpu = Vcpu(VcpuArgs(0, machine.vcpu, ports, mmio, control, machine.kvm, ()))
        vcpu.coalesced = CoalescedRing(machine.vcpu.coalesced_mmio_ring())
        try:
            vcpu.start()
            assert control.wait(10) == RunOutcome(StopReason.HALTED, vcpu=0)  # the final HLT
            assert vcpu.join(5)
        finally:
            vcpu.coalesced.close()
        assert seen == [("mmio", value) for value in range(writes)] + [("marker", writes & 0xFF)]  # out sends AL


def test_ioeventfd_counts_writes_without_exits() -> None:
    code = mov_rbx(UNBACKED_GPA) + b"".join(mov_eax(v) + MOV_DWORD_RBX_EAX for v in (7, 1, 7, 2, 7)) + \
        mov_al(1) + b"\x66\xba\x00\x06" + b"\xee" + out_imm8_al(0xF4) + HLT  # mov dx,0x600; out dx,al
    with byte_vm(code) as machine:
        any_value = os.eventfd(0, os.EFD_NONBLOCK)
        only_sevens = os.eventfd(0, os.EFD_NONBLOCK)
        port = os.eventfd(0, os.EFD_NONBLOCK)
        machine.vm.fd.ioeventfd(any_value, UNBACKED_GPA, 4)
        machine.vm.fd.ioeventfd(only_sevens, UNBACKED_GPA + 8, 4, datamatch=7)
        machine.vm.fd.ioeventfd(port, 0x600, 1, pio=True)
        result = machine.vcpu.run()
        assert isinstance(result, IoOut) and result.port == 0xF4, "no exit for the doorbell writes"
        assert os.eventfd_read(any_value) == 5
        assert os.eventfd_read(port) == 1
        with pytest.raises(BlockingIOError):
            os.eventfd_read(only_sevens)  # nothing was written at +8
        machine.vm.fd.ioeventfd(any_value, UNBACKED_GPA, 4, deassign=True)
        for fd in (any_value, only_sevens, port):
            os.close(fd)


def test_irqfd_raises_the_interrupt_line() -> None:
    with byte_vm(HLT, irqchip=True) as machine:
        doorbell = os.eventfd(0, os.EFD_NONBLOCK)
        machine.vm.fd.irqfd(doorbell, gsi=5)
        def irr() -> int:
            return int(machine.vm.fd.get_irqchip(IRQCHIP_PIC_MASTER).chip.pic.irr)

        assert not irr() & (1 << 5)
        os.eventfd_write(doorbell, 1)
        deadline = time.monotonic() + 2  # the kernel injects from a workqueue, not inside eventfd_write
        while not irr() & (1 << 5) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert irr() & (1 << 5)
        machine.vm.fd.irqfd(doorbell, gsi=5, deassign=True)
        os.close(doorbell)


def test_manual_protect_keeps_bits_until_cleared() -> None:
    pages = [0x400, 0x401, 0x555]
    code = writes_to(pages) + out_imm8_al(0xF4) + HLT
    with byte_vm(code, MEM_LOG_DIRTY_PAGES, manual_dirty_protect=True) as machine:
        slot, size = machine.slot.slot, machine.memory.size
        assert isinstance(machine.vcpu.run(), IoOut)
        assert set_bits(machine.vm.get_dirty_log(slot)) == pages
        assert set_bits(machine.vm.get_dirty_log(slot)) == pages, "manual protect: getting does not clear"
        clear = bytearray(size // 4096 // 8)
        clear[0x400 // 8] |= 1 << (0x400 % 8)
        clear[0x555 // 8] |= 1 << (0x555 % 8)
        machine.vm.fd.clear_dirty_log(slot, 0, size // 4096, clear)
        assert set_bits(machine.vm.get_dirty_log(slot)) == [0x401]


def test_single_step_reports_each_instruction() -> None:
    code = mov_al(1) + mov_al(2) + mov_al(3) + HLT  # three 2-byte instructions from 0x100000
    with byte_vm(code) as machine:
        machine.vcpu.set_guest_debug(uapi.KVM_GUESTDBG_ENABLE | uapi.KVM_GUESTDBG_SINGLESTEP)
        stops = []
        for _ in range(3):
            result = machine.vcpu.run()
            assert isinstance(result, Debug), result
            stops.append(result.pc)
        assert stops == [0x100002, 0x100004, 0x100006]
        machine.vcpu.set_guest_debug(0)
        assert isinstance(machine.vcpu.run(), Hlt)
