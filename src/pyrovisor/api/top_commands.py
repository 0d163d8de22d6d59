"""`pyrovisor top SOCKET`: exits per second and VMM CPU time per guest process, from GET /accounting."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pyrovisor.api.cli import positive_seconds

KINDS = ("pio", "mmio", "hlt", "interrupted", "other")
HEADINGS = ("pio", "mmio", "hlt", "intr", "other")  # the kinds, short enough for an 80-column terminal


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    top = subparsers.add_parser(
        "top", help="live exits and VMM CPU time per guest process (accounting, docs/introspection.md section 2)",
        description="A table per guest process, refreshed every interval: exits per second by kind, the VMM's CPU "
                    "time handling them (ms/s) and the process's share of it. Turns accounting on if it is off "
                    "(POST /accounting); the VM must run the OS guest (its kernel profile names the processes).")
    top.add_argument("socket", type=Path, help="the VM's API socket (pyrovisor run --api)")
    top.add_argument("--interval", type=positive_seconds, default=1.0, help="seconds between readings (default 1)")
    top.add_argument("--once", action="store_true", help="print one table (over one interval) and exit")
    top.add_argument("--json", action="store_true", help="JSON: one object per interval (one line each)")
    top.set_defaults(handler=_top)


@dataclass(frozen=True)
class ProcessRate:
    """One process over one interval."""

    pid: int | None
    name: str
    exits_per_s: dict[str, float]
    total_per_s: float
    vmm_cpu_ms_per_s: float
    share: float  # of the VMM CPU time charged to every process in the interval, 0..1


def rates(before: dict[str, Any], after: dict[str, Any], seconds: float) -> list[ProcessRate]:
    """Per-process rates between two GET /accounting answers taken `seconds` apart (busiest first)."""
    def key(row: dict[str, Any]) -> tuple[Any, str, int]:
        return (row["pid"], row["name"], row["cr3"])

    earlier = {key(row): row for row in before.get("processes", [])}
    deltas = []
    for row in after.get("processes", []):
        old = earlier.get(key(row))
        exits = {kind: row["exits"].get(kind, 0) - (old["exits"].get(kind, 0) if old else 0) for kind in KINDS}
        cpu_ns = row["vmm_cpu_ns"] - (old["vmm_cpu_ns"] if old else 0)
        deltas.append((row, exits, cpu_ns))
    total_ns = sum(cpu_ns for _, _, cpu_ns in deltas)
    result = [ProcessRate(row["pid"], row["name"], {kind: count / seconds for kind, count in exits.items()},
                          sum(exits.values()) / seconds, cpu_ns / 1e6 / seconds, cpu_ns / total_ns if total_ns else 0.0)
              for row, exits, cpu_ns in deltas]
    result.sort(key=lambda rate: (-rate.vmm_cpu_ms_per_s, -rate.total_per_s, rate.name))
    return result


def render(table_rates: list[ProcessRate], seconds: float) -> Any:
    from rich.table import Table

    table = Table(title=f"guest processes, per second over {seconds:.2f} s (CPU: the VMM's, handling their exits)")
    for column in ("pid", "name", *HEADINGS, "exits/s", "CPU ms/s", "share"):
        table.add_column(column, justify="left" if column == "name" else "right")
    for rate in table_rates:
        table.add_row("-" if rate.pid is None else str(rate.pid), rate.name,
                      *(f"{rate.exits_per_s[kind]:.0f}" for kind in KINDS), f"{rate.total_per_s:.0f}",
                      f"{rate.vmm_cpu_ms_per_s:.2f}", f"{rate.share:.0%}")
    return table


def _top(args: argparse.Namespace) -> int:
    from pyrovisor.api.client import ApiClient

    client = ApiClient(args.socket, timeout=30.0)
    if not client.get("/accounting")["enabled"]:
        client.post("/accounting", {"enabled": True})
    before, taken = client.get("/accounting"), time.monotonic()
    if args.json:
        while True:
            time.sleep(args.interval)
            after, now = client.get("/accounting"), time.monotonic()
            document = {"seconds": round(now - taken, 3), "processes": [asdict(rate) for rate in
                                                                         rates(before, after, now - taken)]}
            print(json.dumps(document), flush=True)
            if args.once:
                return 0
            before, taken = after, now
    from rich.console import Console
    from rich.live import Live

    console = Console()
    if args.once:
        time.sleep(args.interval)
        after, now = client.get("/accounting"), time.monotonic()
        console.print(render(rates(before, after, now - taken), now - taken))
        return 0
    try:
        with Live(render([], 0.0), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(args.interval)
                after, now = client.get("/accounting"), time.monotonic()
                live.update(render(rates(before, after, now - taken), now - taken), refresh=True)
                before, taken = after, now
    except KeyboardInterrupt:
        sys.stdout.write("\n")
    return 0
