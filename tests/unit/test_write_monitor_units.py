"""Write monitoring without KVM: memslot tiling, watch ranges, finding the writing instruction, request checks."""

from __future__ import annotations

import subprocess
import sys
from http import HTTPStatus
from typing import Any, cast

import pytest

from pyrovisor.api.monitor_routes import MonitorRoutes, guard_migration
from pyrovisor.api.server import ApiError
from pyrovisor.errors import ConfigError
from pyrovisor.introspect.watch import Watch
from pyrovisor.introspect.write_monitor import _runs
from pyrovisor.introspect.write_record import WriteRecorder
from pyrovisor.memory import MemoryRegion
from pyrovisor.vmm import Vmm
from pyrovisor.vstate.memslot_split import pieces, sub_region

PAGE = 4096


def test_read_only_runs_and_the_writable_gaps_tile_the_region_exactly() -> None:
    region = MemoryRegion.anonymous(0, 64 * PAGE)
    try:
        layout = pieces(region, [(10 * PAGE, 12 * PAGE), (0, PAGE), (63 * PAGE, 64 * PAGE)])
        assert layout == [(0, PAGE, True), (PAGE, 9 * PAGE, False), (10 * PAGE, 2 * PAGE, True),
                          (12 * PAGE, 51 * PAGE, False), (63 * PAGE, PAGE, True)]
        assert pieces(region, []) == [(0, 64 * PAGE, False)]
        with pytest.raises(ConfigError, match="page-aligned"):
            pieces(region, [(100, PAGE)])
        with pytest.raises(ConfigError, match="overlaps"):
            pieces(region, [(0, 2 * PAGE), (PAGE, 3 * PAGE)])
    finally:
        region.close()


def test_a_piece_shares_the_regions_memory_and_releases_it_on_close() -> None:
    region = MemoryRegion.anonymous(0x100000, 16 * PAGE)
    piece = sub_region(region, 0x100000 + 3 * PAGE, 2 * PAGE)
    assert piece.host_address == region.host_address + 3 * PAGE
    piece.view[0:4] = b"abcd"
    assert bytes(region.view[3 * PAGE:3 * PAGE + 4]) == b"abcd"
    with pytest.raises(ConfigError, match="outside"):
        sub_region(region, 0x100000 + 15 * PAGE, 2 * PAGE)
    piece.close()
    region.close()  # would fail while the piece still exported the mapping
    assert region.closed


def test_watched_pages_become_runs_and_a_watch_covers_only_its_bytes() -> None:
    watch = Watch(1, "physical", "x", ((0x10F018, 8), (0x200FFC, 8)))
    assert watch.pages() == {0x10F, 0x200, 0x201}
    assert _runs(sorted(watch.pages())) == [(0x10F000, 0x110000), (0x200000, 0x202000)]
    assert watch.covers(0x10F018, 8) and watch.covers(0x10F01F, 1) and watch.covers(0x201000, 4)
    assert not watch.covers(0x10F020, 8) and not watch.covers(0x10F010, 8)


class PagedMemory:
    """Guest memory with 4-level page tables mapping one code page at 0x400000 (and nothing else)."""

    CODE_VA = 0x400000
    CODE_PA = 0x9000

    def __init__(self, code: bytes) -> None:
        self.bytes = bytearray(0x10000)
        for table, next_table in ((0x1000, 0x2000), (0x2000, 0x3000), (0x3000, 0x4000)):
            index = {0x1000: 0, 0x2000: 0, 0x3000: 2}[table]  # PML4[0] -> PDPT[0] -> PD[2] (0x400000)
            self.write_u64(table + 8 * index, next_table | 0x7)
        self.write_u64(0x4000, self.CODE_PA | 0x7)  # PT[0]
        self.bytes[self.CODE_PA:self.CODE_PA + len(code)] = code

    def write_u64(self, address: int, value: int) -> None:
        self.bytes[address:address + 8] = value.to_bytes(8, "little")

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.bytes[gpa:gpa + size])

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.bytes[gpa:gpa + 8], "little")


def test_the_writing_instruction_is_the_one_that_ends_at_rip_with_the_writes_width() -> None:
    pytest.importorskip("capstone")
    # nop x16; mov qword ptr [rax], rdx (48 89 10); mov dword ptr [rbx], ecx (89 0b); ret
    code = b"\x90" * 16 + b"\x48\x89\x10" + b"\x89\x0b" + b"\xc3"
    recorder = WriteRecorder(PagedMemory(code), None)
    base = PagedMemory.CODE_VA
    assert recorder.writer(base + 19, 0x1000, 8) == (base + 16, "mov qword ptr [rax], rdx")
    assert recorder.writer(base + 21, 0x1000, 4) == (base + 19, "mov dword ptr [rbx], ecx")
    assert recorder.code_at(base + 0xFF8, 15, 0x1000) == bytes(8), "stops where the next page is not mapped"
    assert recorder.writer(0x800000, 0x1000, 8) == (None, None), "RIP in an unmapped page"


def _routes() -> MonitorRoutes:
    return MonitorRoutes(cast(Vmm, Any))  # validation happens before the VM is touched


@pytest.mark.parametrize(("body", "message"), [
    ({}, "exactly one of"),
    ({"gpa": 0x1000, "symbol": "syscall_table"}, "exactly one of"),
    ({"gva": 0x400000}, "needs the 'pid'"),
    ({"gpa": "0xzz"}, "must be an address"),
    ({"gpa": -5}, "must be an address"),
    ({"gpa": 0x1000, "size": 0}, "at least 1 byte"),
    ({"gpa": 0x1000, "pid": 1}, "'pid' goes with 'gva'"),
    ({"symbol": "syscall_table", "size": 8}, "takes no 'size'"),
    ({"symbol": ""}, "non-empty string"),
    ({"gpa": 0x1000, "log": ""}, "field 'log'"),
    ({"gpa": 0x1000, "colour": "red"}, "unknown field"),
])
def test_bad_requests_are_refused_before_anything_happens(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ApiError, match=message) as caught:
        _routes().add(body)
    assert caught.value.status == HTTPStatus.BAD_REQUEST


def test_migration_is_refused_only_while_watches_are_armed() -> None:
    calls: list[dict[str, Any]] = []

    def migrate(body: dict[str, Any]) -> dict[str, Any]:
        calls.append(body)
        return {"state": "migrating"}

    class NeverMonitored:
        pass

    vmm = cast(Vmm, NeverMonitored())  # no monitor was ever made for it
    assert guard_migration(vmm, migrate)({"to": "x"}) == {"state": "migrating"} and calls == [{"to": "x"}]


@pytest.mark.parametrize(("args", "message"), [
    (["add"], "one of the arguments --gpa --gva --symbol is required"),
    (["add", "--gpa", "zz"], "invalid address 'zz'"),
    (["add", "--gpa", "0x1000", "--size", "0"], "invalid size '0'"),
    (["add", "--gpa", "0x1000", "--symbol", "syscall_table"], "not allowed with argument"),
    (["frobnicate"], "invalid choice"),
])
def test_wrong_flags_are_one_line_errors(args: list[str], message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pyrovisor", "monitor", "/nonexistent.sock", *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr


def test_a_socket_nobody_serves_is_one_line() -> None:
    result = subprocess.run([sys.executable, "-m", "pyrovisor", "monitor", "/nonexistent.sock", "list"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert "no VMM control socket at /nonexistent.sock" in result.stderr
