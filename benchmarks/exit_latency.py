"""Microseconds per port-I/O and per MMIO exit through pyrovisor's run loop, against a bare C loop.

Both run the same guest image (the `exitbench` guest, dumped after pyrovisor built it) in the same
invocation: N `out` instructions to a port, then N 32-bit stores to an MMIO address, from user mode,
between marker writes that each side timestamps. pyrovisor dispatches every exit through its buses
to a device (a write counter); the C loop does nothing with it.

The host under this machine is shared and exit costs drift by ±20 % within a minute, so the two run
in many short alternating rounds and the table reports medians, including the median of the
per-round ratios (each round's C and pyrovisor runs are back to back).

Run: python benchmarks/exit_latency.py [--iterations N] [--rounds R]
"""

from __future__ import annotations

import argparse
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


def run_pyrovisor(config: MachineConfig, iterations: int) -> PhaseTimes:
    markers, device = Markers(), CountingDevice()
    with build_vm(config, lambda data: None) as vmm:
        vmm.port_bus.insert(MARKER_PORT, 1, markers, "markers")
        vmm.port_bus.insert(BENCH_PORT, 1, device, "bench-port")
        vmm.mmio_bus.insert(BENCH_MMIO, 4096, device, "bench-mmio")
        outcome = vmm.run(timeout=600)
    assert outcome.exit_code == 0, outcome.describe()
    assert device.writes == 2 * iterations, device.writes
    times = markers.times
    return PhaseTimes((times[2] - times[1]) / (iterations + 1) * 1e6, (times[3] - times[2]) / (iterations + 1) * 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=30_000, help="exits of each kind per round")
    parser.add_argument("--rounds", type=int, default=9, help="alternating rounds; medians are reported")
    args = parser.parse_args()
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
