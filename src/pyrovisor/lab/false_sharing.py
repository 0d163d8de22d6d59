"""False sharing: cache-line transfers between cores, store-buffer batching, and what a translation cost hides.

Coherence rule: a line is in one place at a time. When a core takes a line another core wrote last, the
line moves to it (one transfer, t_x); while the core holds the line it makes b writes (t_w each), then
the next core takes it. So the transfers of one line happen one after another, and each serves b writes.
Each write also pays an address translation, t_tr, with no line held.

    separate lines:  X_sep  = N / (t_tr + t_w)
    one shared line: X_same = min(N / (t_tr + c), 1 / c),    c = t_w + t_x / b          (N >= 2)

and the slowdown is S = X_sep / X_same. Without translation cost, S = N (1 + t_x / (b t_w)).

Batching (b): a locked read-modify-write (`lock inc`) drains the store buffer and must own the line
when it executes, so it gets no batching: b = 1. A plain `inc` retires its store into the store buffer;
the stores waiting there are committed to the line while the core holds it, so one transfer serves
several writes: b > 1. This is what the earlier one-parameter fit lacked (it predicted 17x for `inc`
where 4.0x is measured).

Fit to this machine: the OS guest's `falseshare` program (`pyrovisor run os-falseshare`, two threads on
two vCPUs, 50 M increments each) measured a shared line 4.0 times slower than separate lines with `inc`
and 4.2 times with `lock inc` (medians of 8 runs), at t_w = 0.30 ns per `inc` and 2.05 ns per `lock inc`
and thread (separate lines). Two figures fix the two parameters: `lock inc` (b = 1) gives t_x =
(4.2 / 2 - 1) x 2.05 = 2.26 ns, and `inc` then gives b = t_x / ((4.0 / 2 - 1) x 0.30) = 7.5 writes per
transfer. t_x is an effective cost, far below a real cross-core transfer (tens of ns): even a `lock inc`
loop keeps the line for several writes. Only the ratio of the two batch sizes is identified.

Translation: the slowdown halves once translation adds as much time per write as the write itself
(t_tr = t_w, from S = N c / (t_tr + t_w) while the line is the bottleneck). With walks per write m,
references per walk r and t_ref per reference, t_tr = m r t_ref: a VM's walks (r = 4.4 warm, Park et
al.) dilute the slowdown at a lower m than bare metal's (r = 1.5). Whether they do depends on m, which
the model takes as an input: a loop on one line, like `falseshare`, has m ~ 0 and looks the same in a VM.

A discrete-event simulator with the same rule (threads served in order of arrival at the line, each
tenure b writes on average) checks the closed form.

Source: W. J. Bolosky, M. L. Scott, "False Sharing and its Effect on Shared Memory Performance",
USENIX Symposium on Experiences with Distributed and Multiprocessor Systems (SEDMS IV), San Diego,
September 1993: the definition (references by different processors to different data in one coherence
block). Reference counts per warm walk: Park et al., ASPLOS 2022 (1.5 native, 4.4 nested), as in the
nested-paging model. The cost per reference and the TLB misses per write are assumed.
"""

from __future__ import annotations

import argparse
import heapq
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pyrovisor.errors import ConfigError
from pyrovisor.lab.model import Assumption, LabResult, Table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

BOLOSKY_SCOTT = ('W. J. Bolosky, M. L. Scott, "False Sharing and its Effect on Shared Memory Performance", '
                 "USENIX SEDMS IV, 1993")
MEASURED_BY = "measured on this machine: pyrovisor run os-falseshare, medians of 8 runs"
KINDS = ("inc", "lock inc")
# `pyrovisor run os-falseshare` on this machine: two vCPUs, same line vs separate lines, medians of 8 runs.
MEASURED_SLOWDOWN = {"inc": 4.0, "lock inc": 4.2}
MEASURED_RANGE = {"inc": (3.1, 5.0), "lock inc": (3.5, 4.8)}
# Five later runs on a quiet machine (docs/guest-os.md, section 7), not used in the fit.
QUIET_MEDIAN = {"inc": 3.1, "lock inc": 4.5}
QUIET_RANGE = {"inc": (2.6, 4.8), "lock inc": (4.1, 4.7)}
WRITE_NS = {"inc": 0.30, "lock inc": 2.05}  # per thread, from the same runs' separate-line rates
LOCKED_WRITES_PER_TRANSFER = 1.0  # a locked RMW drains the store buffer and owns the line when it executes


def fitted_transfer_ns(slowdown: float, write_ns: float) -> float:
    """t_x from a two-thread slowdown with no batching: S = 2 (1 + t_x / t_w)."""
    return (slowdown / 2 - 1) * write_ns


def fitted_writes_per_transfer(slowdown: float, write_ns: float, transfer_ns: float) -> float:
    """b from a two-thread slowdown, given t_x: S = 2 (1 + t_x / (b t_w))."""
    return transfer_ns / ((slowdown / 2 - 1) * write_ns)


TRANSFER_NS = fitted_transfer_ns(MEASURED_SLOWDOWN["lock inc"], WRITE_NS["lock inc"])  # 2.26 ns
INC_WRITES_PER_TRANSFER = fitted_writes_per_transfer(MEASURED_SLOWDOWN["inc"], WRITE_NS["inc"], TRANSFER_NS)  # 7.5
THREADS = (1, 2, 4, 8)
PARK_NATIVE = 1.5  # references per warm walk with page-walk caches, Park et al., ASPLOS 2022
PARK_VIRTUALIZED = 4.4
MISS_RATES = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # TLB misses per write, for the dilution table


@dataclass(frozen=True)
class Translation:
    """Page-walk references per walk."""

    label: str
    references_per_walk: float

    def cost_ns(self, walks_per_write: float, reference_ns: float) -> float:
        return walks_per_write * self.references_per_walk * reference_ns

    def walks_to_halve(self, write_ns: float, reference_ns: float) -> float:
        """TLB misses per write at which the slowdown is half its value without translation (t_tr = t_w)."""
        return write_ns / (self.references_per_walk * reference_ns)


NATIVE_WARM = Translation("native walk, warm (1.5 refs)", PARK_NATIVE)
NESTED_WARM = Translation("nested walk, warm (4.4 refs)", PARK_VIRTUALIZED)


@dataclass(frozen=True)
class Costs:
    write_ns: float
    transfer_ns: float
    translate_ns: float = 0.0
    writes_per_transfer: float = 1.0  # b: writes a core makes each time it holds the line

    def __post_init__(self) -> None:
        if self.write_ns <= 0 or self.transfer_ns < 0 or self.translate_ns < 0:
            raise ConfigError("costs", self, "a write takes time; transfers and translation are not negative")
        if not self.writes_per_transfer >= 1:
            raise ConfigError("writes per transfer", self.writes_per_transfer, "at least one write per transfer")

    @property
    def line_ns_per_write(self) -> float:
        """c = t_w + t_x / b: how long the shared line is busy per write."""
        return self.write_ns + self.transfer_ns / self.writes_per_transfer

    def separate(self, threads: int) -> float:
        """Writes per ns, each thread on its own line."""
        return threads / (self.translate_ns + self.write_ns)

    def shared(self, threads: int) -> float:
        """Writes per ns, all threads on one line."""
        if threads == 1:
            return self.separate(1)
        c = self.line_ns_per_write
        return min(threads / (self.translate_ns + c), 1.0 / c)

    def slowdown(self, threads: int) -> float:
        return self.separate(threads) / self.shared(threads)

    def with_translation(self, translate_ns: float) -> Costs:
        return Costs(self.write_ns, self.transfer_ns, translate_ns, self.writes_per_transfer)


@dataclass(frozen=True)
class Simulation:
    writes: int
    transfers: int
    makespan_ns: float

    @property
    def throughput(self) -> float:
        return self.writes / self.makespan_ns


def batch_size(tenure: int, writes_per_transfer: float) -> int:
    """Writes in a thread's tenure number `tenure`: whole numbers that average b (floor((k+1)b) - floor(kb))."""
    return math.floor((tenure + 1) * writes_per_transfer + 1e-9) - math.floor(tenure * writes_per_transfer + 1e-9)


def simulate(threads: int, writes_per_thread: int, shared_line: bool, costs: Costs) -> Simulation:
    """Threads translate, then take their line when it is free and make a batch of writes while they hold it.

    Taking a line another core wrote last costs a transfer. Requests are served in order of arrival."""
    if threads < 1 or writes_per_thread < 1:
        raise ConfigError("threads/writes", (threads, writes_per_thread), "at least one of each")
    ready = [(0.0, thread) for thread in range(threads)]  # when each thread next wants its line
    heapq.heapify(ready)
    lines = 1 if shared_line else threads
    last_writer: list[int | None] = [None] * lines
    free_at = [0.0] * lines
    done = [0] * threads
    tenures = [0] * threads
    transfers = 0
    makespan = 0.0
    while ready:
        time, thread = heapq.heappop(ready)
        line = 0 if shared_line else thread
        batch = min(batch_size(tenures[thread], costs.writes_per_transfer), writes_per_thread - done[thread])
        tenures[thread] += 1
        start = max(time, free_at[line])
        moved = last_writer[line] not in (None, thread)
        transfers += moved
        end = start + batch * costs.write_ns + (costs.transfer_ns if moved else 0.0)
        free_at[line], last_writer[line] = end, thread
        makespan = max(makespan, end)
        done[thread] += batch
        if done[thread] < writes_per_thread:
            heapq.heappush(ready, (end + batch * costs.translate_ns, thread))
    return Simulation(threads * writes_per_thread, transfers, makespan)


def kind_costs(args: argparse.Namespace) -> dict[str, Costs]:
    return {"inc": Costs(args.inc_write_ns, args.transfer_ns, 0.0, args.inc_writes_per_transfer),
            "lock inc": Costs(args.lock_inc_write_ns, args.transfer_ns, 0.0, LOCKED_WRITES_PER_TRANSFER)}


class FalseSharingModel:
    name = "false-sharing"
    summary = "False sharing: line transfers between cores, N threads on one line vs separate lines"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--inc-write-ns", type=float, default=WRITE_NS["inc"],
                            help="ns per plain inc and thread, separate lines (measured; default: %(default)s)")
        parser.add_argument("--lock-inc-write-ns", type=float, default=WRITE_NS["lock inc"],
                            help="ns per lock inc and thread, separate lines (measured; default: %(default)s)")
        parser.add_argument("--transfer-ns", type=float, default=TRANSFER_NS,
                            help="effective ns per line transfer (default: %(default).3f, fitted to the measured "
                                 "lock inc ratio)")
        parser.add_argument("--inc-writes-per-transfer", type=float, default=INC_WRITES_PER_TRANSFER,
                            help="plain incs committed per line transfer by the store buffer (default: "
                                 "%(default).2f, fitted to the measured inc ratio; lock inc: 1)")
        parser.add_argument("--reference-ns", type=float, default=10.0,
                            help="ns per page-walk reference (assumed; default: %(default)s)")
        parser.add_argument("--walks-per-access", type=float, default=0.0,
                            help="TLB misses per write (assumed; default: %(default)s, as in a loop on one line)")
        parser.add_argument("--writes", type=int, default=2000, help="writes per thread in the simulation")

    def run(self, args: argparse.Namespace) -> LabResult:
        if args.reference_ns <= 0 or args.walks_per_access < 0:
            raise ConfigError("--reference-ns/--walks-per-access", (args.reference_ns, args.walks_per_access),
                              "a reference takes time and walks per write are not negative")
        costs = kind_costs(args)
        lock = costs["lock inc"]
        in_vm = lock.with_translation(NESTED_WARM.cost_ns(args.walks_per_access, args.reference_ns))
        headline: tuple[tuple[str, float], ...] = (
            ("inc slowdown x", costs["inc"].slowdown(2)),
            ("lock inc slowdown x", lock.slowdown(2)),
            ("lock inc slowdown in a VM x", in_vm.slowdown(2)),
            ("TLB misses/write halving it in a VM", NESTED_WARM.walks_to_halve(lock.write_ns, args.reference_ns)),
        )
        return LabResult(
            tables=(threads_table(costs, args.writes), fit_table(costs),
                    dilution_table(costs, args.reference_ns, args.walks_per_access)),
            plot=lambda figure: plot(figure, costs, args.reference_ns, args.walks_per_access),
            summary=_summary(costs, args.reference_ns, args.walks_per_access),
            headline=headline,
            assumptions=assumptions(args),
        )


def assumptions(args: argparse.Namespace) -> tuple[Assumption, ...]:
    return (
        Assumption("inc write ns (separate lines)", args.inc_write_ns, MEASURED_BY),
        Assumption("lock inc write ns (separate lines)", args.lock_inc_write_ns, MEASURED_BY),
        Assumption("measured inc slowdown x", MEASURED_SLOWDOWN["inc"], MEASURED_BY),
        Assumption("measured lock inc slowdown x", MEASURED_SLOWDOWN["lock inc"], MEASURED_BY),
        Assumption("transfer ns (effective)", args.transfer_ns,
                   "fitted: measured lock inc slowdown with 1 write per transfer" if args.transfer_ns == TRANSFER_NS
                   else "assumed (given)"),
        Assumption("inc writes per transfer", args.inc_writes_per_transfer,
                   "fitted: measured inc slowdown, given the transfer ns"
                   if args.inc_writes_per_transfer == INC_WRITES_PER_TRANSFER else "assumed (given)"),
        Assumption("lock inc writes per transfer", LOCKED_WRITES_PER_TRANSFER,
                   "assumed: a locked read-modify-write drains the store buffer"),
        Assumption("coherence rule", "one holder per line; taking a line another core wrote last is one transfer",
                   f"assumed; false sharing as defined by {BOLOSKY_SCOTT}"),
        Assumption("references per warm walk, native / nested", [PARK_NATIVE, PARK_VIRTUALIZED],
                   "Park et al., ASPLOS 2022"),
        Assumption("ns per walk reference", args.reference_ns, "assumed"),
        Assumption("TLB misses per write", args.walks_per_access, "assumed"),
    )


def threads_table(costs: dict[str, Costs], writes: int) -> Table:
    rows = []
    for kind, c in costs.items():
        for n in THREADS:
            shared = simulate(n, writes, True, c)
            separate = simulate(n, writes, False, c)
            rows.append((kind, n, round(c.separate(n) * 1e3), round(c.shared(n) * 1e3), round(c.slowdown(n), 2),
                         round(separate.throughput / shared.throughput, 2), round(shared.transfers / shared.writes, 3)))
    return Table(
        title="N threads writing one shared line vs a line each (no translation cost)",
        columns=("write", "threads", "separate Mwrites/s", "shared Mwrites/s", "slowdown", "simulated",
                 "transfers/write"),
        rows=tuple(rows),
        notes=("; ".join(f"{kind}: t_w = {c.write_ns:g} ns, {c.writes_per_transfer:.2f} writes per transfer"
                         for kind, c in costs.items())
               + f"; t_x = {next(iter(costs.values())).transfer_ns:.3f} ns per transfer (effective).",),
    )


def fit_table(costs: dict[str, Costs]) -> Table:
    rows = []
    for kind, c in costs.items():
        unbatched = Costs(c.write_ns, c.transfer_ns)
        low, high = MEASURED_RANGE[kind]
        quiet_low, quiet_high = QUIET_RANGE[kind]
        rows.append((kind, round(c.writes_per_transfer, 2), round(c.slowdown(2), 2), MEASURED_SLOWDOWN[kind],
                     f"{low:g}-{high:g}", f"{QUIET_MEDIAN[kind]:g} ({quiet_low:g}-{quiet_high:g})",
                     round(unbatched.slowdown(2), 2)))
    return Table(
        title="Two threads on one line: the model against os-falseshare on this machine",
        columns=("write", "writes/transfer", "model x", "measured x (fit)", "range", "quiet runs x (not fitted)",
                 "without batching x"),
        rows=tuple(rows),
        notes=("The transfer cost is fitted on lock inc and the batch size on inc: two figures, two parameters. "
               "The quiet runs were not used in the fit.",),
    )


def dilution_table(costs: dict[str, Costs], reference_ns: float, walks_per_access: float) -> Table:
    rates = sorted({*MISS_RATES, walks_per_access})
    rows = []
    for rate in rates:
        cells: list[object] = []
        for c in costs.values():
            for walk in (NATIVE_WARM, NESTED_WARM):
                cells.append(round(c.with_translation(walk.cost_ns(rate, reference_ns)).slowdown(2), 2))
        rows.append((rate, *cells))
    rows.append(("halves at", *(round(walk.walks_to_halve(c.write_ns, reference_ns), 4)
                                for c in costs.values() for walk in (NATIVE_WARM, NESTED_WARM))))
    return Table(
        title="Two threads: the slowdown of sharing a line, by TLB misses per write (bare metal vs VM walks)",
        columns=("TLB misses/write", *(f"{kind}, {where}" for kind in costs for where in ("native", "VM"))),
        rows=tuple(rows),
        notes=(f"native: warm walks of {PARK_NATIVE:g} references; VM: warm nested walks of {PARK_VIRTUALIZED:g} "
               f"(Park et al.); {reference_ns:g} ns per reference (assumed). The slowdown halves where translation "
               "adds t_w per write. TLB misses per write are an input, not known for a real program.",),
    )


def _summary(costs: dict[str, Costs], reference_ns: float, walks_per_access: float) -> tuple[str, ...]:
    lines = [f"{kind}: model {c.slowdown(2):.2f}x slower on a shared line with two threads "
             f"({c.writes_per_transfer:.2f} writes per transfer), measured on this machine (os-falseshare) "
             f"{MEASURED_SLOWDOWN[kind]:g}x" for kind, c in costs.items()]
    lock = costs["lock inc"]
    lines.append(f"in a VM (warm nested walks, {reference_ns:g} ns per reference) the lock inc slowdown halves at "
                 f"{NESTED_WARM.walks_to_halve(lock.write_ns, reference_ns):.3g} TLB misses per write, on bare metal "
                 f"at {NATIVE_WARM.walks_to_halve(lock.write_ns, reference_ns):.3g}; at "
                 f"{walks_per_access:g} (--walks-per-access, assumed) it is "
                 f"{lock.with_translation(NESTED_WARM.cost_ns(walks_per_access, reference_ns)).slowdown(2):.2f}x "
                 f"in a VM and {lock.with_translation(NATIVE_WARM.cost_ns(walks_per_access, reference_ns)).slowdown(2):.2f}x "
                 "on bare metal")
    return tuple(lines)


def plot(figure: Figure, costs: dict[str, Costs], reference_ns: float, walks_per_access: float) -> None:
    left, right = figure.subplots(1, 2)
    threads = np.arange(1, 9)
    for k, (kind, c) in enumerate(costs.items()):
        left.plot(threads, [c.slowdown(int(n)) for n in threads], "-", color=f"C{k}",
                  label=f"{kind}, model ({c.writes_per_transfer:.1f} writes/transfer)")
    inc = costs["inc"]
    left.plot(threads, [Costs(inc.write_ns, inc.transfer_ns).slowdown(int(n)) for n in threads], ":", color="grey",
              label="inc without batching")
    for k, kind in enumerate(costs):
        low, high = MEASURED_RANGE[kind]
        median = MEASURED_SLOWDOWN[kind]
        left.errorbar([2 - 0.12 + 0.24 * k], [median], yerr=[[median - low], [high - median]], fmt="o",
                      color=f"C{k}", capsize=3, label=f"{kind}, measured (os-falseshare, fitted)")
        quiet_low, quiet_high = QUIET_RANGE[kind]
        quiet = QUIET_MEDIAN[kind]
        left.errorbar([2.5 + 0.24 * k], [quiet], yerr=[[quiet - quiet_low], [quiet_high - quiet]], fmt="s",
                      mfc="none", color=f"C{k}", capsize=3, label=f"{kind}, quiet runs (not fitted)")
    left.set_yscale("log")
    left.set_yticks([1, 2, 5, 10, 20, 50, 100], ["1", "2", "5", "10", "20", "50", "100"])
    left.minorticks_off()
    left.set_xticks(list(range(1, 9)))
    left.set_xlabel("threads on one line")
    left.set_ylabel("slowdown vs a line each")
    left.set_title("Shared line, no translation cost")
    left.legend(fontsize="x-small")
    rates = np.logspace(-4, 0, 201)
    for k, (kind, c) in enumerate(costs.items()):
        for walk, style in ((NATIVE_WARM, "--"), (NESTED_WARM, "-")):
            where = "bare metal" if walk is NATIVE_WARM else "VM"
            right.plot(rates, [c.with_translation(walk.cost_ns(float(m), reference_ns)).slowdown(2) for m in rates],
                       style, color=f"C{k}", label=f"{kind}, {where}")
            half = walk.walks_to_halve(c.write_ns, reference_ns)
            right.plot([half], [c.slowdown(2) / 2], "o", color=f"C{k}", markersize=4)
        right.axhline(c.slowdown(2), color=f"C{k}", linestyle=":", linewidth=0.8)
    if walks_per_access > 0:
        right.axvline(walks_per_access, color="grey", linestyle=":", linewidth=0.8)
        right.annotate("--walks-per-access", (walks_per_access, 0.97), xycoords=("data", "axes fraction"),
                       rotation=90, fontsize="x-small", va="top", ha="right")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_yticks([1, 2, 3, 5], ["1", "2", "3", "5"])
    right.minorticks_off()
    right.set_xlabel("TLB misses per write (an input: assumed)")
    right.set_ylabel("slowdown of a shared line (2 threads)")
    right.set_title(f"Walks dilute it only when writes miss the TLB\n{reference_ns:g} ns per walk reference; "
                    "dots: half the slowdown", fontsize="small")
    right.legend(fontsize="x-small", loc="lower left")


MODEL = FalseSharingModel()
