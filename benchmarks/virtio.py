"""virtio-blk on pyrovisor against QEMU microvm, the same OS guest and user-mode driver, measured in the same run."""

# Each case (direction, block size, queue depth, wait mode) boots the OS guest once per system and run, with one
# `blk mode=bench` process (guests/programs/blk.c) doing random requests over a 256 MiB raw file of random data
# for --seconds; the guest's own `blk P: bench ...` line gives IOPS and MB/s (its TSC). For each case pyrovisor and
# QEMU run back to back (the order swapped every run), so both see the same noise; the table gives medians of --runs
# runs and, as the ratio, the median of the runs' pyrovisor/QEMU ratios, the goal being >= 0.8. The disk file is
# read once before every boot, so both read from a warm page cache (QEMU's default cache=writeback, aio=threads;
# pyrovisor's preadv/pwritev on the I/O thread).
#
# Exits per request (pyrovisor only): a thread samples, every 10 ms, the vCPU's exit counters, KVM's per-vCPU
# statistics (binary stats fd: every exit into KVM, and those sent to userspace) and the disk's completed
# requests; the figure is Δexits / Δrequests from the first sample that saw completions (the driver's set-up is
# over) to the last one after which more completed (the bench's console output has not begun).
#
# QEMU: -M microvm,acpi=off -global virtio-mmio.force-legacy=false -accel kvm (tests/guests/test_os_virtio_qemu.py).
# UDP echo (virtio-net): the rows come from benchmarks/udp_echo.py's run_one, when that file is there (--no-udp: none).
# Run: python benchmarks/virtio.py [--runs N] [--seconds S] [--cases poll-read-4k-qd1,...] [--systems pyrovisor,qemu]

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from rich.console import Console
from rich.table import Table

from pyrovisor.builder import build_vm
from pyrovisor.catalog import guests_dir
from pyrovisor.config import DiskConfig, MachineConfig
from pyrovisor.devices.virtio.blk import VirtioBlk
from pyrovisor.devices.virtio.mmio import VirtioMmio
from pyrovisor.vmm import Vmm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from io_exits import KvmStats, cpu_model, load_average  # noqa: E402  (a sibling script, not a package)

QEMU = "qemu-system-x86_64"
MICROVM = ["-M", "microvm,acpi=off", "-global", "virtio-mmio.force-legacy=false"]
MEMORY_MIB = 128
DISK_MIB = 256
SECTORS = DISK_MIB << 11
GOAL = 0.8  # pyrovisor at least this fraction of QEMU
SAMPLE_PERIOD_S = 0.01
BENCH_LINE = re.compile(
    r"^blk \d+: bench rw=(?P<rw>\w+) access=(?P<access>\w+) bs=(?P<bs>\d+) qd=(?P<qd>\d+) wait=(?P<wait>\w+): "
    r"(?P<ops>\d+) ops in (?P<us>\d+) us: (?P<iops>\d+) IOPS, (?P<mbs>[\d.]+) MB/s, latency mean (?P<mean>\d+) us "
    r"max (?P<max>\d+) us, (?P<notifies>\d+) notifies, (?P<interrupts>\d+) interrupts$", re.MULTILINE)


@dataclass(frozen=True)
class Case:
    wait: str
    rw: str
    bs: int
    qd: int

    @property
    def name(self) -> str:
        return f"{self.wait}-{self.rw}-{self.bs >> 10}k-qd{self.qd}"

    @property
    def bandwidth(self) -> bool:
        """Large blocks are reported in MB/s, small ones in IOPS."""
        return self.bs >= 64 << 10

    def command(self, seconds: int) -> str:
        return (f"blk mode=bench rw={self.rw} access=rand bs={self.bs} qd={self.qd} wait={self.wait} "
                f"seconds={seconds} sectors={SECTORS}")


CASES = tuple(Case(wait, rw, bs, qd) for wait in ("poll", "irq")
              for rw, bs, qd in (("read", 4096, 1), ("read", 4096, 16), ("write", 4096, 1), ("write", 4096, 16),
                                 ("read", 65536, 1), ("read", 65536, 16), ("write", 65536, 16)))


@dataclass
class Bench:
    """One `blk P: bench` line, and for pyrovisor the exits its requests cost."""

    ops: int
    microseconds: int
    iops: float
    mbs: float
    mean_latency_us: float
    notifies: int
    interrupts: int
    device_cpu_us_per_request: float | None = None  # host CPU outside the vCPU thread during the bench
    user_exits_per_request: float | None = None
    kvm_exits_per_request: float | None = None
    kvm_user_exits_per_request: float | None = None

    def figure(self, case: Case) -> float:
        return self.mbs if case.bandwidth else self.iops


def parse_bench(console: str, case: Case, system: str, seconds: int) -> Bench:
    found = BENCH_LINE.search(console)
    if not found or f"PASS: blk 1: bench finished {found['ops']} ops, 0 errors" not in console:
        raise RuntimeError(f"{system} {case.name}: no clean bench line:\n{console[-3000:]}")
    if (found["rw"], int(found["bs"]), int(found["qd"]), found["wait"]) != (case.rw, case.bs, case.qd, case.wait):
        raise RuntimeError(f"{system} {case.name}: the guest ran {found[0]}")
    if int(found["us"]) < seconds * 990_000:
        raise RuntimeError(f"{system} {case.name}: the bench ran {found['us']} us, not {seconds} s: {found[0]}")
    return Bench(ops=int(found["ops"]), microseconds=int(found["us"]), iops=float(found["iops"]),
                 mbs=float(found["mbs"]), mean_latency_us=float(found["mean"]), notifies=int(found["notifies"]),
                 interrupts=int(found["interrupts"]))


# --- the disk -----------------------------------------------------------------------------------------------------
def make_disk(path: Path) -> None:
    with path.open("wb") as file:
        for _ in range(DISK_MIB):
            file.write(os.urandom(1 << 20))


def warm(path: Path) -> None:
    """Read the whole file so that both systems start from the page cache."""
    with path.open("rb") as file:
        while file.read(8 << 20):
            pass


# --- host CPU outside the vCPU thread, over the bench ----------------------------------------------------------------
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
START_LINE = re.compile(rb"^blk 1: virtio .*, wait (poll|irq)\n", re.MULTILINE)  # printed just before the bench
END_TEXT = b"blk 1: bench rw="  # the first bytes of the line printed just after it


def cpu_seconds(stat: Path) -> float:
    """utime + stime from a /proc stat file (a process's includes its exited threads; guest time is in utime)."""
    fields = stat.read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class DeviceCpu:
    """The host CPU a VMM spends outside its vCPU thread (device emulation, I/O threads and workers) between the
    guest's line before its bench and the first bytes of the bench line: whole process minus the vCPU thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.vcpu_tid: int | None = None
        self.marks: list[tuple[float, float]] = []  # (process, vCPU thread) CPU seconds
        self._text = bytearray()

    def mark(self) -> None:
        assert self.vcpu_tid is not None
        process = cpu_seconds(Path(f"/proc/{self.pid}/stat"))
        vcpu = cpu_seconds(Path(f"/proc/{self.pid}/task/{self.vcpu_tid}/stat"))
        self.marks.append((process, vcpu))

    def feed(self, data: bytes, vcpu_tid: Callable[[], int]) -> None:
        """Console output as it arrives: marks at the start line and at the bench line."""
        if len(self.marks) >= 2:
            return
        self._text.extend(data)
        if not self.marks:
            if b"\n" in data and START_LINE.search(self._text):
                self.vcpu_tid = vcpu_tid()
                self.mark()
                self._text.clear()
        elif END_TEXT in self._text:
            self.mark()

    def per_request(self, ops: int) -> float | None:
        if len(self.marks) != 2 or not ops:
            return None
        (process_0, vcpu_0), (process_1, vcpu_1) = self.marks
        return ((process_1 - process_0) - (vcpu_1 - vcpu_0)) / ops * 1e6


def qemu_vcpu_tid(pid: int) -> int:
    for task in Path(f"/proc/{pid}/task").iterdir():
        if (task / "comm").read_text().strip().startswith("CPU 0/"):
            return int(task.name)
    raise RuntimeError(f"QEMU {pid}: no vCPU thread ('CPU 0/KVM')")


# --- QEMU ---------------------------------------------------------------------------------------------------------
def qemu_command(disk: Path, append: str) -> list[str]:
    directory = guests_dir()
    return [QEMU, "-name", "pyrovisor-bench,debug-threads=on",  # names the vCPU thread "CPU 0/KVM"
            *MICROVM, "-accel", "kvm", "-m", f"{MEMORY_MIB}M", "-nodefaults", "-no-user-config", "-nographic",
            "-no-reboot", "-serial", "stdio", "-kernel", str(directory / "os.elf"),
            "-initrd", str(directory / "os-programs.img"), "-append", append,
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-device", "virtio-blk-device,drive=d0", "-drive", f"id=d0,file={disk},format=raw,if=none"]


def run_qemu(case: Case, disk: Path, seconds: int) -> Bench:
    process = subprocess.Popen(qemu_command(disk, case.command(seconds)), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cpu = DeviceCpu(process.pid)
    output = bytearray()

    def read() -> None:
        assert process.stdout is not None
        for line in iter(process.stdout.readline, b""):
            output.extend(line)
            try:
                cpu.feed(line, lambda: qemu_vcpu_tid(process.pid))
            except (OSError, RuntimeError) as exc:  # no CPU figure, but keep reading the console
                print(f"QEMU {case.name}: device CPU not measured: {exc}", file=sys.stderr)
                cpu.marks.clear()
                cpu.marks.extend([(0.0, 0.0)] * 3)  # > 2 marks: feed() stops, per_request() says None

    reader = threading.Thread(target=read, name="qemu-console", daemon=True)
    reader.start()
    try:
        process.wait(seconds * 10 + 60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(10)
    errors = process.stderr.read().decode(errors="replace") if process.stderr is not None else ""
    console = output.decode(errors="replace")
    if not process.returncode & 1 or process.returncode >> 1:  # QEMU exits with (code << 1) | 1
        raise RuntimeError(f"QEMU {case.name}: exit {process.returncode}: {errors}\n{console[-3000:]}")
    bench = parse_bench(console, case, "QEMU", seconds)
    bench.device_cpu_us_per_request = cpu.per_request(bench.ops)
    return bench


# --- pyrovisor ----------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    requests: int
    user_exits: int
    kvm: dict[str, int] = field(default_factory=dict)


class ExitSampler:
    """Every 10 ms: the disk's completed requests, the vCPU's userspace exits and KVM's exit statistics."""

    def __init__(self, vmm: Vmm, disk: VirtioBlk) -> None:
        self.vmm = vmm
        self.disk = disk
        try:
            self.stats: KvmStats | None = KvmStats(vmm.vcpus[0].fd.get_stats_fd(), ("exits", "io_exits", "mmio_exits"))
        except OSError:
            self.stats = None
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="exit-sampler", daemon=True)

    def _sample(self) -> Sample:
        counts = self.disk.stats
        return Sample(counts.reads + counts.writes, self.vmm.vcpus[0].counters.total,
                      self.stats.read() if self.stats is not None else {})

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_PERIOD_S):
            self.samples.append(self._sample())

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.samples.append(self._sample())
        if self.stats is not None:
            self.stats.close()

    def per_request(self, value: Callable[[Sample], int]) -> float | None:
        changed = [index for index in range(1, len(self.samples))
                   if self.samples[index].requests != self.samples[index - 1].requests]
        if len(changed) < 3:
            return None
        # From the first sample that saw completions (the driver's set-up is over) to the last one after which
        # more completed (the bench was still running, so its output had not started).
        first, last = self.samples[changed[0]], self.samples[changed[-2]]
        requests = last.requests - first.requests
        return (value(last) - value(first)) / requests if requests else None


def run_pyrovisor(case: Case, disk: Path, seconds: int) -> Bench:
    directory = guests_dir()
    config = MachineConfig(kernel=directory / "os.elf", initrd=directory / "os-programs.img",
                           memory_size=MEMORY_MIB << 20, vcpus=1, cmdline=case.command(seconds),
                           disks=(DiskConfig(disk),))
    output = bytearray()
    cpu = DeviceCpu(os.getpid())

    def console(data: bytes) -> None:  # called on the vCPU thread, which writes the serial port
        output.extend(data)
        cpu.feed(data, threading.get_native_id)

    with build_vm(config, console) as vmm:
        transport = vmm.devices["blk0"]
        assert isinstance(transport, VirtioMmio) and isinstance(transport.device, VirtioBlk)
        sampler = ExitSampler(vmm, transport.device)
        sampler.start()
        try:
            outcome = vmm.run(timeout=seconds * 10 + 60)
        finally:
            sampler.stop()
    text = output.decode(errors="replace")
    if outcome.exit_code != 0:
        raise RuntimeError(f"pyrovisor {case.name}: {outcome.describe()}\n{text[-3000:]}")
    bench = parse_bench(text, case, "pyrovisor", seconds)
    bench.device_cpu_us_per_request = cpu.per_request(bench.ops)
    bench.user_exits_per_request = sampler.per_request(lambda sample: sample.user_exits)
    if sampler.stats is not None:
        bench.kvm_exits_per_request = sampler.per_request(lambda sample: sample.kvm["exits"])
        bench.kvm_user_exits_per_request = sampler.per_request(
            lambda sample: sample.kvm["io_exits"] + sample.kvm["mmio_exits"])
    return bench


# --- UDP echo (virtio-net) ----------------------------------------------------------------------------------------
def udp_echo_module() -> ModuleType | None:
    """benchmarks/udp_echo.py (virtio-net, written separately), if it is there."""
    if not (HERE / "udp_echo.py").exists():
        return None
    return importlib.import_module("udp_echo")


# --- the report ---------------------------------------------------------------------------------------------------
def runnable() -> int:
    """Threads runnable on the host right now, this reader included (/proc/loadavg's fourth field)."""
    return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])


def wait_until_quiet(limit_s: float) -> float:
    """Wait (at most `limit_s`) until no other thread has been runnable for 2 s, sampled every 0.25 s; the time waited."""
    began = time.monotonic()
    quiet_since = None
    while time.monotonic() - began < limit_s:
        if runnable() <= 1:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= 2:
                break
        else:
            quiet_since = None
        time.sleep(0.25)
    return time.monotonic() - began


def spread(values: list[float], form: str) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    middle = format(statistics.median(ordered), form)
    return middle if len(ordered) == 1 else f"{middle} ({format(ordered[0], form)}-{format(ordered[-1], form)})"


def optional_median(values: list[float | None]) -> str:
    present = [value for value in values if value is not None]
    return f"{statistics.median(present):.3g}" if present else "n/a"


def report(results: dict[Case, dict[str, list[Bench]]], runs: int, seconds: int, loads: list[str]) -> None:
    console = Console(width=230)
    table = Table(title=f"virtio-blk, OS guest `blk mode=bench` (random, {DISK_MIB} MiB file of random data, "
                        f"{seconds} s per run): medians of {runs} runs (range)")
    for column in ("case", "unit", "pyrovisor", "QEMU", "ratio: runs' median (range)", f"≥ {GOAL}",
                   "pyrovisor exits/req", "KVM exits/req (to user)", "device CPU µs/req pyro", "QEMU",
                   "pyro lat µs", "QEMU lat µs"):
        table.add_column(column, justify="right")
    for case, systems in results.items():
        ours, theirs = systems.get("pyrovisor", []), systems.get("qemu", [])
        unit = "MB/s" if case.bandwidth else "IOPS"
        form = ",.1f" if case.bandwidth else ",.0f"
        ratio, verdict = "-", "-"
        if ours and theirs:  # run i's two measurements were taken back to back
            ratios = [mine.figure(case) / other.figure(case) for mine, other in zip(ours, theirs, strict=False)]
            value = statistics.median(ratios)
            ratio, verdict = spread(ratios, ".2f"), "met" if value >= GOAL else "not met"
        kvm = (f"{optional_median([bench.kvm_exits_per_request for bench in ours])} "
               f"({optional_median([bench.kvm_user_exits_per_request for bench in ours])})")
        table.add_row(case.name, unit, spread([bench.figure(case) for bench in ours], form),
                      spread([bench.figure(case) for bench in theirs], form), ratio, verdict,
                      optional_median([bench.user_exits_per_request for bench in ours]), kvm,
                      optional_median([bench.device_cpu_us_per_request for bench in ours]),
                      optional_median([bench.device_cpu_us_per_request for bench in theirs]),
                      spread([bench.mean_latency_us for bench in ours], ".0f"),
                      spread([bench.mean_latency_us for bench in theirs], ".0f"))
    console.print(table)
    version = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout.splitlines()
    console.print(f"{version[0] if version else QEMU}; disk: page cache warm (the file is read before every boot)")
    console.print(f"CPU: {cpu_model()}, {os.cpu_count()} CPUs; load average (1, 5, 15 min) before each run: "
                  + "; ".join(loads) + f"; after: {load_average()}")


def udp_echo_report(runs: int, datagrams: int) -> None:
    """The UDP echo rows (virtio-net), measured by benchmarks/udp_echo.py's `run_one`, written separately: HOOK."""
    module = udp_echo_module()
    run_one = getattr(module, "run_one", None)
    if run_one is None:
        print("UDP echo: HOOK not connected: benchmarks/udp_echo.py (virtio-net) is missing or has no "
              "run_one(vmm, wait, size, count, window); run it on its own")
        return
    if os.geteuid() != 0 or shutil.which("ip") is None:
        print("UDP echo: needs root and iproute2 (network namespaces and taps): skipped")
        return
    table = Table(title=f"UDP echo through virtio-net (benchmarks/udp_echo.py run_one, {datagrams} datagrams, "
                        f"16 in flight): medians of {runs} runs (range)")
    for column in ("case", "pyrovisor datagrams/s", "QEMU datagrams/s", "pyrovisor MB/s", "QEMU MB/s", "ratio",
                   f"≥ {GOAL}"):
        table.add_column(column, justify="right")
    for wait in ("poll", "irq"):
        for size in (64, 1400):
            measured: dict[str, list[Any]] = {"pyrovisor": [], "qemu": []}  # udp_echo.Result
            for run in range(runs):
                for vmm in ("pyrovisor", "qemu") if run % 2 == 0 else ("qemu", "pyrovisor"):
                    measured[vmm].append(run_one(vmm, wait, size, datagrams, 16))
            rates = {vmm: [float(result.rate) for result in results] for vmm, results in measured.items()}
            megabytes = {vmm: [float(result.megabytes) for result in results]
                         for vmm, results in measured.items()}
            ratio = statistics.median(rates["pyrovisor"]) / statistics.median(rates["qemu"])
            table.add_row(f"{wait} {size} B", spread(rates["pyrovisor"], ",.0f"), spread(rates["qemu"], ",.0f"),
                          spread(megabytes["pyrovisor"], ".2f"), spread(megabytes["qemu"], ".2f"), f"{ratio:.2f}",
                          "met" if ratio >= GOAL else "not met")
    Console(width=230).print(table)
    print(f"load average after the UDP rows: {load_average()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="runs of every case and system; medians are reported")
    parser.add_argument("--seconds", type=int, default=2, help="length of one bench (whole seconds)")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all): "
                        + ", ".join(case.name for case in CASES))
    parser.add_argument("--systems", default="pyrovisor,qemu", help="pyrovisor, qemu or both")
    parser.add_argument("--disk", type=Path, default=Path("/tmp/pyrovisor-virtio-bench.img"),
                        help="the raw file (created with random data if missing or of another size)")
    parser.add_argument("--quiet", type=float, default=0, metavar="S",
                        help="before each case, wait up to S seconds until no other thread is runnable for 2 s")
    parser.add_argument("--json", type=Path, help="also write every run's figures to this file")
    parser.add_argument("--no-udp", action="store_true", help="skip the UDP echo rows")
    parser.add_argument("--datagrams", type=int, default=200000,
                        help="datagrams per UDP echo measurement (200,000: about 3 s polled, 8 s with interrupts)")
    args = parser.parse_args()
    wanted = {name.strip() for name in args.cases.split(",") if name.strip()}
    unknown = wanted - {case.name for case in CASES}
    if unknown:
        parser.error(f"unknown case(s) {', '.join(sorted(unknown))}")
    cases = [case for case in CASES if not wanted or case.name in wanted]
    systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    if "qemu" in systems and shutil.which(QEMU) is None:
        parser.error(f"{QEMU} is not installed (apt-get install qemu-system-x86), or pass --systems pyrovisor")
    if not args.disk.exists() or args.disk.stat().st_size != DISK_MIB << 20:
        make_disk(args.disk)
    runners: dict[str, Callable[[Case, Path, int], Bench]] = {"pyrovisor": run_pyrovisor, "qemu": run_qemu}
    results: dict[Case, dict[str, list[Bench]]] = {case: {system: [] for system in systems} for case in cases}
    loads = []
    for run in range(args.runs):
        loads.append(load_average())
        for case in cases:
            if args.quiet:
                waited = wait_until_quiet(args.quiet)
                print(f"run {run + 1} {case.name}: waited {waited:.1f} s for a quiet host, runnable now "
                      f"{runnable()}, load {load_average()}", flush=True)
            for system in systems if run % 2 == 0 else reversed(systems):
                warm(args.disk)
                bench = runners[system](case, args.disk, args.seconds)
                results[case][system].append(bench)
                print(f"run {run + 1} {case.name} {system}: {bench.iops:,.0f} IOPS {bench.mbs:,.1f} MB/s, "
                      f"exits/req {bench.user_exits_per_request}, load {load_average()}", flush=True)
    report(results, args.runs, args.seconds, loads)
    if args.json is not None:
        args.json.write_text(json.dumps({"loads": loads, "seconds": args.seconds, "cases": [
            {"case": case.name, **{system: [dataclasses.asdict(bench) for bench in benches]
                                   for system, benches in systems.items()}}
            for case, systems in results.items()]}, indent=1))
    if not args.no_udp:
        udp_echo_report(args.runs, args.datagrams)


if __name__ == "__main__":
    main()
