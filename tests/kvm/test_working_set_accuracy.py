"""The host's working-set estimate against the truth: the OS guest's `wset` program touches exactly the working
set its schedule names (reads, writes or both; uniformly or hot/cold), and prints what it touched."""

from __future__ import annotations

import re
import time

import pytest
from test_working_set import MiB, running_os

from pyrovisor.wss.estimator import WorkingSetEstimate, WorkingSetEstimator, WssSettings

pytestmark = pytest.mark.kvm

BASELINE = 4 * MiB  # what the kernel and the program's own code, stack and page tables touch besides the set
PHASE = re.compile(rb"wset 1: phase (\d+): ws_mib=(\d+) from t=(\d+)")


def true_working_set(output: bytearray) -> int:
    phases = PHASE.findall(output)
    assert phases, output.decode(errors="replace")[-500:]
    return int(phases[-1][1]) * MiB


def close_enough(estimate: WorkingSetEstimate, truth: int) -> bool:
    """Within ±10 % of the truth (plus the baseline the program and kernel add), or the truth inside the CI."""
    if estimate.low_bytes <= truth + BASELINE and truth <= estimate.high_bytes:
        return True
    return abs(estimate.estimate_bytes - truth - BASELINE / 2) <= 0.1 * truth + BASELINE / 2


@pytest.mark.parametrize("mode", ["read", "write", "mixed"])
def test_the_estimate_follows_a_scheduled_working_set(mode: str) -> None:
    with running_os(f"wset schedule=40:6,120:6 mode={mode} seconds=11") as (vmm, output):
        deadline = time.monotonic() + 30
        while not PHASE.search(output):
            assert time.monotonic() < deadline, output.decode(errors="replace")
            time.sleep(0.05)
        estimator = WorkingSetEstimator(vmm, WssSettings(sample_pages=3000, interval_s=0.8, seed=7))
        try:
            settled = []
            for _ in range(5):  # the first phase: 40 MiB (the program wrote all 120 MiB once at start)
                estimate = estimator.measure_once()
                assert estimate is not None
                settled.append((estimate, true_working_set(output)))
            while b"phase 1:" not in output:
                assert vmm.outcome is None, output.decode(errors="replace")[-500:]
                time.sleep(0.02)
            grown = [estimator.measure_once() for _ in range(2)]
        finally:
            estimator.close()
    for estimate, truth in settled[2:]:  # warmed up
        assert truth == 40 * MiB and close_enough(estimate, truth), (estimate, truth)
    reacted = [e for e in grown if e is not None and e.working_set_bytes >= 0.9 * 120 * MiB]
    assert reacted, f"growth to 120 MiB not seen within two intervals: {grown}"


def test_a_hot_and_cold_set_is_all_of_it_over_the_cold_period_and_the_hot_part_within_it() -> None:
    """hot_pct=25 of 80 MiB every 100 ms, the rest once every 2 s: intervals of 0.5 s see about the hot part plus
    a quarter of the cold part; intervals of 2.5 s see all of it."""
    with running_os("wset schedule=80:30 mode=read pattern=hotcold hot_pct=25 cold_period_ms=2000 seconds=25") as \
            (vmm, _):
        time.sleep(2.5)
        short = WorkingSetEstimator(vmm, WssSettings(sample_pages=3000, interval_s=0.5, seed=8))
        try:
            quick = [short.measure_once() for _ in range(4)]
        finally:
            short.close()
        long = WorkingSetEstimator(vmm, WssSettings(sample_pages=3000, interval_s=2.5, seed=9))
        try:
            whole = long.measure_once()
        finally:
            long.close()
    hot, cold = 20 * MiB, 60 * MiB
    expected_quick = hot + cold * 0.5 / 2.0
    assert all(e is not None and abs(e.estimate_bytes - expected_quick) < 0.25 * expected_quick + BASELINE
               for e in quick), ([e.estimate_bytes // MiB for e in quick if e], expected_quick // MiB)
    assert whole is not None and close_enough(whole, 80 * MiB), whole
