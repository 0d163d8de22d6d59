"""The address-only write-monitor mode (userfaultfd write protection) on the real OS guest: kwriter's writes are
caught with their page and vCPU, a VMM thread's write is caught as "vmm" without a deadlock, removing the watch
gives the page its speed back, watches survive snapshots, bad modes are one line."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import VmmProcess
from test_write_monitor import ROUND, SYS_GETPID, os_vm, records_of, unmonitored_output, without_timings

from pyrovisor.builder import restore_vm
from pyrovisor.capture import Console
from pyrovisor.errors import ConfigError
from pyrovisor.introspect import guest_profile
from pyrovisor.introspect.write_monitor import existing_monitor, monitor_of
from pyrovisor.kvm.vm import MEM_READONLY
from pyrovisor.snapshot.take import take_snapshot

pytestmark = pytest.mark.kvm

PAGE = 4096


def _table_gpa() -> int:
    profile = guest_profile()
    return profile.image_physical(profile.symbol("syscall_table").address)


def test_kwriter_under_a_uffd_watch_is_recorded_by_page_and_vcpu_and_the_guest_does_not_notice(
        tmp_path: Path) -> None:
    # Rounds 100 ms apart: the page is protected again 1 ms after a catch, or later when the fault server waits for
    # a CPU on a busy host, and each round must find it protected again.
    programs = "kwriter count=3 period_ms=100"
    plain_text = unmonitored_output(programs)

    watched = Console()
    log = tmp_path / "writes.jsonl"
    with os_vm(programs, watched) as vmm:
        monitor = monitor_of(vmm)
        watch = monitor.watch_symbol("syscall_table", log=str(log), mode="uffd")
        assert watch.mode == "uffd" and monitor.describe(watch)["mode"] == "uffd"
        assert not [slot for slot in vmm.vm.memslots if slot.flags & MEM_READONLY], "uffd mode keeps the RW slot"
        assert vmm.run(timeout=60).exit_code == 0
        caught = monitor.describe(watch)["writes"]

    assert without_timings(watched.text()) == without_timings(plain_text)
    assert "PASS: kwriter 1: getpid was hooked" in watched.text()
    assert len(ROUND.findall(watched.text())) == 3
    table = _table_gpa()
    entry = table + 8 * SYS_GETPID
    records = records_of(log)
    assert isinstance(caught, int) and caught == len(records) >= 3, records  # a hook and its unhook may be one
    for record in records:
        assert record["mode"] == "uffd" and record["watch"] == watch.id
        assert record["page"] == f"{table & ~(PAGE - 1):#x}"
        assert record["vcpu"] == 0, record
        assert "rip" not in record and "instruction" not in record and "old" not in record
    assert f"{entry:#x}" in {record["address"] for record in records}, "the exact address of getpid's entry"
    times = [float(str(record["time"])) for record in records]
    assert times == sorted(times)


def test_a_vmm_thread_writing_a_watched_page_is_not_blocked_and_is_recorded_as_vmm() -> None:
    console = Console()
    with os_vm("kwriter count=1", console) as vmm:
        monitor = monitor_of(vmm)
        watch = monitor.watch_symbol("syscall_table", mode="uffd")
        entry = _table_gpa() + 8 * SYS_GETPID
        value = vmm.memory.read(entry, 8)
        writer = threading.Thread(target=vmm.memory.write, args=(entry, value), daemon=True)
        writer.start()  # this process's thread, holding the GIL while it stores: the server must answer it
        writer.join(10)
        assert not writer.is_alive(), "the VMM's own write to a protected page was never answered"
        deadline = time.monotonic() + 10
        while not monitor.recent and time.monotonic() < deadline:
            time.sleep(0.01)
        records = list(monitor.recent)
        assert [(record["vcpu"], record["address"], record["watch"]) for record in records] == \
            [("vmm", f"{entry:#x}", watch.id)]
        # A page nobody has touched yet (no host page-table entry) is protected as well: its first write is seen.
        untouched = vmm.memory.size - (4 << 20) + 0x18  # a page nothing has written yet
        fresh = monitor.watch_physical(untouched, 8, mode="uffd")
        vmm.memory.write(untouched, b"written!")
        while len(monitor.recent) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [(record["vcpu"], record["address"], record["watch"]) for record in monitor.recent][1:] == \
            [("vmm", f"{untouched:#x}", fresh.id)]
        assert vmm.memory.read(untouched, 8) == b"written!"
        monitor.remove(fresh.id)
        assert vmm.run(timeout=60).exit_code == 0, console.text()
        guest = [record for record in monitor.recent if record["vcpu"] == 0 and record["watch"] == watch.id]
        assert guest, "the guest's writes after the VMM's are caught too"
    assert "PASS: kwriter 1: the table entry was restored each time" in console.text()


def _rate(read: Callable[[int], int], gpa: int, seconds: float) -> float:
    """How fast the guest advances the counter at `gpa` (increments per second)."""
    first = read(gpa)
    time.sleep(seconds)
    return (read(gpa) - first) / seconds


def test_a_watch_catches_once_per_window_and_nothing_once_removed() -> None:
    console = Console()
    with os_vm("memdirty pages=1 rate=0 seconds=60 page=4k", console) as vmm:
        vmm.start()
        base = int(console.wait_for(r"^memdirty 1: 1 pages at (0x\w+),")[1], 16)
        monitor = monitor_of(vmm)
        watch = monitor.watch_virtual(1, base, 16, mode="uffd")
        counter = watch.ranges[0][0] + 8  # memdirty's counter, word 1 of its page
        monitor.remove(watch.id)
        watch = monitor.watch_virtual(1, base, 16, mode="uffd")
        time.sleep(0.2)
        started, first = time.monotonic(), monitor.describe(watch)["writes"]
        watched = _rate(vmm.memory.read_u64, counter, 1.0)
        caught = monitor.describe(watch)["writes"]
        faults_per_s = (caught - first) / (time.monotonic() - started)
        monitor.remove(watch.id)
        time.sleep(0.1)
        after = len(monitor.recent)
        free = _rate(vmm.memory.read_u64, counter, 0.5)
        assert len(monitor.recent) == after, "nothing is caught once the watch is removed"
        vmm.stop()
    # One record per protection window (1 ms): the guest's writes in between run natively, so at most about a
    # thousand catches a second however fast it writes. (Its speed with and without a watch is measured in
    # benchmarks/write_monitor.py, not here.)
    assert 0 < faults_per_s <= 1100, faults_per_s
    assert watched > 0 and free > 0, "the guest kept writing under the watch and after it"


def test_a_uffd_watch_survives_snapshot_and_restore(tmp_path: Path) -> None:
    console = Console()
    log = tmp_path / "writes.jsonl"
    with os_vm("kwriter count=12 period_ms=200", console) as vmm:
        monitor = monitor_of(vmm)
        watch = monitor.watch_symbol("syscall_table", log=str(log), mode="uffd")
        vmm.start()
        console.wait_for(r"^kwriter 1: round 2: ")
        take_snapshot(vmm, tmp_path / "snap")
    before = len(records_of(log))
    assert before >= 2

    restored_console = Console()
    with restore_vm(tmp_path / "snap", restored_console.write, lazy=False) as restored:  # anonymous RAM
        restored_monitor = existing_monitor(restored)
        assert restored_monitor is not None and restored_monitor.watches == (watch,)
        assert not [slot for slot in restored.vm.memslots if slot.flags & MEM_READONLY]
        assert restored.run(timeout=60).exit_code == 0
        caught = restored_monitor.describe(watch)["writes"]
    assert "PASS: kwriter 1: the table entry was restored each time" in restored_console.text()
    rounds_after = len(ROUND.findall(restored_console.text()))
    assert rounds_after >= 9
    after = records_of(log)[before:]
    assert isinstance(caught, int) and len(after) == caught >= rounds_after, (caught, rounds_after)
    assert {(record["mode"], record["vcpu"]) for record in after} == {("uffd", 0)}

    # Restored lazily (RAM mapped from the snapshot's file, which userfaultfd cannot write-protect): the watch
    # comes back in memslot mode, with a warning, and still catches every write.
    with restore_vm(tmp_path / "snap", Console().write) as lazy:
        lazy_monitor = existing_monitor(lazy)
        assert lazy_monitor is not None and [each.mode for each in lazy_monitor.watches] == ["memslot"]
        assert [slot.region.size for slot in lazy.vm.memslots if slot.flags & MEM_READONLY] == [4096]
        with pytest.raises(ConfigError, match="cannot be write-protected with userfaultfd"):
            lazy_monitor.watch_symbol("syscall_table", mode="uffd")
        assert lazy.run(timeout=60).exit_code == 0
        assert lazy_monitor.describe(lazy_monitor.watches[0])["writes"] == 2 * rounds_after


def test_an_unknown_mode_is_refused_in_python() -> None:
    with os_vm("kwriter count=1", Console()) as vmm:
        with pytest.raises(ConfigError, match="expected memslot or uffd"):
            monitor_of(vmm).watch_symbol("syscall_table", mode="ept")
        assert vmm.run(timeout=60).exit_code == 0


def _monitor_cli(socket_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyrovisor", "monitor", str(socket_path), *args],
                          capture_output=True, text=True, timeout=60)


def test_the_monitor_command_in_uffd_mode(tmp_path: Path) -> None:
    socket_path = tmp_path / "api.sock"
    log = tmp_path / "cli.jsonl"
    vmm = VmmProcess(["run", "os-kwriter", "--args", "kwriter count=150 period_ms=20"], socket_path)
    try:
        vmm.wait_for(lambda: any(line.startswith("kwriter 1: round 1:") for line in vmm.lines), "kwriter's round 1")
        bad = _monitor_cli(socket_path, "add", "--symbol", "syscall_table", "--mode", "ept")
        assert bad.returncode == 1 and bad.stdout == "", bad
        assert len(bad.stderr.splitlines()) == 1 and "'memslot' or 'uffd'" in bad.stderr, bad.stderr
        assert vmm.api.get("/status")["state"] == "running"

        added = _monitor_cli(socket_path, "add", "--symbol", "syscall_table", "--mode", "uffd", "--log", str(log),
                             "--json")
        assert added.returncode == 0, added.stderr
        watch = json.loads(added.stdout)
        assert watch["mode"] == "uffd" and watch["pages"] == 1
        vmm.wait_for(lambda: vmm.api.get("/monitor")["watches"][0]["writes"] >= 4, "caught writes")
        records = json.loads(_monitor_cli(socket_path, "records", "--json").stdout)["records"]
        assert records and all(record["mode"] == "uffd" and record["vcpu"] == 0 for record in records)
        text = _monitor_cli(socket_path, "records")
        assert text.returncode == 0 and "uffd" in text.stdout and "vcpu 0" in text.stdout, text
        listing = _monitor_cli(socket_path, "list")
        assert "uffd" in listing.stdout, listing
        removed = _monitor_cli(socket_path, "remove", str(watch["id"]), "--json")
        assert removed.returncode == 0 and json.loads(removed.stdout)["writes"] >= 4
        caught = len(records_of(log))
        code, stderr = vmm.finish(timeout=60)
        assert code == 0, stderr
        assert "PASS: kwriter 1: the table entry was restored each time" in vmm.text()
        assert len(records_of(log)) == caught, "nothing is logged once the watch is removed"
    finally:
        vmm.kill()
