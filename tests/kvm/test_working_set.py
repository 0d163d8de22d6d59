"""The host's working-set estimate of the OS guest, by sampling pages with userfaultfd: close to what the guest's
programs really touch, invisible to the guest (its memory checks pass), cheap, and safe to stop at any time."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from pyrovisor.builder import build_vm
from pyrovisor.catalog import guests_dir
from pyrovisor.config import MachineConfig
from pyrovisor.errors import ConfigError
from pyrovisor.vmm import Vmm
from pyrovisor.wss.estimator import WorkingSetEstimate, WorkingSetEstimator, WssSettings
from pyrovisor.wss.sampler import PageSampler
from pyrovisor.wss.statistics import wilson_interval

pytestmark = pytest.mark.kvm

MiB = 1 << 20


@contextmanager
def running_os(programs: str, memory: int = 256 * MiB) -> Iterator[tuple[Vmm, bytearray]]:
    output = bytearray()
    config = MachineConfig(kernel=guests_dir() / "os.elf", initrd=guests_dir() / "os-programs.img",
                           memory_size=memory, vcpus=1, cmdline=programs)
    with build_vm(config, output.extend) as vmm:
        vmm.start()
        yield vmm, output


def estimates(vmm: Vmm, count: int, settings: WssSettings) -> list[WorkingSetEstimate]:
    estimator = WorkingSetEstimator(vmm, settings)
    try:
        results = []
        for _ in range(count):
            estimate = estimator.measure_once()
            assert estimate is not None
            results.append(estimate)
        return results
    finally:
        estimator.close()


def test_a_read_working_set_is_measured_and_the_guest_notices_nothing() -> None:
    """memcheck re-reads an 8 MiB... here 32 MiB pattern every 20 ms and fails if one word changes."""
    with running_os("memcheck mib=32 passes=0 interval_ms=20") as (vmm, output):
        deadline = time.monotonic() + 20
        while b"pass 3 ok" not in output:
            assert time.monotonic() < deadline, output.decode(errors="replace")
            time.sleep(0.05)
        results = estimates(vmm, 5, WssSettings(sample_pages=2000, interval_s=0.5, seed=1))
        time.sleep(0.2)
    console = output.decode(errors="replace")
    assert "FAILED" not in console and "bad words" in console
    passes = [int(match) for match in re.findall(r"pass (\d+) ok \(0 bad words", console)]
    assert len(passes) >= 20, "memcheck kept passing while its pages were sampled"
    for estimate in results[1:]:
        # the program's 32 MiB plus the kernel's and the process's own pages it touches each interval
        assert 30 * MiB <= estimate.high_bytes and estimate.low_bytes <= 40 * MiB, estimate
        assert estimate.low_bytes <= estimate.estimate_bytes <= estimate.high_bytes
    assert all(e.held_s < 0.5 for e in results), "the guest is held only to arm and disarm the sample"


def test_an_idle_guest_has_a_small_working_set_and_growth_is_seen() -> None:
    with running_os("counter count=0 period_ms=50; memcheck mib=96 passes=0 interval_ms=20 start_ms=4000") as \
            (vmm, output):
        time.sleep(0.5)
        estimator = WorkingSetEstimator(vmm, WssSettings(sample_pages=2000, interval_s=0.5, seed=2))
        try:
            idle = [estimator.measure_once() for _ in range(3)]
            deadline = time.monotonic() + 20
            while b"memcheck 2: pass 2 ok" not in output:
                assert time.monotonic() < deadline, output.decode(errors="replace")
                time.sleep(0.05)
            busy = [estimator.measure_once() for _ in range(2)]
        finally:
            estimator.close()
    assert all(e is not None and e.estimate_bytes < 12 * MiB for e in idle), idle
    first = busy[0]
    assert first is not None and first.high_bytes >= 90 * MiB, "growth shows in the first interval after it"
    assert first.estimate_bytes > first.fast_bytes > first.slow_bytes, "the fast average follows before the slow one"
    assert first.working_set_bytes == first.estimate_bytes, "the working set takes growth at once"


def test_close_in_the_middle_of_an_interval_leaves_memory_whole() -> None:
    with running_os("memdirty pages=4096 rate=40000 seconds=0; memcheck mib=8 passes=0 interval_ms=20") as \
            (vmm, output):
        time.sleep(1.0)
        estimator = WorkingSetEstimator(vmm, WssSettings(sample_pages=2000, interval_s=0.3, seed=3))
        estimator.start()
        time.sleep(1.2)
        estimator.close()  # in the middle of an interval: the sampled pages must go back
        assert not estimator.sampler.armed
        assert len(estimator.history) >= 2
        assert all(e.high_bytes > 24 * MiB for e in estimator.history), "memdirty's 16 MiB and memcheck's 8 MiB"
        time.sleep(0.5)
    assert b"FAILED" not in output and b"MISMATCH" not in output


def test_statistics_and_refusals() -> None:
    low, high = wilson_interval(250, 1000)
    assert 0.223 < low < 0.25 < high < 0.278
    assert wilson_interval(0, 0) == (0.0, 1.0) and wilson_interval(0, 100)[0] == 0.0
    with pytest.raises(ConfigError, match="sample pages"):
        WssSettings(sample_pages=3).validate()
    with running_os("counter count=0 period_ms=50", memory=64 * MiB) as (vmm, _):
        sampler = PageSampler(vmm.memory)
        try:
            assert sampler.total_pages == (64 * MiB) // 4096
        finally:
            sampler.close()


def test_the_vmm_can_read_and_write_sampled_pages_itself() -> None:
    """A device, a snapshot or a migration may touch a page while it is sampled, from a thread that holds the
    interpreter lock: the fault server (another process) must serve it, or the VMM would wait on itself."""
    with running_os("memcheck mib=8 passes=0 interval_ms=20") as (vmm, output):
        time.sleep(0.5)
        with vmm.paused("reference"):
            reference = [bytes(region.view) for region in vmm.memory.regions]
        sampler = PageSampler(vmm.memory, capacity=4096, seed=4)
        try:
            with vmm.paused("test"):
                before = [bytes(region.view) for region in vmm.memory.regions]
                sampler.arm(4096)
                after = [bytes(region.view) for region in vmm.memory.regions]  # every sampled page faults here
                first = vmm.memory.regions[0].gpa + 0x200000
                vmm.memory.write_u64(first, vmm.memory.read_u64(first))
                result, _ = sampler.disarm()
            assert after == before, "what the VMM reads of a sampled page is its content"
            assert result.touched >= 4000, "the VMM's own reads count as accesses"
        finally:
            sampler.close()
        assert len(reference) == len(after)
        time.sleep(0.3)
    assert b"FAILED" not in output
