"""Simulated accesses per second of the lab's page walker, per synthetic pattern, against the reference walker.

For each synthetic pattern of `pyrovisor lab nested-paging` (default settings: 1 GiB footprint,
1536-entry TLB, 32-entry paging-structure caches, 64-entry nested TLB, 4+4 levels, 4 KiB pages), the
batch walker simulates a trace of `--accesses` accesses, nested and native, and the straightforward
reference walker (one access at a time, every entry read from simulated memory) simulates the first
`--baseline-accesses` of the same trace in the same run. Both start from empty caches, so their counts
on that prefix must be identical; the table says whether they are. As in the model, the guest maps the
whole footprint. Building the page tables (the guest mapping its memory) is not timed; everything the
walk does is. The batch walker uses as many
processes as it has CPUs for nested, walk-heavy traces ("procs"); the "1 proc" column forces one. The
host under this machine is shared, so each rate is the best of `--repeat` runs.

Run: python benchmarks/lab_walker.py [--accesses 1000000] [--baseline-accesses 20000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
from rich.console import Console
from rich.table import Table

from pyrovisor.lab.mmu.batch import available_workers, simulate
from pyrovisor.lab.mmu.config import MmuConfig
from pyrovisor.lab.mmu.counts import WalkCounts
from pyrovisor.lab.mmu.reference import ReferenceWalker
from pyrovisor.lab.mmu.tables import build_machine
from pyrovisor.lab.mmu.traces import PATTERNS, TraceSpec, footprint_pages, synthetic

TARGET = 1e6  # simulated accesses per second


def best_rate(accesses: int, repeat: int, run: Callable[[], WalkCounts]) -> tuple[float, WalkCounts]:
    best = float("inf")
    counts = None
    for _ in range(repeat):
        started = time.perf_counter()
        counts = run()
        best = min(best, time.perf_counter() - started)
    assert counts is not None
    return accesses / best, counts


def measure(pattern: str, accesses: int, baseline_accesses: int, repeat: int) -> tuple[str, ...]:
    """One table row: the batch walker's rates (nested, nested in one process, native) and the reference's."""
    config = MmuConfig()
    spec = TraceSpec(pattern, accesses=accesses)
    trace = synthetic(spec)
    machine = build_machine(np.concatenate([footprint_pages(spec, config.guest.page_size), trace]))
    nested, counts = best_rate(len(trace), repeat, lambda: simulate(machine, config, trace))
    single, _ = best_rate(len(trace), repeat, lambda: simulate(machine, config, trace, workers=1))
    native, _ = best_rate(len(trace), repeat, lambda: simulate(machine, config.native(), trace))
    prefix = trace[:baseline_accesses]
    reference, reference_counts = best_rate(len(prefix), 1, lambda: ReferenceWalker(machine, config).run(prefix.tolist()))
    same = reference_counts == simulate(machine, config, prefix, workers=1)
    return (pattern, f"{counts.walks_per_access:.3f}", f"{counts.references_per_walk:.2f}", f"{nested / 1e6:.2f} M/s",
            f"{single / 1e6:.2f} M/s", f"{native / 1e6:.2f} M/s", f"{reference / 1e3:.1f} k/s",
            f"{nested / reference:.0f}x", "yes" if same else "NO", "yes" if min(nested, native) >= TARGET else "no")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accesses", type=int, default=1_000_000)
    parser.add_argument("--baseline-accesses", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    table = Table(title=f"page walker, {args.accesses:,} accesses per pattern ({available_workers()} CPUs)")
    for column in ("pattern", "walks/access", "refs/walk", "nested (procs)", "nested (1 proc)", "native",
                   "reference nested", "speed-up", "same counts", "≥ 1M/s"):
        table.add_column(column, justify="right")
    for pattern in PATTERNS:
        table.add_row(*measure(pattern, args.accesses, args.baseline_accesses, args.repeat))
    console = Console(width=160)
    console.print(table)
    console.print("reference: ReferenceWalker on the first accesses of the same trace; speed-up: nested batch rate / "
                  "reference rate; same counts: both walkers agree exactly on that prefix.")


if __name__ == "__main__":
    main()
