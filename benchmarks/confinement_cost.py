"""What seccomp confinement costs: exit latency, start-up, the filters' sizes, and the hostile guest confined.

- Exit latency: the `exitbench` guest of benchmarks/exit_latency.py (N port and N MMIO exits through pyrovisor's
  run loop), in alternating rounds with the vCPU thread unconfined (`off`) and confined (`enforce`), in this
  process; medians and the median of the per-round ratios.
- Start-up: from before `build_vm` to the hello guest's first console byte (its first exit), off against enforce
  in alternating rounds; the filter's own cost per thread (libseccomp compiling it, seccomp(2) loading it, the
  listener handed over); and the wall time of a whole `pyrovisor run hello` process with --seccomp off / enforce
  (which includes starting the supervisor process, overlapped with the VM's set-up).
- The chaos guest (random port and MMIO accesses) under --seccomp enforce for --chaos-operations operations: exit
  code, time, and calls refused (must be none).

Run: python benchmarks/confinement_cost.py [--iterations N] [--rounds R] [--chaos-operations N]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from exit_latency import PhaseTimes, guest_config, run_pyrovisor
from rich.console import Console
from rich.table import Table

from pyrovisor.builder import build_vm
from pyrovisor.catalog import load_catalog
from pyrovisor.config import MachineConfig
from pyrovisor.confine import policy
from pyrovisor.confine.filters import (
    THREAD_KINDS,
    argument_filtered,
    build_filter,
    channel_rules,
    filter_size,
)


def host_line() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return f"{model}, {os.cpu_count()} CPUs, load average {load}"


def exit_rounds(iterations: int, rounds: int) -> dict[str, list[PhaseTimes]]:
    config = guest_config(iterations)
    results: dict[str, list[PhaseTimes]] = {"off": [], "enforce": []}
    for _ in range(rounds):
        for mode in ("off", "enforce"):
            policy.configure(mode)
            results[mode].append(run_pyrovisor(config, iterations))
    policy.configure("off")
    return results


def first_output_ms(mode: str) -> float:
    """Milliseconds from before build_vm to the hello guest's first console byte."""
    policy.configure(mode)
    spec = load_catalog()["hello"]
    first: list[float] = []

    def output(data: bytes) -> None:
        if not first:
            first.append(time.perf_counter())

    started = time.perf_counter()
    with build_vm(MachineConfig(kernel=spec.elf, memory_size=spec.memory_size), output) as vmm:
        vmm.run(timeout=60)
    policy.configure("off")
    return (first[0] - started) * 1e3


def _in_thread(target: Callable[[], float]) -> float:
    """Run `target` on a fresh thread (a filter loaded there dies with it); its result, in ms."""
    result: list[float] = []
    thread = threading.Thread(target=lambda: result.append(target()))
    thread.start()
    thread.join()
    return result[0]


def _compile_ms(kind: str, channel: int) -> float:
    start = time.perf_counter()
    with build_filter(kind, extra=channel_rules(channel)) as compiled:
        compiled.bpf()
    return (time.perf_counter() - start) * 1e3


def _load_ms(kind: str, channel: int) -> float:
    with build_filter(kind, extra=channel_rules(channel)) as compiled:
        compiled.bpf()
        start = time.perf_counter()
        fd = compiled.load(listener=True)
        elapsed = (time.perf_counter() - start) * 1e3
    assert fd is not None
    os.close(fd)
    return elapsed


def _enter_ms(kind: str, confinement: policy.Confinement) -> float:
    start = time.perf_counter()
    confinement.enter(kind, None)
    return (time.perf_counter() - start) * 1e3


def filter_costs(rounds: int) -> dict[str, tuple[float, float, float]]:
    """Per kind: median ms to compile (libseccomp), to load (seccomp(2)), and all of enter_thread."""
    confinement = policy.current()
    assert confinement is not None
    channel = confinement.channel_fd
    costs: dict[str, tuple[float, float, float]] = {}
    for kind in THREAD_KINDS:
        compiled = [_in_thread(functools.partial(_compile_ms, kind, channel)) for _ in range(rounds)]
        loaded = [_in_thread(functools.partial(_load_ms, kind, channel)) for _ in range(rounds)]
        entered = [_in_thread(functools.partial(_enter_ms, kind, confinement)) for _ in range(rounds)]
        costs[kind] = (statistics.median(compiled), statistics.median(loaded), statistics.median(entered))
    return costs


def process_wall_ms(mode: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pyrovisor", "run", "hello", "--seccomp", mode], check=True,
                   stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    return (time.perf_counter() - start) * 1e3


def chaos(operations: int) -> tuple[int, float, list[dict[str, object]], str]:
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "seccomp.jsonl"
        env = {**os.environ, "PYROVISOR_SECCOMP_LOG": str(log)}
        env.pop("PYROVISOR_SECCOMP", None)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pyrovisor", "run", "chaos", "--args",
                               f"operations={operations} seed=1", "--seccomp", "enforce"], capture_output=True,
                              env=env, stdin=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    lines = done.stdout.decode(errors="replace").splitlines()
    verdict = next((line for line in lines if line.startswith(("PASS:", "FAIL:"))), "no verdict")
    return done.returncode, seconds, records, verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20_000, help="exits of each kind per round")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds; medians are reported")
    parser.add_argument("--chaos-operations", type=int, default=1_000_000, help="0 to skip the chaos run")
    args = parser.parse_args()
    os.environ.pop("PYROVISOR_SECCOMP", None)
    console = Console(width=200)
    console.print(f"host: {host_line()}")

    sizes = Table(title="filters (x86-64; the channel's sendmsg and close included)")
    for column in ("thread kind", "system calls allowed", "argument-filtered calls", "rules with arguments",
                   "BPF instructions"):
        sizes.add_column(column, justify="right")
    for kind in THREAD_KINDS:
        size = filter_size(kind)
        sizes.add_row(kind, str(size.syscalls), str(len(argument_filtered(kind))), str(size.argument_rules),
                      str(size.bpf_instructions))
    console.print(sizes)

    results = exit_rounds(args.iterations, args.rounds)
    table = Table(title=f"exit latency, µs per exit (medians of {args.rounds} alternating rounds of "
                        f"{args.iterations} exits)")
    for column in ("exit", "off", "enforce", "enforce / off (median per round)", "rounds' ratios"):
        table.add_column(column, justify="right")
    for name, attribute in (("port I/O (out)", "pio_us"), ("MMIO write", "mmio_us")):
        off = [getattr(r, attribute) for r in results["off"]]
        on = [getattr(r, attribute) for r in results["enforce"]]
        ratios = sorted(b / a for a, b in zip(off, on, strict=True))
        table.add_row(name, f"{statistics.median(off):.2f}", f"{statistics.median(on):.2f}",
                      f"{statistics.median(ratios):.3f}", f"{ratios[0]:.3f}-{ratios[-1]:.3f}")
    console.print(table)

    startup = Table(title=f"start-up, ms (medians of {args.rounds} alternating rounds)")
    for column in ("measure", "off", "enforce", "difference"):
        startup.add_column(column, justify="right")
    for name, measure in (("build_vm → hello's first console byte", first_output_ms),
                          ("`pyrovisor run hello` process, wall", process_wall_ms)):
        off, on = [], []
        for _ in range(args.rounds):
            off.append(measure("off"))
            on.append(measure("enforce"))
        startup.add_row(name, f"{statistics.median(off):.1f}", f"{statistics.median(on):.1f}",
                        f"{statistics.median(on) - statistics.median(off):+.1f}")
    console.print(startup)

    policy.configure("enforce")
    costs = filter_costs(args.rounds)
    policy.configure("off")
    per_thread = Table(title="the filter's own cost per thread, ms (medians)")
    for column in ("thread kind", "compile (libseccomp)", "load (seccomp(2))", "enter_thread in all"):
        per_thread.add_column(column, justify="right")
    for kind, (compile_ms, load_ms, enter_ms) in costs.items():
        per_thread.add_row(kind, f"{compile_ms:.2f}", f"{load_ms:.3f}", f"{enter_ms:.2f}")
    console.print(per_thread)

    if args.chaos_operations:
        code, seconds, records, verdict = chaos(args.chaos_operations)
        console.print(f"chaos guest, {args.chaos_operations} operations, --seccomp enforce: exit code {code}, "
                      f"{seconds:.1f} s, {len(records)} refused call(s); {verdict}")
        for record in records[:10]:
            console.print(f"  refused: {record}")


if __name__ == "__main__":
    main()
