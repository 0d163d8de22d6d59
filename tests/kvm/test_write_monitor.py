"""Write monitoring on the real OS guest: kwriter's patches of the system-call table are trapped, logged with the
process, RIP and instruction, and performed; unwatched pages keep their speed; watches survive snapshots."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from harness import VmmProcess

from pyrovisor.arch.x86_64.layout import IOAPIC_GPA, VIRTIO_MMIO_BASE
from pyrovisor.builder import build_vm, restore_vm
from pyrovisor.capture import Console
from pyrovisor.catalog import guests_dir
from pyrovisor.config import MachineConfig
from pyrovisor.errors import ControlError
from pyrovisor.introspect import guest_profile
from pyrovisor.introspect.write_monitor import existing_monitor, monitor_of
from pyrovisor.kvm.vm import MEM_READONLY
from pyrovisor.snapshot.take import take_snapshot
from pyrovisor.vmm import Vmm

pytestmark = pytest.mark.kvm

MiB = 1 << 20
SYS_GETPID = 3
ROUND = re.compile(r"^kwriter 1: round (\d+): syscall_table\[3\] at (0x\w+): (0x\w+) -> (0x\w+), ", re.MULTILINE)
TIME_DEPENDENT = (re.compile(r"getpid gave \d+"), re.compile(r"after \d+ ms"), re.compile(r"\d+ ticks \(\d+ idle\)"))


def os_vm(programs: str, console: Console, memory: int = 64 * MiB) -> Vmm:
    directory = guests_dir()
    config = MachineConfig(kernel=directory / "os.elf", memory_size=memory, vcpus=1, cmdline=programs,
                           initrd=directory / "os-programs.img")
    return build_vm(config, console.write)


def without_timings(text: str) -> str:
    for pattern in TIME_DEPENDENT:
        text = pattern.sub("<time>", text)
    return text


def unmonitored_output(programs: str) -> str:
    """What the OS guest prints running `programs` without any watch: what a monitored run must print too."""
    plain = Console()
    with os_vm(programs, plain) as vmm:
        assert vmm.run(timeout=60).exit_code == 0
    return plain.text()


def records_of(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_kwriter_patches_are_logged_with_process_rip_and_instruction_and_the_guest_does_not_notice(
        tmp_path: Path) -> None:
    programs = "kwriter count=3 period_ms=10"
    plain_text = unmonitored_output(programs)
    watched = Console()
    log = tmp_path / "writes.jsonl"
    with os_vm(programs, watched) as vmm:
        monitor = monitor_of(vmm)
        watch = monitor.watch_symbol("syscall_table", log=str(log))
        readonly = [slot for slot in vmm.vm.memslots if slot.flags & MEM_READONLY]
        assert [(slot.region.gpa, slot.region.size) for slot in readonly] == [(watch.ranges[0][0] & ~0xFFF, 4096)]
        assert vmm.run(timeout=60).exit_code == 0
        assert monitor.describe(watch)["writes"] == 6

    assert without_timings(watched.text()) == without_timings(plain_text)
    assert "PASS: kwriter 1: getpid was hooked" in watched.text()
    profile = guest_profile()
    table = profile.image_physical(profile.symbol("syscall_table").address)
    rounds = ROUND.findall(watched.text())
    assert len(rounds) == 3
    original, hook = int(rounds[0][2], 16), int(rounds[0][3], 16)
    records = records_of(log)
    assert len(records) == 6, records
    for index, record in enumerate(records):
        # each round hooks getpid's entry, then puts it back
        old, new = (original, hook) if index % 2 == 0 else (hook, original)
        assert (record["pid"], record["process"], record["vcpu"]) == (1, "kwriter", 0)
        assert record["address"] == f"{table + 8 * SYS_GETPID:#x}" and record["size"] == 8
        assert (int(str(record["old"]), 16), int(str(record["new"]), 16)) == (old, new)
        assert re.fullmatch(r"mov qword ptr \[\w+\], \w+", str(record["instruction"])), record
        rip = int(str(record["rip"]), 16)
        writer = profile.function_at(rip)
        assert writer is not None and writer.name == "sys_kwrite", record
        assert int(str(record["next_rip"]), 16) > rip
    times = [float(str(record["time"])) for record in records]
    assert times == sorted(times)


def test_a_process_page_watched_by_virtual_address_catches_every_write() -> None:
    # memdirty writes a counter into word 1 of its one page; once the watch is armed, every write must be caught
    # (consecutive values, up to the last one it made) and performed (its own count stays right).
    console = Console()
    with os_vm("memdirty pages=1 rate=3000 seconds=1 page=4k", console) as vmm:
        vmm.start()
        base = int(console.wait_for(r"^memdirty 1: 1 pages at (0x\w+),")[1], 16)
        monitor = monitor_of(vmm)
        watch = monitor.watch_virtual(1, base, 16)
        assert watch.kind == "virtual" and len(watch.ranges) == 1
        outcome = vmm.run(timeout=60)
        assert outcome.exit_code == 0, console.text()
        records = [record for record in monitor.recent if record["watch"] == watch.id]
    done = re.search(r"^memdirty 1: dirtied (\d+) pages in \d+ ms", console.text(), re.MULTILINE)
    assert done, console.text()
    values = [int(str(record["new"]), 16) for record in records]
    assert len(values) > 100
    assert values == list(range(values[0], values[0] + len(values))), "a write was missed"
    assert values[-1] == int(done[1]) - 1, "the last write memdirty made was caught"
    for record in records:
        assert (record["pid"], record["process"], record["size"]) == (1, "memdirty", 8)
        assert record["instruction"] == records[0]["instruction"] and "qword ptr [" in str(record["instruction"])
        assert int(str(record["rip"]), 16) < 1 << 47, "user code"
        assert int(str(record["old"]), 16) == int(str(record["new"]), 16) - 1


@pytest.mark.parametrize("ring_entries", [0, 4096], ids=["bitmap", "ring"])
def test_writes_the_vmm_performs_are_dirty_and_dirty_logging_carries_over_to_the_pieces(ring_entries: int) -> None:
    directory = guests_dir()
    config = MachineConfig(kernel=directory / "os.elf", memory_size=64 * MiB, vcpus=1,
                           cmdline="kwriter count=2 period_ms=10; memdirty pages=64 rate=0 seconds=1 page=4k",
                           initrd=directory / "os-programs.img", dirty_ring_entries=ring_entries)
    console = Console()
    with build_vm(config, console.write) as vmm:
        dirty = vmm.dirty.subscribe()  # logging on first: the split must keep it on every piece
        watch = monitor_of(vmm).watch_symbol("syscall_table")
        assert all(slot.dirty_logging for slot in vmm.vm.memslots) and len(vmm.vm.memslots) == 3
        dirty.collect_pages()
        assert vmm.run(timeout=60).exit_code == 0, console.text()
        pages = set(dirty.collect_pages())
        dirty.close()
    table_page = watch.ranges[0][0] // 4096
    assert table_page in pages, "the table page, written only by the VMM on the guest's behalf, is dirty"
    low, high = {page for page in pages if page < table_page}, {page for page in pages if page > table_page}
    assert low and len(high) >= 64, "pages written by the guest on both sides of the watched page are logged"


def test_the_record_names_the_vcpu_and_the_process_among_several() -> None:
    directory = guests_dir()
    config = MachineConfig(kernel=directory / "os.elf", memory_size=64 * MiB, vcpus=2,
                           cmdline="counter count=20 period_ms=10; kwriter count=2 period_ms=10 cpu=1",
                           initrd=directory / "os-programs.img")
    console = Console()
    with build_vm(config, console.write) as vmm:
        monitor = monitor_of(vmm)
        monitor.watch_symbol("syscall_table")
        text = monitor.watch_symbol("kernel-text")  # executed (read) all the time, never written
        executable = [(segment.paddr, segment.memsz) for segment in guest_profile().segments
                      if segment.flags & 1 and segment.vaddr >= 1 << 63]
        assert list(text.ranges) == executable and executable
        layout = sorted((slot.region.gpa, slot.region.size, slot.readonly) for slot in vmm.vm.memslots)
        extra = monitor.watch_physical(0x2FF0, 0x20)  # two pages: 0x2000 and 0x3000
        split = sorted((slot.region.gpa, slot.region.size, slot.readonly) for slot in vmm.vm.memslots)
        assert (0x2000, 0x2000, True) in split and (0, 0x2000, False) in split
        assert sum(size for _, size, _ in split) == vmm.memory.size, "the pieces tile RAM exactly"
        monitor.remove(extra.id)
        assert sorted((slot.region.gpa, slot.region.size, slot.readonly) for slot in vmm.vm.memslots) == layout
        assert vmm.run(timeout=60).exit_code == 0, console.text()
        records = list(monitor.recent)
        assert monitor.describe(text)["writes"] == 0
    assert "os: pid 2 kwriter started" in console.text()
    assert len(records) == 4
    assert {(record["vcpu"], record["pid"], record["process"]) for record in records} == {(1, 2, "kwriter")}


def test_a_process_started_after_another_exited_is_named_by_its_own_pid() -> None:
    # The second kwriter starts once the first has exited, and may get the first one's page tables back.
    console = Console()
    with os_vm("kwriter count=1; kwriter count=1 start_ms=300", console) as vmm:
        monitor = monitor_of(vmm)
        monitor.watch_symbol("syscall_table")
        assert vmm.run(timeout=60).exit_code == 0, console.text()
        records = list(monitor.recent)
    assert console.text().index("os: pid 1 (kwriter) exited") < console.text().index("kwriter 2: round 1")
    assert [record["pid"] for record in records] == [1, 1, 2, 2]


def _memdirty_exits(watch_elsewhere: bool) -> tuple[int, int, int]:
    """memdirty dirtying its own pages for 1 s: (pages it dirtied, MMIO exits, writes the watch caught)."""
    console = Console()
    with os_vm("memdirty pages=256 rate=0 seconds=1 page=4k", console) as vmm:
        watch = monitor_of(vmm).watch_symbol("syscall_table") if watch_elsewhere else None
        assert vmm.run(timeout=60).exit_code == 0
        mmio = sum(vcpu.counters.mmio for vcpu in vmm.vcpus)
        caught = monitor_of(vmm).describe(watch)["writes"] if watch is not None else 0
    found = re.search(r"^memdirty 1: dirtied (\d+) pages in \d+ ms", console.text(), re.MULTILINE)
    assert found, console.text()
    return int(found[1]), mmio, caught


def test_pages_not_watched_run_at_full_speed() -> None:
    """A watch on another page adds no exit to memdirty's writes: they stay native (the speed itself is measured in
    benchmarks/write_monitor.py, not here)."""
    pages_plain, mmio_plain, _ = _memdirty_exits(False)
    pages_watched, mmio_watched, caught = _memdirty_exits(True)
    assert pages_plain > 10_000 and pages_watched > 10_000  # many writes ran ...
    assert caught == 0 and mmio_watched - mmio_plain < 100  # ... and none of them trapped


def test_a_watch_survives_snapshot_and_restore(tmp_path: Path) -> None:
    console = Console()
    (tmp_path / "logs").mkdir()
    log = tmp_path / "logs" / "writes.jsonl"
    with os_vm("kwriter count=12 period_ms=200", console) as vmm:
        monitor = monitor_of(vmm)
        watch = monitor.watch_symbol("syscall_table", log=str(log))
        vmm.start()
        console.wait_for(r"^kwriter 1: round 2: ")
        take_snapshot(vmm, tmp_path / "snap")
        written_before = monitor.describe(watch)["writes"]
        assert isinstance(written_before, int) and written_before >= 4
    before = len(records_of(log))
    assert before >= written_before

    restored_console = Console()
    with restore_vm(tmp_path / "snap", restored_console.write) as restored:
        restored_monitor = existing_monitor(restored)
        assert restored_monitor is not None and restored_monitor.watches == (watch,)
        assert [slot.region.size for slot in restored.vm.memslots if slot.flags & MEM_READONLY] == [4096]
        assert restored.run(timeout=60).exit_code == 0
        caught = restored_monitor.describe(watch)["writes"]
    assert "PASS: kwriter 1: the table entry was restored each time" in restored_console.text()
    rounds_after = len(ROUND.findall(restored_console.text()))
    assert rounds_after >= 9
    assert caught == 2 * rounds_after  # the rounds the restored guest ran, each a hook and an unhook
    after = records_of(log)[before:]
    assert len(after) == caught and {record["process"] for record in after} == {"kwriter"}

    # Restored where its log file cannot be opened: the watch still traps, its records stay in memory.
    log.unlink()
    (tmp_path / "logs").rmdir()
    with restore_vm(tmp_path / "snap", Console().write) as again:
        again_monitor = existing_monitor(again)
        assert again_monitor is not None and again_monitor.log_failures == 1
        assert [each.log for each in again_monitor.watches] == [None]
        assert again.run(timeout=60).exit_code == 0
        assert again_monitor.describe(again_monitor.watches[0])["writes"] == caught
    assert not (tmp_path / "logs").exists()


def _monitor_cli(socket_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyrovisor", "monitor", str(socket_path), *args],
                          capture_output=True, text=True, timeout=60)


def test_the_monitor_command_and_bad_input(tmp_path: Path) -> None:
    socket_path = tmp_path / "api.sock"
    log = tmp_path / "cli.jsonl"
    vmm = VmmProcess(["run", "os-kwriter", "--rng", "--args", "kwriter count=150 period_ms=20"], socket_path)
    try:
        vmm.wait_for(lambda: any(line.startswith("kwriter 1: round 1:") for line in vmm.lines), "kwriter's round 1")
        bad = {
            ("add", "--symbol", "no_such_symbol"): "no such symbol",
            ("add", "--gpa", "0x7fff0000"): "outside guest memory",
            ("add", "--gpa", hex(VIRTIO_MMIO_BASE + 8), "--size", "4"): "is MMIO (rng0 at 0xc0000000)",
            ("add", "--gpa", hex(IOAPIC_GPA)): "is MMIO (the in-kernel IOAPIC",
            ("add", "--gva", "0x400000", "--pid", "99"): "no such process in the guest (live: 1 kwriter)",
            ("remove", "7"): "no such watch",
        }
        for args, message in bad.items():
            result = _monitor_cli(socket_path, *args)
            assert result.returncode == 1 and result.stdout == "", (args, result)
            assert len(result.stderr.splitlines()) == 1 and message in result.stderr, (args, result.stderr)
        assert vmm.api.get("/status")["state"] == "running"

        added = _monitor_cli(socket_path, "add", "--symbol", "syscall_table", "--log", str(log), "--json")
        assert added.returncode == 0, added.stderr
        watch = json.loads(added.stdout)
        assert watch["kind"] == "symbol" and watch["pages"] == 1
        with pytest.raises(ControlError, match="cannot migrate while 1 write watch"):
            vmm.api.post("/migrate", {"to": str(tmp_path / "nowhere.sock")})
        vmm.wait_for(lambda: vmm.api.get("/monitor")["watches"][0]["writes"] >= 4, "trapped writes")
        listing = json.loads(_monitor_cli(socket_path, "list", "--json").stdout)
        assert [each["id"] for each in listing["watches"]] == [watch["id"]]
        records = json.loads(_monitor_cli(socket_path, "records", "--json").stdout)["records"]
        assert records and all(record["process"] == "kwriter" and record["instruction"].startswith("mov ")
                               for record in records)
        text = _monitor_cli(socket_path, "records")
        assert text.returncode == 0 and "(kwriter)" in text.stdout
        removed = _monitor_cli(socket_path, "remove", str(watch["id"]), "--json")
        assert removed.returncode == 0 and json.loads(removed.stdout)["writes"] >= 4
        caught = len(records_of(log))
        assert caught >= 4
        code, stderr = vmm.finish(timeout=60)
        assert code == 0, stderr
        assert "PASS: kwriter 1: the table entry was restored each time" in vmm.text()
        assert len(records_of(log)) == caught, "nothing is logged once the watch is removed"
    finally:
        vmm.kill()
