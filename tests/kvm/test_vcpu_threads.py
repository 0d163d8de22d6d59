"""vCPU threads: pause, resume and stop kick KVM_RUN; two vCPUs run at the same time."""

from __future__ import annotations

import time

import pytest
from byte_vm import INC_QWORD_RBX, JMP_BACK_5, LEA_RBX_RSI8_PLUS, byte_vm, imm32

from pyrovisor.devices.bus import Bus, PortBus
from pyrovisor.vstate.run_control import RunControl, RunOutcome, StopReason
from pyrovisor.vstate.vcpu import Vcpu, VcpuArgs

pytestmark = pytest.mark.kvm

COUNTERS = 0x200000
# Each vCPU increments its own counter at COUNTERS + 8 * index, forever.
SPIN = LEA_RBX_RSI8_PLUS + imm32(COUNTERS) + INC_QWORD_RBX + JMP_BACK_5


def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_pause_resume_and_stop_a_spinning_guest() -> None:
    with byte_vm(SPIN, vcpu_count=2) as machine:
        control = RunControl()
        vcpus = [Vcpu(VcpuArgs(index, fd, PortBus(), Bus("MMIO"), control, machine.kvm, ()))
                 for index, fd in enumerate(machine.vcpus)]
        counter = [lambda i=i: machine.memory.read_u64(COUNTERS + 8 * i) for i in range(2)]
        for vcpu in vcpus:
            vcpu.start()
        try:
            assert wait_until(lambda: counter[0]() > 1000 and counter[1]() > 1000), "both vCPUs make progress"
            hold = control.hold("test", timeout=10)
            assert control.parked
            frozen = [read() for read in counter]
            time.sleep(0.2)
            assert [read() for read in counter] == frozen, "paused vCPUs do not run"
            assert all(vcpu.counters.interrupted >= 1 for vcpu in vcpus), "the pause came by a kick"
            hold.release()
            assert wait_until(lambda: all(read() > value + 1000 for read, value in zip(counter, frozen, strict=False)))
        finally:
            control.finish(RunOutcome(StopReason.HOST_STOP))
            assert all(vcpu.join(5.0) for vcpu in vcpus), "stop reaches vCPUs stuck in guest code"
        assert control.outcome == RunOutcome(StopReason.HOST_STOP)
        assert not any(vcpu.running for vcpu in vcpus)
