"""The OS kernel's virtio-balloon driver against QEMU's virtio-balloon-device (`-M microvm` with KVM), driven over
QMP: inflating to the target `balloon` sets and deflating back (QEMU's `query-balloon` shows the size), memory
statistics (`guest-stats`), deflate-on-OOM, free page reporting (QEMU's RSS falls), the `cache` program's pages
counted as CACHES and reclaimed before the balloon deflates, `balloon_report=lie`, and `wset`'s lines."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from pyrovisor.catalog import guests_dir

QEMU = "qemu-system-x86_64"
MiB = 1 << 20
PAGE = 4096

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} is not installed (apt-get install qemu-system-x86)"),
]

MICROVM = ["-M", "microvm,acpi=off", "-global", "virtio-mmio.force-legacy=false"]
BALLOON = "virtio-balloon-device,id=balloon0"
QOM_PATH = "/machine/peripheral/balloon0"
TARGET_LINE = r"^os: balloon: target (?P<target>\d+) pages, now (?P<actual>\d+) pages \(took (?P<ms>\d+) ms\)"
SUMMARY = (r"^os: balloon: (?P<actual>\d+) pages in the balloon \(target (?P<target>\d+)\): (?P<inflated>\d+) pages "
           r"inflated in \d+ requests, (?P<deflated>\d+) deflated in \d+ \((?P<oom_pages>\d+) on (?P<oom_events>\d+) "
           r"out-of-memory events\)\nos: balloon: (?P<reported>\d+) pages reported in (?P<reports>\d+) reports, "
           r"(?P<stats>\d+) statistics requests, PFN table filled for (?P<chunks>\d+) chunks in (?P<fill_ms>\d+) ms, "
           r"(?P<driver_ms>\d+) ms in the driver$")


class Guest:
    """The OS under QEMU with a balloon device and a QMP socket; the console is collected as it comes."""

    def __init__(self, append: str, memory_mib: int = 128, balloon: str = BALLOON, paused: bool = False,
                 extra: Sequence[str] = ()) -> None:
        self.directory = tempfile.mkdtemp(prefix="balloon-qmp-")
        qmp_path = os.path.join(self.directory, "qmp.sock")
        directory = guests_dir()
        command = [QEMU, *MICROVM, "-accel", "kvm", "-m", f"{memory_mib}M", "-nodefaults", "-no-user-config",
                   "-nographic", "-no-reboot", "-serial", "stdio", "-kernel", str(directory / "os.elf"),
                   "-initrd", str(directory / "os-programs.img"), "-append", append,
                   "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-qmp", f"unix:{qmp_path},server=on,wait=off",
                   "-device", balloon, *(["-S"] if paused else []), *extra]
        self.memory = memory_mib * MiB
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        stdin=subprocess.DEVNULL)
        self._console = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 10
        while True:  # QEMU creates the socket, then listens on it
            assert self.process.poll() is None and time.monotonic() < deadline, self.stderr()
            self._socket = socket.socket(socket.AF_UNIX)
            try:
                self._socket.connect(qmp_path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self._socket.close()
                time.sleep(0.01)
        self._socket.settimeout(30)
        self._qmp = self._socket.makefile("rw")
        json.loads(self._qmp.readline())  # the greeting
        self.qmp("qmp_capabilities")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for chunk in iter(lambda: self.process.stdout.read1(4096), b""):  # type: ignore[union-attr]
            with self._lock:
                self._console += chunk

    @property
    def console(self) -> str:
        with self._lock:
            return self._console.decode(errors="replace")

    def stderr(self) -> str:
        return self.process.stderr.read().decode(errors="replace") if self.process.poll() is not None else ""

    def qmp(self, command: str, **arguments: object) -> object:
        self._qmp.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        self._qmp.flush()
        while True:
            reply = json.loads(self._qmp.readline())
            if "error" in reply:
                raise AssertionError(f"QMP {command}: {reply['error']}")
            if "return" in reply:
                return reply["return"]

    def balloon(self, target_mib: int) -> None:
        """QEMU's `balloon`: the guest should end up with target_mib MiB (num_pages = the rest)."""
        self.qmp("balloon", value=target_mib * MiB)

    def actual_mib(self) -> float:
        return self.qmp("query-balloon")["actual"] / MiB  # type: ignore[index]

    def stats(self) -> dict[str, int]:
        return self.qmp("qom-get", path=QOM_PATH, property="guest-stats")["stats"]  # type: ignore[index]

    def poll_stats(self, seconds: int) -> None:
        self.qmp("qom-set", path=QOM_PATH, property="guest-stats-polling-interval", value=seconds)

    def wait_for(self, expression: str, timeout: float = 30, after: int = 0) -> re.Match[str]:
        pattern = re.compile(expression, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            console = self.console
            match = pattern.search(console, after)
            if match:
                return match
            if self.process.poll() is not None:
                self._reader.join(2)
                match = pattern.search(self.console, after)
                if match:
                    return match
                raise AssertionError(f"QEMU stopped (exit {self.process.returncode}) before a line matched "
                                     f"{expression!r}:\n{self.console}\n{self.stderr()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no line matched {expression!r} within {timeout} s:\n{console}")
            time.sleep(0.02)

    def finish(self, timeout: float = 60) -> int:
        """The guest's exit code, once it stopped through the debug-exit port."""
        self.process.wait(timeout)
        self._reader.join(5)
        code = self.process.returncode
        assert code & 1, f"QEMU did not stop through the debug-exit port ({code}):\n{self.console}"
        return code >> 1

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError, AssertionError):
                self.qmp("quit")
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._socket.close()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def guests() -> Iterator[list[Guest]]:
    started: list[Guest] = []
    yield started
    for guest in started:
        guest.close()


def start(guests: list[Guest], *args: object, **kwargs: object) -> Guest:
    guest = Guest(*args, **kwargs)  # type: ignore[arg-type]
    guests.append(guest)
    return guest


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def test_inflate_to_the_target_and_deflate_back(guests: list[Guest]) -> None:
    memory_mib, target_mib = 512, 64
    guest = start(guests, "counter count=8 period_ms=1000", memory_mib=memory_mib,
                  balloon=f"{BALLOON},deflate-on-oom=on,free-page-reporting=on")
    guest.wait_for(r"^os: balloon: virtio 0 \(interrupt\): features 0x[0-9a-f]+ \(stats deflate-on-oom poison "
                   r"reporting\), PFN table of 512 KiB, page discard no$")
    guest.wait_for(r"^counter 1: beat 1 ")
    assert guest.actual_mib() == memory_mib
    pages = (memory_mib - target_mib) * MiB // PAGE
    sent = time.monotonic()
    guest.balloon(target_mib)
    inflated = guest.wait_for(TARGET_LINE)
    inflate_wall = time.monotonic() - sent
    assert (int(inflated["target"]), int(inflated["actual"])) == (pages, pages)
    assert guest.actual_mib() == target_mib
    sent = time.monotonic()
    guest.balloon(memory_mib)
    deflated = guest.wait_for(TARGET_LINE, after=inflated.end())
    deflate_wall = time.monotonic() - sent
    assert (int(deflated["target"]), int(deflated["actual"])) == (0, 0)
    assert guest.actual_mib() == memory_mib
    summary = guest.wait_for(SUMMARY, timeout=30)
    assert guest.finish() == 0
    assert int(summary["inflated"]) == int(summary["deflated"]) == pages and int(summary["actual"]) == 0
    moved = memory_mib - target_mib
    print(f"\n{moved} MiB inflated in {inflated['ms']} ms ({moved * 1000 / max(1, int(inflated['ms'])):.0f} MiB/s, "
          f"{inflate_wall * 1000:.0f} ms seen over QMP), deflated in {deflated['ms']} ms "
          f"({deflate_wall * 1000:.0f} ms over QMP); {summary['driver_ms']} ms in the driver in all (inflate, deflate "
          f"and reporting; {summary['fill_ms']} ms of it filling the PFN table for {summary['chunks']} chunks, the rest "
          f"mostly waiting for QEMU in register accesses); {cpu_model()}, {os.cpu_count()} CPUs, load average "
          f"{load_average()}")
    assert int(inflated["ms"]) < 30000 and int(deflated["ms"]) < 30000


def test_statistics_arrive_with_the_guests_figures(guests: list[Guest]) -> None:
    guest = start(guests, "counter count=0 period_ms=1000", memory_mib=256, paused=True)
    guest.balloon(192)  # before the guest runs: its driver reads num_pages when it starts
    guest.qmp("cont")
    guest.wait_for(TARGET_LINE)
    guest.poll_stats(1)
    total = 192 * MiB  # RAM less the 64 MiB in the balloon (the first buffer, posted before it inflated, says 256)
    deadline = time.monotonic() + 15
    while True:
        stats = guest.stats()
        # A report can be sent before counter has faulted its first page in (a loaded host starts it late).
        if stats["stat-total-memory"] == total and stats["stat-minor-faults"] >= 1:  # counter's own faults
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.2)
    assert 150 * MiB < stats["stat-free-memory"] < total
    assert stats["stat-available-memory"] == stats["stat-free-memory"]  # no cache
    assert stats["stat-disk-caches"] == 0
    assert stats["stat-major-faults"] == stats["stat-swap-in"] == stats["stat-swap-out"] == 0
    assert stats["stat-htlb-pgfail"] == 0


def test_deflate_on_oom_instead_of_failing(guests: list[Guest]) -> None:
    guest = start(guests, "memcheck mib=48 passes=1; counter count=3 period_ms=500", paused=True,
                  balloon=f"{BALLOON},deflate-on-oom=on")
    guest.balloon(24)  # 104 MiB in the balloon: far less free memory than memcheck's 48 MiB
    guest.qmp("cont")
    reached = guest.wait_for(TARGET_LINE)
    assert int(reached["actual"]) == int(reached["target"]) == 104 * 256
    guest.wait_for(r"^PASS: memcheck 1: 48 MiB intact after 1 passes$", timeout=60)
    events = re.findall(r"^os: balloon: out of memory: took (\d+) pages back from the balloon \(now (\d+) pages, "
                        r"target (\d+)\)$", guest.console, re.MULTILINE)
    assert events, guest.console
    assert guest.actual_mib() == 128 - int(events[-1][1]) * PAGE / MiB  # QEMU sees the smaller balloon
    summary = guest.wait_for(SUMMARY)
    assert guest.finish() == 0
    assert int(summary["oom_events"]) == len(events) and int(summary["oom_pages"]) == sum(int(e[0]) for e in events)
    assert re.search(r"^PASS: memcheck 1: 48 MiB of new memory read as zero", guest.console, re.MULTILINE)
    cleared = re.search(r"^os: memory: \d+ cache pages reclaimed, (\d+) not-zero pages cleared in user mode and 0 at "
                        r"CPL0", guest.console, re.MULTILINE)
    assert cleared and int(cleared[1]) > 0  # the balloon's pages, cleared by memcheck's own faults in user mode


def test_without_deflate_on_oom_the_kernel_runs_out_of_memory(guests: list[Guest]) -> None:
    guest = start(guests, "memcheck mib=48 passes=1", paused=True)
    guest.balloon(24)
    guest.qmp("cont")
    guest.wait_for(r"^os: out of memory ")
    assert guest.finish() == 3
    assert not re.search(r"^os: balloon: out of memory", guest.console, re.MULTILINE)


def test_free_page_reporting_gives_freed_memory_back_to_qemu(guests: list[Guest]) -> None:
    guest = start(guests, "memcheck mib=64 passes=1; counter count=5 period_ms=1000",
                  balloon=f"{BALLOON},free-page-reporting=on")

    def rss_mib() -> float:
        for line in Path(f"/proc/{guest.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    guest.wait_for(r"^os: pid 1 \(memcheck\) exited with 0")
    before = rss_mib()
    deadline = time.monotonic() + 4
    while rss_mib() > before - 48 and time.monotonic() < deadline:  # reports go out once a second
        time.sleep(0.1)
    after = rss_mib()
    summary = guest.wait_for(SUMMARY)
    assert guest.finish() == 0
    assert after < before - 48, (before, after)
    assert int(summary["reported"]) >= 64 * 256 and int(summary["reports"]) >= 2  # 16 chunks (32 MiB) a report


def test_cache_counts_as_caches_and_goes_before_the_balloon(guests: list[Guest]) -> None:
    # 256 MiB, 128 MiB of it in the balloon; 64 MiB of cache, then memcheck wants 96 MiB: about 36 MiB more than is
    # free, which the cache gives, so the balloon keeps its pages.
    guest = start(guests, "cache mib=64 seconds=5; memcheck mib=96 passes=1 start_ms=2500", memory_mib=256,
                  paused=True, balloon=f"{BALLOON},deflate-on-oom=on")
    guest.balloon(128)
    guest.qmp("cont")
    guest.wait_for(TARGET_LINE)
    guest.wait_for(r"^cache 1: 64 MiB of cache at 0x[0-9a-f]+ \(2 MiB pages\) written in \d+ ms, sleeping for 5 s$")
    guest.poll_stats(1)
    deadline = time.monotonic() + 10
    while guest.stats()["stat-disk-caches"] != 64 * MiB:
        assert time.monotonic() < deadline, guest.stats()
        time.sleep(0.2)
    stats = guest.stats()
    assert stats["stat-available-memory"] == stats["stat-free-memory"] + 64 * MiB
    guest.wait_for(r"^PASS: memcheck 2: 96 MiB intact after 1 passes$", timeout=60)
    summary = guest.wait_for(SUMMARY, timeout=30)
    assert guest.finish() == 0
    reclaimed = re.search(r"^os: memory: (\d+) cache pages reclaimed", guest.console, re.MULTILINE)
    assert reclaimed and 24 * 256 <= int(reclaimed[1]) <= 64 * 256, guest.console
    assert int(summary["oom_events"]) == 0 and int(summary["actual"]) == 128 * 256  # the balloon kept its pages
    assert not re.search(r"^os: balloon: out of memory", guest.console, re.MULTILINE)


@pytest.mark.parametrize("report", ["honest", "lie"])
def test_balloon_report_lie_multiplies_free_memory(guests: list[Guest], report: str) -> None:
    # 100 MiB of cache in 128 MiB leaves about 24 MiB free: four times that is still below the total.
    guest = start(guests, f"cache mib=100; kernel balloon_report={report}")
    guest.wait_for(r"^cache 1: 100 MiB of cache")
    guest.poll_stats(1)
    deadline = time.monotonic() + 10
    while guest.stats()["stat-disk-caches"] != 100 * MiB:
        assert time.monotonic() < deadline, guest.stats()
        time.sleep(0.2)
    time.sleep(1.2)  # one more round, with nothing changing
    stats = guest.stats()
    total, free, available = stats["stat-total-memory"], stats["stat-free-memory"], stats["stat-available-memory"]
    assert total == 128 * MiB
    if report == "honest":
        assert 16 * MiB < free < 28 * MiB and available == free + 100 * MiB
    else:  # 4x the truth (which is what the honest guest shows), capped at the total
        assert 64 * MiB < free < 112 * MiB and free % (4 * PAGE) == 0 and available == total


def test_wset_prints_its_schedule_while_the_balloon_inflates(guests: list[Guest]) -> None:
    guest = start(guests, "wset schedule=8:2,24:2,4:2 mode=mixed; wset mib=16 pattern=hotcold hot_pct=25 "
                          "cold_period_ms=1000 mode=write seconds=6 page=4k", memory_mib=256)
    guest.wait_for(r"^wset 1: phase 1: ws_mib=24 from t=\d+$", timeout=30)
    guest.balloon(96)  # takes free memory only: both keep running
    guest.wait_for(TARGET_LINE)
    guest.wait_for(r"^PASS: wset 1: 3 phases in \d+ ms", timeout=30)
    guest.wait_for(r"^PASS: wset 2: 1 phases in \d+ ms", timeout=30)
    assert guest.finish() == 0
    console = guest.console
    assert re.search(r"^wset 1: 24 MiB at 0x[0-9a-f]+ \(2 MiB pages\) written in \d+ ms; mode mixed, pattern uniform, "
                     r"period 100 ms$", console, re.MULTILINE)
    phases = [(int(k), int(mib), int(t)) for k, mib, t in
              re.findall(r"^wset 1: phase (\d+): ws_mib=(\d+) from t=(\d+)$", console, re.MULTILINE)]
    assert [(k, mib) for k, mib, _ in phases] == [(0, 8), (1, 24), (2, 4)]
    assert phases[1][2] >= 1900 and phases[2][2] >= 3900
    seconds = re.findall(r"^wset 1: t=(\d+) phase=(\d+) ws_mib=(\d+) touched=(\d+) ops=(\d+)$", console, re.MULTILINE)
    assert len(seconds) >= 5
    for t, phase, ws_mib, touched, ops in seconds:
        assert int(ws_mib) == phases[int(phase)][1]
        if int(t) - phases[int(phase)][2] >= 1000:
            assert int(touched) == int(ws_mib) * 256  # every page of the set, each second
            assert int(ops) >= int(touched)
        else:  # the first line of a phase counts from the phase's start
            assert int(touched) <= int(ws_mib) * 256
    hotcold = re.findall(r"^wset 2: t=\d+ phase=0 ws_mib=16 touched=(\d+) ops=(\d+)$", console, re.MULTILINE)
    assert len(hotcold) >= 4
    for touched, ops in hotcold[1:]:  # hot: 1024 pages swept; cold: 3072 pages, once a second
        assert 1024 + 2800 <= int(touched) <= 4096 and int(ops) > int(touched)
    assert re.search(r"^wset 2: hot 25 % of the set every period, the rest once every 1000 ms$", console, re.MULTILINE)
