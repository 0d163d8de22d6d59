"""Live migration of a 1 GiB guest over loopback TCP while it dirties memory at several rates.

The source VM runs in this process (the `ticker` guest: an 8 MiB pattern re-checked every tick and a
256 MiB working set, filled at start, rewritten at the given rate); `pyrovisor receive` is the
destination, in another process. Each row migrates with the default policy and reports total time,
downtime (measured at both ends), rounds and bytes, beside the pre-copy model of `pyrovisor.lab`
(Liu et al. 2011) fed with the same memory, bandwidth and dirty rate. The idle row gives the
throughput; two rows repeat the 0 and 100 MB/s cases with dirty rings instead of the dirty bitmap.

QEMU (when installed: apt-get install qemu-system-x86) migrates the same guest in the same run: it
boots the same ELF through the guest library's PVH entry, with its bandwidth cap lifted and its default
300 ms downtime limit, destination on loopback TCP; its rounds are its dirty-bitmap syncs.

Run: python benchmarks/migration.py [--rates 0,10,50,100,200] [--memory 1G] [--no-qemu]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pyrovisor.arch.x86_64.layout import parse_size
from pyrovisor.builder import build_vm
from pyrovisor.catalog import load_catalog
from pyrovisor.config import MachineConfig
from pyrovisor.migration.source import migrate
from pyrovisor.migration.stats import MigrationResult

sys.path.insert(0, str(Path(__file__).resolve().parent))  # qemu_baseline

WORKING_SET_MIB = 256
PATTERN_MIB = 8
DOWNTIME_TARGET_S = 0.030  # at 100 MB/s, default policy
THROUGHPUT_TARGET = 1e9  # bytes of guest memory per second, idle guest


@dataclass(frozen=True)
class Case:
    rate_mb_s: float
    dirty_ring: int = 0

    @property
    def label(self) -> str:
        return f"{self.rate_mb_s:g} MB/s" + (" (dirty ring)" if self.dirty_ring else "")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def guest_args(rate_mb_s: float) -> str:
    pages_per_s = int(rate_mb_s * 1e6 / 4096)
    return (f"ticks=0 period_ms=10 buffer_mib={PATTERN_MIB} dirty_mib={WORKING_SET_MIB if pages_per_s else 0} "
            f"dirty_rate={pages_per_s}")


def run_qemu_case(rate_mb_s: float, memory: int) -> dict[str, float]:
    """QEMU migrating the same guest, for comparison: total, downtime, MiB transferred, bitmap syncs."""
    from qemu_baseline import Qemu, free_port

    elf = load_catalog()["ticker"].elf
    port = free_port()
    source = Qemu(elf, memory >> 20, guest_args(rate_mb_s))
    destination = Qemu(elf, memory >> 20, guest_args(rate_mb_s), incoming=f"tcp:127.0.0.1:{port}")
    try:
        source.wait_console("tick 100 ok")
        source.execute("migrate-set-parameters", **{"max-bandwidth": 100 << 30, "downtime-limit": 300})
        source.execute("migrate", uri=f"tcp:127.0.0.1:{port}")
        info = source.wait_migration(300)
        if info["status"] != "completed":
            raise RuntimeError(f"QEMU migration {info['status']}")
        return {"total_s": info["total-time"] / 1e3, "downtime_s": info["downtime"] / 1e3,
                "mib": info["ram"]["transferred"] / 2**20, "rounds": info["ram"]["dirty-sync-count"]}
    finally:
        source.close()
        destination.close()


def run_case(case: Case, memory: int) -> tuple[MigrationResult, float]:
    args = guest_args(case.rate_mb_s)
    config = MachineConfig(kernel=load_catalog()["ticker"].elf, memory_size=memory, cmdline=args,
                           dirty_ring_entries=case.dirty_ring)
    port = free_port()
    receiver = subprocess.Popen([sys.executable, "-m", "pyrovisor", "receive", "--listen", f"127.0.0.1:{port}",
                                 "--timeout", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    output = bytearray()
    try:
        with build_vm(config, output.extend) as vmm:
            vmm.start()
            deadline = time.monotonic() + 60
            while b"tick 100 ok" not in output and time.monotonic() < deadline:  # 1 s of steady dirtying
                time.sleep(0.01)
            assert receiver.stderr is not None
            announced = receiver.stderr.readline()
            assert "listening on" in announced, announced
            result = migrate(vmm, f"127.0.0.1:{port}")
        out, err = receiver.communicate(timeout=60)
        assert receiver.returncode == 124 and "MISMATCH" not in out, err  # 124: --timeout stopped a running guest
    finally:
        if receiver.poll() is None:
            receiver.kill()
    measured_rate = _measured_dirty_rate(output.decode())
    return result, measured_rate


def _measured_dirty_rate(console: str) -> float:
    rates = [int(line.split("(")[1].split()[0]) for line in console.splitlines() if line.startswith("dirtied ")]
    return rates[-1] * 4096 / 1e6 if rates else 0.0


def model_prediction(result: MigrationResult, rate_mb_s: float) -> Any:
    """The lab's pre-copy model for the same memory (what round 0 actually sent), bandwidth and dirty rate."""
    try:
        from pyrovisor.lab.precopy import predict
    except ImportError:
        return None
    first = result.rounds[0]
    data_bytes = (first.pages_sent - first.zero_pages) * 4096
    return predict(memory_bytes=max(data_bytes, 4096), bandwidth_bytes_per_s=first.bandwidth_bytes_per_s,
                   dirty_bytes_per_s=rate_mb_s * 1e6, downtime_limit_s=0.3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="0,10,50,100,200", help="dirty rates in MB/s, comma separated")
    parser.add_argument("--memory", default="1G", help="guest memory")
    parser.add_argument("--no-ring", action="store_true", help="skip the dirty-ring rows")
    parser.add_argument("--no-qemu", action="store_true", help="skip the QEMU baseline")
    args = parser.parse_args()
    from qemu_baseline import qemu_available

    qemu_missing = "skipped (--no-qemu)" if args.no_qemu else qemu_available()
    memory = parse_size(args.memory)
    cases = [Case(float(rate)) for rate in args.rates.split(",")]
    if not args.no_ring:
        cases += [Case(0, 4096), Case(100, 4096)]

    table = Table(title=f"live migration of a {memory >> 20} MiB guest over loopback TCP (default policy)")
    for column in ("dirtying", "measured", "rounds", "total", "downtime src/dst", "MiB on wire", "RAM/s",
                   "data rate", "model: rounds", "model: total", "model: downtime", "QEMU: syncs", "QEMU: total",
                   "QEMU: downtime", "QEMU: MiB"):
        table.add_column(column, justify="right")
    verdicts = []
    for case in cases:
        result, measured = run_case(case, memory)
        prediction = model_prediction(result, case.rate_mb_s)
        throughput = result.memory_bytes / result.total_seconds
        model = ("-", "-", "-") if prediction is None else (
            str(prediction.rounds), f"{prediction.total_time_s:.2f} s", f"{prediction.downtime_s * 1e3:.1f} ms")
        qemu = ("-", "-", "-", "-")
        if qemu_missing is None and not case.dirty_ring:
            baseline = run_qemu_case(case.rate_mb_s, memory)
            qemu = (str(baseline["rounds"]), f"{baseline['total_s']:.2f} s", f"{baseline['downtime_s'] * 1e3:.0f} ms",
                    f"{baseline['mib']:.0f}")
        table.add_row(case.label, f"{measured:.0f} MB/s", str(result.precopy_rounds), f"{result.total_seconds:.2f} s",
                      f"{result.downtime_source_s * 1e3:.1f}/{result.downtime_destination_s * 1e3:.1f} ms",
                      f"{result.bytes_on_wire / 2**20:.0f}", f"{throughput / 1e9:.2f} GB/s",
                      f"{result.rounds[0].bandwidth_bytes_per_s / 1e6:.0f} MB/s", *model, *qemu)
        if case.rate_mb_s == 100 and not case.dirty_ring:
            verdicts.append(f"downtime at 100 MB/s: {result.downtime_source_s * 1e3:.1f} ms (target ≤ "
                            f"{DOWNTIME_TARGET_S * 1e3:.0f} ms: {'met' if result.downtime_source_s <= DOWNTIME_TARGET_S else 'missed'})")
        if case.rate_mb_s == 0 and not case.dirty_ring:
            verdicts.append(f"idle guest: {throughput / 1e9:.2f} GB/s of guest memory (target ≥ 1 GB/s: "
                            f"{'met' if throughput >= THROUGHPUT_TARGET else 'missed'})")
    console = Console(width=200)
    console.print(table)
    console.print("RAM/s: guest memory moved per second (zero pages travel as markers); data rate: page data "
                  "sent per second of sending in round 0")
    for line in verdicts:
        console.print(line)
    if qemu_missing is not None:
        console.print(f"QEMU baseline: {qemu_missing}")
    if _lab_missing():
        console.print("the lab's pre-copy model (pyrovisor.lab.precopy) is not available: model columns empty")


def _lab_missing() -> bool:
    try:
        import pyrovisor.lab.precopy  # noqa: F401
    except ImportError:
        return True
    return False


if __name__ == "__main__":
    main()
