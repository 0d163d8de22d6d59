"""Dirty tracking: the bitmap and the dirty ring report exactly the written pages; subscribers are independent."""

from __future__ import annotations

import time

import pytest
from byte_vm import HLT, MOV_DWORD_RBX_EAX, byte_vm, mov_eax, mov_rbx, out_imm8_al

from pyrovisor.builder import build_vm
from pyrovisor.catalog import load_catalog
from pyrovisor.config import MachineConfig
from pyrovisor.kvm.exits import DirtyRingFull, Hlt, IoOut
from pyrovisor.vstate.dirty import DirtyTracker, RingSource

pytestmark = pytest.mark.kvm

ROUND_ONE = [0x400, 0x401, 0x555, 0xFFF]
ROUND_TWO = [0x402, 0x777]


def writes_to(pages: list[int]) -> bytes:
    code = mov_eax(0x5EED)
    for page in pages:
        code += mov_rbx(page * 4096 + 0x18) + MOV_DWORD_RBX_EAX
    return code


def run_until_io(machine, tracker: DirtyTracker) -> object:
    """Run, harvesting on ring-full exits like the vCPU thread does, until a port write or HLT."""
    while True:
        result = machine.vcpu.run()
        if isinstance(result, DirtyRingFull):
            tracker.harvest()
            continue
        return result


@pytest.mark.parametrize("ring_entries", [0, 1024], ids=["bitmap", "ring"])
def test_exact_pages_round_after_round_and_independent_subscribers(ring_entries: int) -> None:
    code = writes_to(ROUND_ONE) + out_imm8_al(0xF4) + writes_to(ROUND_TWO) + out_imm8_al(0xF4) + HLT
    with byte_vm(code, dirty_ring_bytes=ring_entries * 16) as machine:
        rings = [machine.vcpu.map_dirty_ring(ring_entries * 16)] if ring_entries else []
        source = RingSource(machine.vm, rings) if rings else None
        tracker = DirtyTracker(machine.vm, machine.memory, source)
        first = tracker.subscribe()
        assert isinstance(run_until_io(machine, tracker), IoOut)
        second = tracker.subscribe()  # joins after round one
        machine.memory.write_u32(0xE00 * 4096, 1)  # a host-side write (a device, a loader)
        assert list(first.collect_pages()) == sorted([*ROUND_ONE, 0xE00])
        assert isinstance(run_until_io(machine, tracker), IoOut)
        assert list(first.collect_pages()) == ROUND_TWO, "collecting starts a new interval"
        assert list(second.collect_pages()) == sorted([*ROUND_TWO, 0xE00]), "the late subscriber saw only its part"
        assert isinstance(run_until_io(machine, tracker), Hlt)
        assert len(first.collect_pages()) == 0
        first.close()
        second.close()
        assert not tracker.active and not machine.vm.memslots[0].dirty_logging
        tracker.source.release()
        for ring in rings:
            ring.close()


def test_full_dirty_ring_exits_are_harvested_and_nothing_is_lost() -> None:
    """A user-mode writer with a ring far smaller than its working set: every page is still reported.

    (At CPL0, which kvm_pvm emulates, KVM does not stop for a full ring between emulated stores and
    overwrites entries; guests write from user mode, where each first write faults into KVM.)
    """
    region = range((17 << 20) // 4096, (25 << 20) // 4096)  # ticker: 1 MiB pattern at 16 MiB, then 8 MiB dirtied
    config = MachineConfig(kernel=load_catalog()["ticker"].elf, memory_size=128 << 20,
                           cmdline="ticks=0 period_ms=10 buffer_mib=1 dirty_mib=8 dirty_rate=20000",
                           dirty_ring_entries=256)
    output = bytearray()
    with build_vm(config, output.extend) as vmm:
        vmm.start()
        deadline = time.monotonic() + 20
        while b"tick 3 ok" not in output and time.monotonic() < deadline:
            time.sleep(0.01)
        log = vmm.dirty.subscribe()
        time.sleep(0.6)  # the whole region is rewritten every ~0.4 s
        pages = set(log.collect().intersection(region))
        ring_full_exits = vmm.vcpus[0].counters.other
        ticks_before = output.count(b" ok")
        time.sleep(0.2)
        assert output.count(b" ok") > ticks_before, "the guest keeps running"
        log.close()
    assert pages == set(region)
    assert ring_full_exits > 10
