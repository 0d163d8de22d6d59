"""Accounting without a VM: CR3 resolution against a process table, merging tallies, the rates `top` shows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from pyrovisor.api.top_commands import rates
from pyrovisor.errors import GuestMemoryError
from pyrovisor.introspect.accounting import Accountant, Owner
from pyrovisor.kvm import uapi
from pyrovisor.kvm.vcpu import CR3_WORD, VALID_REGS_OFFSET


@dataclass
class FakeProcess:
    pid: int
    name: str
    cr3: int
    state: str = "running"


@dataclass
class FakeKernel:
    root: int = 0x1000
    table: list[FakeProcess] = field(default_factory=list)
    broken: bool = False
    reads: int = 0

    def processes(self) -> list[FakeProcess]:
        self.reads += 1
        if self.broken:
            raise GuestMemoryError(0xdead000, 8, "not mapped")
        return self.table


def accountant(kernel: FakeKernel | None, vcpus: int = 2) -> Accountant:
    return Accountant(cast(Any, None), vcpus, cast(Any, kernel), None)


def test_the_cr3_offset_is_the_one_in_the_uapi_header() -> None:
    run = uapi.kvm_run()
    run.kvm_valid_regs = 0x2
    run.s.regs.sregs.cr3 = 0x1234_5000
    raw = bytes(run)
    assert int.from_bytes(raw[VALID_REGS_OFFSET:VALID_REGS_OFFSET + 8], "little") == uapi.KVM_SYNC_X86_SREGS
    assert int.from_bytes(raw[CR3_WORD * 8:CR3_WORD * 8 + 8], "little") == 0x1234_5000


def test_cr3_resolves_to_the_live_process_that_owns_it() -> None:
    kernel = FakeKernel(table=[FakeProcess(1, "old", 0x5000, "exited"), FakeProcess(2, "shell", 0x6000),
                               FakeProcess(3, "new", 0x5000)])
    books = accountant(kernel)
    assert books.resolve(0x5000) == Owner(3, "new", 0x5000), "a live process wins over an exited one"
    assert books.resolve(0x6000 | 0x18) == Owner(2, "shell", 0x6000), "PCD/PWT bits are not part of the address"
    assert books.resolve(0x1000) == Owner(0, "kernel", 0x1000)
    assert books.resolve(0x9000) == Owner(None, "unknown", 0x9000)
    kernel.broken = True
    assert books.resolve(0x5000) == Owner(None, "unresolved", 0x5000), "a table being rewritten never raises"
    assert accountant(None).resolve(0x5000) == Owner(None, "cr3 0x5000", 0x5000)


def test_a_process_seen_on_two_vcpus_is_one_row_with_both_summed() -> None:
    kernel = FakeKernel(table=[FakeProcess(7, "worker", 0x7000), FakeProcess(8, "idle", 0x8000)])
    books = accountant(kernel)
    first = books.accounts[0].tally_for(0x7000)
    first[("pio", 0x510)] = [10, 1000]
    second = books.accounts[1].tally_for(0x7000)
    second[("pio", 0x510)] = [5, 500]
    second[("mmio", 0xD0000000)] = [2, 300]
    assert books.accounts[0].tally_for(0x7000) is first, "the same owner keeps its table on one vCPU"
    books.accounts[1].tally_for(0x8000)[("hlt", 0)] = [1, 50]
    rows = {row["pid"]: row for row in books.report()["processes"]}
    worker = rows[7]
    assert worker["vcpus"] == [0, 1] and worker["total"] == 17 and worker["vmm_cpu_ns"] == 1800
    assert worker["exits"] == {"pio": 15, "mmio": 2, "hlt": 0, "interrupted": 0, "other": 0}
    assert worker["targets"] == [{"kind": "mmio", "where": 0xD0000000, "count": 2, "vmm_cpu_ns": 300},
                                 {"kind": "pio", "where": 0x510, "count": 15, "vmm_cpu_ns": 1500}]
    assert rows[8]["exits"]["hlt"] == 1
    assert books.report()["resolutions"] == 3, "vCPU 0's second look at 0x7000 came from its cache"


def test_a_cr3_reused_by_a_new_process_is_charged_to_the_new_one_once_the_pid_counter_moves() -> None:
    kernel = FakeKernel(table=[FakeProcess(1, "first", 0x5000)])
    books = accountant(kernel, vcpus=1)
    account = books.accounts[0]
    account.tally_for(0x5000, generation=2)[("pio", 0x510)] = [3, 30]
    kernel.table = [FakeProcess(1, "first", 0x5000, "exited"), FakeProcess(2, "second", 0x5000)]
    account.tally_for(0x5000, generation=2)[("pio", 0x510)][0] += 1  # same generation: the cached owner
    assert kernel.reads == 1
    account.tally_for(0x5000, generation=3)[("pio", 0x510)] = [7, 70]
    assert kernel.reads == 2
    rows = {row["name"]: row["exits"]["pio"] for row in books.report()["processes"]}
    assert rows == {"first": 4, "second": 7}
    kernel.broken = True
    account.tally_for(0x9000, generation=3)
    account.tally_for(0x9000, generation=3)
    assert kernel.reads == 4, "a failed resolution is not cached"


def test_top_turns_two_readings_into_rates_and_shares() -> None:
    def reading(pio: int, mmio: int, cpu_a: int, cpu_b: int) -> dict[str, Any]:
        return {"processes": [
            {"pid": 1, "name": "a", "cr3": 0x5000, "exits": {"pio": pio, "mmio": 0}, "vmm_cpu_ns": cpu_a},
            {"pid": 2, "name": "b", "cr3": 0x6000, "exits": {"pio": 0, "mmio": mmio}, "vmm_cpu_ns": cpu_b}]}

    result = rates(reading(100, 0, 1_000_000, 0), reading(300, 50, 4_000_000, 1_000_000), 2.0)
    assert [rate.pid for rate in result] == [1, 2]
    a, b = result
    assert a.exits_per_s["pio"] == 100 and a.total_per_s == 100 and a.vmm_cpu_ms_per_s == pytest.approx(1.5)
    assert b.exits_per_s["mmio"] == 25 and b.vmm_cpu_ms_per_s == pytest.approx(0.5)
    assert a.share == pytest.approx(0.75) and b.share == pytest.approx(0.25)
    newcomer = rates({"processes": []}, reading(4, 2, 0, 0), 1.0)
    assert {rate.pid: rate.total_per_s for rate in newcomer} == {1: 4, 2: 2}
    assert all(rate.share == 0 for rate in newcomer), "no CPU time: no share, no division by zero"
