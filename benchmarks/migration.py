"""Live migration of a 1 GiB guest over loopback TCP while it dirties memory at several rates.

The source VM runs in this process: the pyrovisor OS (docs/guest-os.md) on two vCPUs with `counter`
(a heartbeat), `memcheck` (an 8 MiB pattern verified every 100 ms) and `memdirty` rewriting a 256 MiB
working set at the given rate (pages/s = MB/s * 1e6 / 4096; no memdirty at 0 MB/s). `pyrovisor
receive` is the destination, in another process; it runs the guest on for a second and must show new
memcheck passes and no failure. Each row migrates with the default policy and reports total time,
downtime (measured at both ends), rounds and bytes, the dirty rate memdirty reported, beside the
pre-copy model of `pyrovisor.lab.precopy` (Liu et al. 2011) fed with what round 0 sent, its bandwidth
and the measured dirty rate. The idle rows give the throughput, of a guest that never wrote most of its
memory (zero pages travel as markers) and of one with 256 MiB written; two rows repeat the 0 and 100 MB/s
cases with dirty rings instead of the dirty bitmap (`--ring-entries`, the largest this host allows by
default: on kvm_pvm the OS kernel's emulated stores can overrun a full ring, docs/migration.md).

QEMU (when installed: apt-get install qemu-system-x86) migrates the same guest in the same run: it
boots the same os.elf and programs archive through the PVH entry, with its bandwidth cap lifted and its
default 300 ms downtime limit, destination on loopback TCP; its rounds are its dirty-bitmap syncs.

With --psk-file, both ends authenticate with that pre-shared key (HMAC-SHA256 frames, keyed BLAKE2b page
digests) instead of CRC-32: the difference is the cost of authentication. --working-set sets how much memory
memdirty writes (the filled row), so that smaller guests can be measured.

Run: python benchmarks/migration.py [--rates 0,10,50,100,200] [--memory 1G] [--working-set 256M] [--no-ring]
     [--no-qemu] [--psk-file FILE]
"""

from __future__ import annotations

import argparse
import re
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
from pyrovisor.catalog import guests_dir
from pyrovisor.config import MachineConfig
from pyrovisor.migration.source import MigrationOptions, migrate
from pyrovisor.migration.stats import MigrationResult

sys.path.insert(0, str(Path(__file__).resolve().parent))  # qemu_baseline

VCPUS = 2
WORKING_SET_PAGES = 65536  # 256 MiB unless --working-set says otherwise
PAGE_SIZE = 4096
DOWNTIME_TARGET_S = 0.030  # at 100 MB/s, default policy
THROUGHPUT_TARGET = 1e9  # bytes of guest memory per second, idle guest
RING_ENTRIES = 65536  # KVM's largest dirty ring here (1 MiB per vCPU)

SECOND = re.compile(r"^memdirty \d+: second (?P<second>\d+): (?P<pages>\d+) pages dirtied$", re.MULTILINE)
BEAT_10 = re.compile(r"^counter \d+: beat 10 ", re.MULTILINE)
PASS = re.compile(r"^memcheck \d+: pass \d+ ok", re.MULTILINE)


@dataclass(frozen=True)
class Case:
    rate_mb_s: float
    dirty_ring: int = 0
    filled: bool = False  # idle, but with memdirty's 256 MiB written once (pages to send, not zero markers)

    @property
    def label(self) -> str:
        if self.filled:
            return "idle, working set written"
        return f"{self.rate_mb_s:g} MB/s" + (" (dirty ring)" if self.dirty_ring else "")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def guest_programs(case: Case, working_set_pages: int = WORKING_SET_PAGES) -> str:
    programs = "counter count=0 period_ms=100; memcheck mib=8 passes=0 interval_ms=100"
    # memdirty's rate=0 means "as fast as it can": the idle case has no memdirty, the filled one a page a second.
    pages_per_s = 1 if case.filled else round(case.rate_mb_s * 1e6 / PAGE_SIZE)
    if pages_per_s:
        programs += f"; memdirty pages={working_set_pages} rate={pages_per_s} seconds=0"
    return programs


def ready_mark(case: Case) -> re.Pattern[str]:
    """What the guest prints once it can be migrated: a second of dirtying at its rate, or ten heartbeats."""
    return SECOND if case.filled or case.rate_mb_s else BEAT_10


def run_qemu_case(case: Case, memory: int) -> dict[str, float]:
    """QEMU migrating the same guest, for comparison: total, downtime, MiB transferred, bitmap syncs."""
    from qemu_baseline import Qemu, free_port

    directory, programs = guests_dir(), guest_programs(case)
    port = free_port()
    guest: dict[str, Any] = {"initrd": directory / "os-programs.img", "vcpus": VCPUS}
    source = Qemu(directory / "os.elf", memory >> 20, programs, **guest)
    destination = Qemu(directory / "os.elf", memory >> 20, programs, incoming=f"tcp:127.0.0.1:{port}", **guest)
    try:
        source.wait_console(ready_mark(case))
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


def run_case(case: Case, memory: int, working_set_pages: int = WORKING_SET_PAGES,
             psk_file: Path | None = None) -> tuple[MigrationResult, float]:
    directory = guests_dir()
    config = MachineConfig(kernel=directory / "os.elf", initrd=directory / "os-programs.img", memory_size=memory,
                           vcpus=VCPUS, cmdline=guest_programs(case, working_set_pages),
                           dirty_ring_entries=case.dirty_ring)
    port = free_port()
    key = ["--psk-file", str(psk_file)] if psk_file is not None else []
    receiver = subprocess.Popen([sys.executable, "-m", "pyrovisor", "receive", "--listen", f"127.0.0.1:{port}",
                                 "--timeout", "1", *key], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    output = bytearray()
    try:
        with build_vm(config, output.extend) as vmm:
            vmm.start()
            deadline = time.monotonic() + 60
            while not ready_mark(case).search(output.decode(errors="replace")):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the guest never reached its steady state:\n{output.decode()[-1000:]}")
                time.sleep(0.01)
            assert receiver.stderr is not None
            announced = receiver.stderr.readline()
            assert "listening on" in announced, announced
            result = migrate(vmm, f"127.0.0.1:{port}", MigrationOptions(psk_file=psk_file))
        out, err = receiver.communicate(timeout=60)
        # 124: --timeout stopped a running guest, which verified its pattern again and found it intact.
        assert receiver.returncode == 124 and PASS.search(out) and not re.search("FAIL|MISMATCH", out), (out, err)
    finally:
        if receiver.poll() is None:
            receiver.kill()
    return result, measured_dirty_rate(output.decode(errors="replace"))


def measured_dirty_rate(console: str) -> float:
    """MB/s memdirty reported for its last whole second on the source (0 without memdirty)."""
    seconds = SECOND.findall(console)
    return int(seconds[-1][1]) * PAGE_SIZE / 1e6 if seconds else 0.0


def model_prediction(result: MigrationResult, dirty_mb_s: float) -> Any:
    """The lab's pre-copy model for the same memory (what round 0 actually sent), bandwidth and dirty rate."""
    try:
        from pyrovisor.lab.precopy import predict
    except ImportError:
        return None
    first = result.rounds[0]
    data_bytes = (first.pages_sent - first.zero_pages) * PAGE_SIZE
    return predict(memory_bytes=max(data_bytes, PAGE_SIZE), bandwidth_bytes_per_s=first.bandwidth_bytes_per_s,
                   dirty_bytes_per_s=dirty_mb_s * 1e6, downtime_limit_s=0.3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="0,10,50,100,200", help="dirty rates in MB/s, comma separated")
    parser.add_argument("--memory", default="1G", help="guest memory")
    parser.add_argument("--ring-entries", type=int, default=RING_ENTRIES, help="dirty ring entries per vCPU")
    parser.add_argument("--no-ring", action="store_true", help="skip the dirty-ring rows")
    parser.add_argument("--no-qemu", action="store_true", help="skip the QEMU baseline")
    parser.add_argument("--working-set", default="256M", help="memory memdirty writes in the filled row")
    parser.add_argument("--psk-file", type=Path, help="authenticate the stream with this pre-shared key")
    args = parser.parse_args()
    from qemu_baseline import qemu_available

    qemu_missing = "skipped (--no-qemu)" if args.no_qemu else qemu_available()
    memory = parse_size(args.memory)
    cases = [Case(float(rate)) for rate in args.rates.split(",")]
    cases.insert(1 if cases and cases[0].rate_mb_s == 0 else 0, Case(0, filled=True))
    if not args.no_ring:
        cases += [Case(0, args.ring_entries), Case(100, args.ring_entries)]

    table = Table(title=f"live migration of a {memory >> 20} MiB OS guest ({VCPUS} vCPUs) over loopback TCP "
                        f"(default policy{', pre-shared key' if args.psk_file else ''})")
    for column in ("dirtying", "measured", "rounds", "total", "downtime src/dst", "MiB on wire", "RAM/s",
                   "data rate", "model: rounds", "model: total", "model: downtime", "QEMU: syncs", "QEMU: total",
                   "QEMU: downtime", "QEMU: MiB"):
        table.add_column(column, justify="right")
    verdicts = []
    for case in cases:
        result, measured = run_case(case, memory, parse_size(args.working_set) // PAGE_SIZE, args.psk_file)
        prediction = model_prediction(result, measured)
        throughput = result.memory_bytes / result.total_seconds
        model = ("-", "-", "-") if prediction is None else (
            str(prediction.rounds), f"{prediction.total_time_s:.2f} s", f"{prediction.downtime_s * 1e3:.1f} ms")
        qemu = ("-", "-", "-", "-")
        if qemu_missing is None and not case.dirty_ring:
            baseline = run_qemu_case(case, memory)
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
            verdicts.append(f"{case.label}: {throughput / 1e9:.2f} GB/s of guest memory (target ≥ 1 GB/s: "
                            f"{'met' if throughput >= THROUGHPUT_TARGET else 'missed'}), page data at "
                            f"{result.rounds[0].bandwidth_bytes_per_s / 1e9:.2f} GB/s")
    console = Console(width=220)
    console.print(table)
    console.print("measured: the rate memdirty reported for its last second before the pause; RAM/s: guest memory "
                  "moved per second (zero pages travel as markers); data rate: page data sent per second of sending "
                  "in round 0; model: the analytic pre-copy model with pyrovisor's stop rule (QEMU's switch-over "
                  "test plus a 30-round cap) and no resume time")
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
