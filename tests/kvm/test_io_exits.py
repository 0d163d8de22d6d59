"""benchmarks/io_exits.py in small: per I/O mechanism, the userspace exits its writes cost and that each one arrived."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from pyrovisor.kvm.coalesced import CAPACITY

pytestmark = pytest.mark.kvm

WRITES = 10_000
BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "io_exits.py"


def load_benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("io_exits_benchmark", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


io_exits = load_benchmark()


@pytest.mark.parametrize("mode", io_exits.MODES)
def test_every_write_arrives_and_costs_the_exits_its_mechanism_implies(mode: str) -> None:
    result = io_exits.run_mode(mode, WRITES, timeout=120)
    assert result.guest_count == WRITES, result.console[-2000:]
    assert result.device_count == WRITES, f"{mode}: the device saw {result.device_count} of {WRITES} writes"
    assert len(result.delays_us) == WRITES and result.delay_percentile(50) > 0
    low, high = result.offset_bounds
    assert low <= result.offset <= high, "the TSC offset used is one the round trips allow"
    kvm = result.kvm_exits
    if mode == "trap":  # every write is an MMIO exit to the VMM (a stray signal could add an EINTR exit)
        assert WRITES <= result.user_exits <= WRITES + 2, result.user_exits
        assert not kvm or kvm["mmio_exits"] == WRITES
    elif mode == "coalesced":  # only the write that finds KVM's ring full exits; the rest wait in the ring
        assert abs(result.user_exits - WRITES // CAPACITY) <= 2, result.user_exits
    else:  # ioeventfd: KVM signals an eventfd and resumes the guest; polled: plain memory, nothing to trap
        assert result.user_exits <= 5, result.user_exits
    if kvm and mode in ("coalesced", "ioeventfd"):  # these still enter KVM for every write, they just stay there
        assert kvm["exits"] >= WRITES
    if kvm and mode == "polled":
        assert kvm["exits"] < WRITES // 10, kvm
