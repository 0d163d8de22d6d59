"""Microseconds per port-I/O and per MMIO exit through pyrovisor's run loop, against a bare C loop.

Both run the same guest image (the `exitbench` guest, dumped after pyrovisor built it) in the same
invocation: N `out` instructions to a port, then N 32-bit stores to an MMIO address, from user mode,
between marker writes that each side timestamps. pyrovisor dispatches every exit through its buses
to a device (a write counter); the C loop does nothing with it.

The host under this machine is shared and exit costs drift by ±20 % within a minute, so the two run
in many short alternating rounds and the table reports medians, including the median of the
per-round ratios (each round's C and pyrovisor runs are back to back).

With --accounting it measures instead what per-process accounting (docs/introspection.md section 2) costs:
pyrovisor with accounting off against on, in alternating rounds, (1) on the same `exitbench` guest (no kernel
profile: exits are charged by CR3 alone) and (2) on the OS guest's `exits` program (one VM per phase; the guest
times its own writes; CR3 resolved to processes through the profile, the kernel's pid counter read per exit).
It prints the CPU model and the load average beside the ratios (target: on at most 1.1 times off).

Run: python benchmarks/exit_latency.py [--iterations N] [--rounds R] [--accounting]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pyrovisor.builder import build_vm
from pyrovisor.catalog import load_catalog
from pyrovisor.config import MachineConfig

HERE = Path(__file__).resolve().parent
BENCH_PORT = 0x510
MARKER_PORT = 0x511
BENCH_MMIO = 0xD0000000
TARGET_RATIO = 1.3
ACCOUNTING_TARGET_RATIO = 1.1
OS_EXITS_LINE = re.compile(r"^exits \d+: \d+ (pio|mmio) writes of \d+ bytes to 0x[0-9a-f]+: ([0-9.]+) us each$", re.M)


@dataclass
class PhaseTimes:
    pio_us: float
    mmio_us: float


class CountingDevice:
    """The device the benchmark writes to: counts writes, reads as zero."""

    def __init__(self) -> None:
        self.writes = 0

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1


class Markers:
    """Timestamps of the guest's marker writes (1: port loop, 2: MMIO loop, 3: done)."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.times[value] = time.perf_counter()


def guest_config(iterations: int) -> MachineConfig:
    spec = load_catalog()["exitbench"]
    return MachineConfig(kernel=spec.elf, memory_size=spec.memory_size, cmdline=f"iterations={iterations}")


def dump_guest(config: MachineConfig, directory: Path) -> tuple[Path, Path, Path]:
    """The freshly built VM's memory and vCPU 0 registers, for the C loop to start from."""
    with build_vm(config, lambda data: None) as vmm:
        region = vmm.memory.regions[0]
        paths = (directory / "memory.bin", directory / "sregs.bin", directory / "regs.bin")
        paths[0].write_bytes(region.view)
        paths[1].write_bytes(bytes(vmm.vcpus[0].fd.get_sregs()))
        paths[2].write_bytes(bytes(vmm.vcpus[0].fd.get_regs()))
    return paths


def run_c_loop(binary: Path, dumps: tuple[Path, Path, Path], iterations: int) -> PhaseTimes:
    output = subprocess.run([str(binary), *map(str, dumps)], check=True, capture_output=True, text=True).stdout
    fields = dict(item.split("=") for item in output.split())
    assert int(fields["pio_exits"]) == iterations + 1 and int(fields["mmio_exits"]) == iterations + 1, fields
    return PhaseTimes(float(fields["pio_seconds"]) / (iterations + 1) * 1e6,
                      float(fields["mmio_seconds"]) / (iterations + 1) * 1e6)


def run_pyrovisor(config: MachineConfig, iterations: int, accounting: bool = False) -> PhaseTimes:
    markers, device = Markers(), CountingDevice()
    with build_vm(config, lambda data: None) as vmm:
        if accounting:
            from pyrovisor.introspect.accounting import set_accounting
            set_accounting(vmm, True, require_profile=False)
        vmm.port_bus.insert(MARKER_PORT, 1, markers, "markers")
        vmm.port_bus.insert(BENCH_PORT, 1, device, "bench-port")
        vmm.mmio_bus.insert(BENCH_MMIO, 4096, device, "bench-mmio")
        outcome = vmm.run(timeout=600)
    assert outcome.exit_code == 0, outcome.describe()
    assert device.writes == 2 * iterations, device.writes
    times = markers.times
    return PhaseTimes((times[2] - times[1]) / (iterations + 1) * 1e6, (times[3] - times[2]) / (iterations + 1) * 1e6)


def sync_regs_cost(chunks: int = 30, exits: int = 2000) -> tuple[float, float]:
    """µs per bare KVM_RUN round trip (exitbench) without and with KVM_SYNC_X86_SREGS, interleaved in chunks."""
    config = guest_config(10_000_000)
    samples: dict[bool, list[float]] = {False: [], True: []}
    with build_vm(config, lambda data: None) as vmm:
        fd = vmm.vcpus[0].fd
        for _ in range(chunks):
            for shared in (False, True):
                fd.share_sregs(shared)
                started = time.perf_counter()
                for _ in range(exits):
                    fd.run()
                samples[shared].append((time.perf_counter() - started) / exits * 1e6)
        fd.share_sregs(False)
    return statistics.median(samples[False]), statistics.median(samples[True])


def resolution_cost(samples: int = 50) -> float:
    """µs of CPU for one CR3 -> process resolution (a read of the OS guest's process table via the profile)."""
    from pyrovisor.catalog import guests_dir
    from pyrovisor.introspect.accounting import set_accounting

    directory = guests_dir()
    config = MachineConfig(kernel=directory / "os.elf", memory_size=64 << 20, initrd=directory / "os-programs.img",
                           cmdline="counter count=5 period_ms=5; exits mode=pio count=1000")
    with build_vm(config, lambda data: None) as vmm:
        accountant = set_accounting(vmm, True)
        assert vmm.run(timeout=600).exit_code == 0
        cr3 = next(row["cr3"] for row in accountant.report()["processes"] if row["name"] == "exits")
        times = []
        for _ in range(samples):
            started = time.thread_time_ns()
            accountant.resolve(cr3)
            times.append(time.thread_time_ns() - started)
    return statistics.median(times) / 1e3


def run_os_exits(mode: str, iterations: int, accounting: bool) -> float:
    """µs per write as the OS guest's `exits` program measures it (its own TSC around its N writes)."""
    from pyrovisor.catalog import guests_dir

    target = f"port={BENCH_PORT:#x}" if mode == "pio" else f"addr={BENCH_MMIO:#x} size=4"
    directory = guests_dir()
    config = MachineConfig(kernel=directory / "os.elf", memory_size=64 << 20, initrd=directory / "os-programs.img",
                           cmdline=f"exits mode={mode} {target} count={iterations}")
    console = bytearray()
    with build_vm(config, console.extend) as vmm:
        if accounting:
            from pyrovisor.introspect.accounting import set_accounting
            accountant = set_accounting(vmm, True)
        outcome = vmm.run(timeout=600)
        assert outcome.exit_code == 0, outcome.describe()
        if accounting:
            charged = {row["pid"]: row["exits"][mode] for row in accountant.report()["processes"]}
            assert charged.get(1, 0) >= iterations, charged
    found = OS_EXITS_LINE.search(console.decode(errors="replace"))
    assert found is not None and found.group(1) == mode, console.decode(errors="replace")
    return float(found.group(2))


def host_context() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return f"CPU: {model} ({os.cpu_count()} CPUs), load average: {load}"


def accounting_cost(iterations: int, rounds: int) -> None:
    """Accounting off against on, alternating, on exitbench and on the OS guest's `exits` program."""
    console = Console(width=200)
    console.print(f"before: {host_context()}")
    config = guest_config(iterations)
    results: dict[str, tuple[list[float], list[float]]] = {}
    for _ in range(rounds):
        for flag in (False, True):
            times = run_pyrovisor(config, iterations, accounting=flag)
            for name, value in (("exitbench port I/O", times.pio_us), ("exitbench MMIO write", times.mmio_us)):
                results.setdefault(name, ([], []))[flag].append(value)
        for mode in ("pio", "mmio"):
            for flag in (False, True):
                name = f"os exits mode={mode}"
                results.setdefault(name, ([], []))[flag].append(run_os_exits(mode, iterations, flag))
    table = Table(title=f"accounting cost, µs per exit (medians of {rounds} alternating rounds of {iterations} exits)")
    for column in ("exit", "accounting off", "accounting on", "ratio (median per round)", "rounds' ratios",
                   f"≤ {ACCOUNTING_TARGET_RATIO}"):
        table.add_column(column, justify="right")
    for name, (off, on) in results.items():
        ratios = sorted(b / a for a, b in zip(off, on, strict=True))
        ratio = statistics.median(ratios)
        table.add_row(name, f"{statistics.median(off):.2f}", f"{statistics.median(on):.2f}", f"{ratio:.3f}",
                      f"{ratios[0]:.2f}-{ratios[-1]:.2f}", "met" if ratio <= ACCOUNTING_TARGET_RATIO else "missed")
    console.print(table)
    plain, shared = sync_regs_cost()
    console.print(f"KVM_RUN round trip (exitbench, medians of 30 interleaved chunks of 2000): {plain:.2f} µs, "
                  f"{shared:.2f} µs with KVM_SYNC_X86_SREGS")
    console.print(f"one CR3 -> process resolution (process table read through the profile): "
                  f"{resolution_cost():.0f} µs CPU (median of 50)")
    console.print(f"after: {host_context()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=30_000, help="exits of each kind per round")
    parser.add_argument("--rounds", type=int, default=9, help="alternating rounds; medians are reported")
    parser.add_argument("--accounting", action="store_true",
                        help="measure per-process accounting on against off instead of pyrovisor against C")
    args = parser.parse_args()
    if args.accounting:
        accounting_cost(args.iterations, args.rounds)
        return
    config = guest_config(args.iterations)
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        binary = directory / "exit_loop"
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(HERE / "exit_loop.c")], check=True)
        dumps = dump_guest(config, directory)
        c_rounds, py_rounds = [], []
        for _ in range(args.rounds):
            c_rounds.append(run_c_loop(binary, dumps, args.iterations))
            py_rounds.append(run_pyrovisor(config, args.iterations))

    table = Table(title=f"exit latency, µs per exit (medians of {args.rounds} rounds of {args.iterations} exits)")
    for column in ("exit", "C loop", "pyrovisor", "ratio (median per round)", "rounds' ratios", f"≤ {TARGET_RATIO}"):
        table.add_column(column, justify="right")
    for name, attribute in (("port I/O (out)", "pio_us"), ("MMIO write", "mmio_us")):
        c_value = statistics.median(getattr(r, attribute) for r in c_rounds)
        py_value = statistics.median(getattr(r, attribute) for r in py_rounds)
        ratios = sorted(getattr(p, attribute) / getattr(c, attribute) for c, p in zip(c_rounds, py_rounds, strict=True))
        ratio = statistics.median(ratios)
        table.add_row(name, f"{c_value:.2f}", f"{py_value:.2f}", f"{ratio:.2f}", f"{ratios[0]:.2f}-{ratios[-1]:.2f}",
                      "met" if ratio <= TARGET_RATIO else "missed")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
