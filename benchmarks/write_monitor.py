"""What write monitoring costs: per trapped write (read-only memslot mode and userfaultfd mode), and for pages
that are not watched.

The OS guest's memdirty program writes one word of one page in a tight loop (rate=0). Once it runs, the page is
watched through the process's page tables; the cost per trapped write is the wall time of a window divided by
the writes the monitor caught in it (the vCPU does nothing else), once with the records kept in memory only and
once also appended to a JSON-lines file. The uffd mode does not catch every write (a caught write leaves its page
writable for 1 ms): its cost is the vCPU time lost per caught write, from memdirty's speed with and without the
watch in the same VM (see uffd_write_cost), with the fault server's CPU time beside it. Then memdirty writes 256
unwatched pages as fast as it can, with and without a watch on the system-call table: the rates it reports should
match.

Run: python benchmarks/write_monitor.py [--window 2] [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from io_exits import cpu_model, load_average  # noqa: E402  (a sibling script, not a package)

from pyrovisor.builder import build_vm  # noqa: E402
from pyrovisor.capture import Console  # noqa: E402
from pyrovisor.catalog import guests_dir  # noqa: E402
from pyrovisor.config import MachineConfig  # noqa: E402
from pyrovisor.introspect.write_monitor import monitor_of  # noqa: E402
from pyrovisor.vmm import Vmm  # noqa: E402

MiB = 1 << 20


def os_vm(programs: str, console: Console) -> Vmm:
    directory = guests_dir()
    config = MachineConfig(kernel=directory / "os.elf", memory_size=64 * MiB, vcpus=1, cmdline=programs,
                           initrd=directory / "os-programs.img")
    return build_vm(config, console.write)


def trapped_write_cost(window: float, log: Path | None) -> dict[str, float]:
    """µs per trapped write while memdirty rewrites one watched word as fast as it can."""
    console = Console()
    with os_vm(f"memdirty pages=1 rate=0 seconds={int(window) + 30} page=4k", console) as vmm:
        vmm.start()
        base = int(console.wait_for(r"^memdirty 1: 1 pages at (0x\w+),")[1], 16)
        monitor = monitor_of(vmm)
        watch = monitor.watch_virtual(1, base, 16, log=str(log) if log else None)
        time.sleep(0.2)  # past the arming
        counters = monitor.counters[watch.id]
        started, first = time.perf_counter(), counters.writes
        time.sleep(window)
        elapsed, caught = time.perf_counter() - started, counters.writes - first
        vmm.stop()
    return {"writes": caught, "seconds": elapsed, "us_per_write": elapsed / caught * 1e6 if caught else float("nan")}


def _server_cpu_seconds(pid: int | None) -> float:
    """User plus system CPU time of the uffd mode's fault server so far (/proc, clock ticks)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def uffd_write_cost(window: float, log: Path | None) -> dict[str, float]:
    """The uffd mode: the vCPU time lost per caught write while memdirty rewrites one watched word.

    A caught write leaves its page writable for the protection window (1 ms), so the guest's writes are not all
    caught; what a caught one costs is the share of memdirty's speed lost under the watch (against its speed
    without it, measured before and after in the same VM) over the writes caught per second.
    """
    console = Console()
    with os_vm(f"memdirty pages=1 rate=0 seconds={int(3 * window) + 30} page=4k", console) as vmm:
        vmm.start()
        base = int(console.wait_for(r"^memdirty 1: 1 pages at (0x\w+),")[1], 16)
        monitor = monitor_of(vmm)
        probe = monitor.watch_virtual(1, base, 16, mode="uffd")
        counter = probe.ranges[0][0] + 8  # memdirty's counter: word 1 of its page
        monitor.remove(probe.id)

        def rate(seconds: float) -> float:
            first = vmm.memory.read_u64(counter)
            time.sleep(seconds)
            return (vmm.memory.read_u64(counter) - first) / seconds

        before = rate(window / 2)
        watch = monitor.watch_virtual(1, base, 16, log=str(log) if log else None, mode="uffd")
        uffd = monitor._uffd
        server = uffd.server_pid if uffd is not None else None
        time.sleep(0.2)
        counters = monitor.counters[watch.id]
        started, first, cpu = time.perf_counter(), counters.writes, _server_cpu_seconds(server)
        watched = rate(window)
        elapsed, caught = time.perf_counter() - started, counters.writes - first
        server_cpu = _server_cpu_seconds(server) - cpu
        monitor.remove(watch.id)
        after = rate(window / 2)
        vmm.stop()
    free = (before + after) / 2
    lost = max(0.0, 1 - watched / free)
    per_second = caught / elapsed
    return {"writes": caught, "seconds": elapsed, "caught_per_s": per_second, "lost_share": lost,
            "guest_writes_per_s_free": free, "guest_writes_per_s_watched": watched,
            "us_per_write": lost / per_second * 1e6 if caught else float("nan"),
            "server_cpu_us_per_write": server_cpu / caught * 1e6 if caught else float("nan")}


def unwatched_rate(watch_elsewhere: bool) -> float:
    """memdirty's pages/s over 256 pages nobody watches (with or without a watch on another page)."""
    console = Console()
    with os_vm("memdirty pages=256 rate=0 seconds=1 page=4k", console) as vmm:
        if watch_elsewhere:
            monitor_of(vmm).watch_symbol("syscall_table")
        outcome = vmm.run(timeout=60)
        if outcome.exit_code != 0:
            raise SystemExit(f"memdirty failed: {console.text()}")
    found = re.search(r"^memdirty 1: dirtied \d+ pages in \d+ ms: (\d+) pages/s", console.text(), re.MULTILINE)
    if not found:
        raise SystemExit(f"memdirty printed no rate:\n{console.text()}")
    return float(found[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=2.0, help="seconds of trapped writes counted per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    print(f"CPU: {cpu_model()}; load before: {load_average()}")
    results: dict[str, Any] = {"cpu": cpu_model()}
    with tempfile.TemporaryDirectory() as directory:
        for name, log in (("memslot, records in memory", None), ("memslot, records to a file", Path(directory) / "w.jsonl")):
            runs = [trapped_write_cost(args.window, log) for _ in range(args.repeats)]
            costs = sorted(run["us_per_write"] for run in runs)
            results[name] = runs
            print(f"{name}: {' '.join(f'{cost:.1f}' for cost in costs)} µs per trapped write "
                  f"(median {costs[len(costs) // 2]:.1f}; {runs[0]['writes']} writes in {runs[0]['seconds']:.1f} s); "
                  f"load {load_average()}")
        for name, log in (("uffd, records in memory", None), ("uffd, records to a file", Path(directory) / "u.jsonl")):
            runs = [uffd_write_cost(args.window, log) for _ in range(args.repeats)]
            costs = sorted(run["us_per_write"] for run in runs)
            server = sorted(run["server_cpu_us_per_write"] for run in runs)
            results[name] = runs
            print(f"{name}: {' '.join(f'{cost:.1f}' for cost in costs)} µs of vCPU time per caught write "
                  f"(median {costs[len(costs) // 2]:.1f}; fault server CPU {' '.join(f'{each:.0f}' for each in server)}"
                  f" µs; {runs[0]['caught_per_s']:.0f} caught/s, guest speed {runs[0]['lost_share']:.1%} lower); "
                  f"load {load_average()}")
    plain, watched = [], []
    for _ in range(args.repeats):  # alternated, so that a change of the host's load hits both
        plain.append(unwatched_rate(False))
        watched.append(unwatched_rate(True))
    results["unwatched pages/s"] = {"no watch": plain, "watch elsewhere": watched}
    print(f"unwatched memdirty, 256 pages: {max(plain) / 1e6:.1f} M pages/s without a watch, "
          f"{max(watched) / 1e6:.1f} M with one on syscall_table (best of {args.repeats}; ratio "
          f"{max(watched) / max(plain):.2f}); load {load_average()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
