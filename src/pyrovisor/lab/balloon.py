"""Ballooning with an idle memory tax: share-based reclamation between VMs from sampled working sets.

Waldspurger's ESX Server allocates memory by min-funding revocation: when memory is scarce, pages are
taken from the client paying the lowest price, the fewest shares per page. The idle memory tax charges
idle pages more than active ones: a client with S shares, an allocation of P pages and an active
fraction f pays the adjusted shares-per-page ratio

    rho = S / (P * (f + k * (1 - f))),      k = 1 / (1 - tau)

where tau is the tax rate (0 <= tau < 1, ESX default 75 %, so an idle page costs k = 4 active ones).
tau = 0 is pure proportional sharing; tau -> 1 lets all idle memory be reclaimed. With W = f * P active
pages the cost is W + k * (P - W); the allocator here equalises rho across clients between their bounds
(bisection on rho), which is where repeated revocation from the lowest-rho client ends up
(`revoke_until_stable` does it step by step). A consequence this module tests: if the other clients are
charged at least 1 per page, a client keeps at least (1 - tau) of the idle pages it would hold under
pure share-based allocation, which is the paper's reading of tau as "the maximum fraction of idle pages
that may be reclaimed from a client".

The active fraction is estimated as in ESX: every sampling period n pages of the VM's memory are chosen
at random and their mappings invalidated; the t of them the guest touches again give f = t / n (ESX
default: 100 pages per 30 s). Estimates are smoothed by a fast and a slow moving average and the larger
is used, so the estimate rises quickly and falls slowly. No VM is reclaimed below its protected working
set, min(estimated working set, its proportional share of memory), nor below its reservation: the tax
takes idle memory only, and a VM whose working set exceeds its share competes on shares as before. The
balloon driver inflates or deflates by at most a fixed amount per period to reach the target.

Source: C. A. Waldspurger, "Memory Resource Management in VMware ESX Server", OSDI 2002: section 5.1
(min-funding revocation, shares per page), 5.2 (the adjusted ratio, tax rate default 75 %), 5.3
(sampling, 100 pages per 30 s, f = t / n, fast and slow averages), Figure 6 (estimate = max of the
two averages; 10-20 MB of Windows background activity) and the set-up of Figure 7 (two VMs with equal
shares, one idle and one active, tax rate raised from 0 % to 75 % during the run). The host memory,
working-set sizes, smoothing weights and balloon rate of the default scenario are assumptions. The values
plotted in Figure 7 could not be retrieved, so the run is compared with the paper's formula and set-up, and
with the equilibrium the formula gives, not with its curves. The sampled run is repeated over several seeds;
its figures are means with 95 % confidence intervals.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from pyrovisor.errors import ConfigError
from pyrovisor.idle_tax import Client, adjusted_ratio, idle_page_cost, target_allocations
from pyrovisor.lab.model import Assumption, LabResult, Table
from pyrovisor.lab.stats import Estimate, add_seed_arguments, estimate, seeds_of

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_TAX = 0.75  # Waldspurger 2002, section 5.2: the ESX default tax rate
SAMPLE_PAGES = 100  # section 5.3: pages sampled per period (ESX default)
SAMPLE_PERIOD_S = 30  # section 5.3: the sampling period (ESX default)
WINDOWS_BACKGROUND_MB = (10.0, 20.0)  # section 5.4, Figure 6 text: memory Windows touches in the background
TAX_FROM_EPOCH = 20  # the default scenario: tax raised at this period (assumed)
BUSY_FROM_EPOCH = 60  # the default scenario: the idle VM becomes busy at this period (assumed)
TAXED_EPOCH = BUSY_FROM_EPOCH - 1  # the last period with the tax on and VM1 idle: where the run has settled


def _cost(pages: float, active: float, k: float) -> float:
    return min(pages, active) + k * max(0.0, pages - active)


def revoke_until_stable(clients: Sequence[Client], start: Sequence[float], tax: float, chunk: float) -> list[float]:
    """Min-funding revocation step by step: move `chunk` from the lowest-ratio client to the highest-ratio
    one that can grow, while that raises the lower ratio. Memory in use stays constant."""
    k = idle_page_cost(tax)
    pages = list(start)

    def ratio(i: int, p: float) -> float:
        return clients[i].shares / _cost(p, clients[i].active, k) if p > 0 else math.inf

    for _ in range(1_000_000):
        donors = [i for i in range(len(clients)) if pages[i] - chunk >= clients[i].minimum]
        takers = [i for i in range(len(clients)) if pages[i] + chunk <= clients[i].maximum]
        if not donors or not takers:
            break
        victim = min(donors, key=lambda i: ratio(i, pages[i]))
        gainer = max((i for i in takers if i != victim), key=lambda i: ratio(i, pages[i] + chunk), default=None)
        if gainer is None or ratio(gainer, pages[gainer] + chunk) <= ratio(victim, pages[victim]):
            break
        pages[victim] -= chunk
        pages[gainer] += chunk
    return pages


# --- Sampling --------------------------------------------------------------------------------------------

def sample_active_fraction(allocated: float, active: float, samples: int, rng: np.random.Generator) -> float:
    """f = t / n: touched pages among `samples` chosen uniformly from the allocation."""
    if allocated <= 0:
        return 0.0
    return float(rng.binomial(samples, min(1.0, active / allocated))) / samples


@dataclass(frozen=True)
class Smoothing:
    """Weights of the new sample in the fast and slow moving averages (assumed values)."""

    fast: float = 0.5
    slow: float = 0.1


# --- Simulation ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VmSpec:
    """A VM: shares, configured size, reservation, and its true working set over time (epoch, MB) steps."""

    name: str
    shares: float
    size_mb: float
    working_set: tuple[tuple[int, float], ...]
    reserved_mb: float = 0.0

    def working_set_at(self, epoch: int) -> float:
        current = self.working_set[0][1]
        for start, value in self.working_set:
            if epoch >= start:
                current = value
        return min(current, self.size_mb)


@dataclass(frozen=True)
class Scenario:
    vms: tuple[VmSpec, ...]
    memory_mb: float
    epochs: int
    tax_schedule: tuple[tuple[int, float], ...]  # (epoch, tax rate) steps
    balloon_mb_per_epoch: float = 32.0  # assumed
    samples: int = SAMPLE_PAGES
    smoothing: Smoothing = Smoothing()
    seed: int = 4

    def tax_at(self, epoch: int) -> float:
        current = self.tax_schedule[0][1]
        for start, value in self.tax_schedule:
            if epoch >= start:
                current = value
        return current


@dataclass(frozen=True)
class Timeline:
    """Per-epoch, per-VM series (rows: epochs, columns: VMs)."""

    names: tuple[str, ...]
    tax: np.ndarray
    allocation: np.ndarray
    target: np.ndarray
    working_set: np.ndarray
    estimate: np.ndarray


def figure7_scenario(tax: float = DEFAULT_TAX, memory_mb: float = 360.0, vm_mb: float = 256.0,
                     idle_ws_mb: float = 16.0, busy_ws_mb: float = 250.0, later_ws_mb: float = 200.0) -> Scenario:
    """Two VMs with equal shares: VM1 idle (background activity only), VM2 busy; the tax rate goes from 0 to
    `tax` at epoch 20 (as in the paper's Figure 7 experiment); VM1 becomes busy (`later_ws_mb`) at epoch 60.
    The sizes are assumptions: Figure 7's own could not be retrieved."""
    if memory_mb <= 0 or vm_mb <= 0 or min(idle_ws_mb, busy_ws_mb, later_ws_mb) < 0:
        raise ConfigError("--memory-mb/--vm-mb/--*-ws-mb", (memory_mb, vm_mb, idle_ws_mb, busy_ws_mb),
                          "sizes are positive and working sets not negative")
    return Scenario(
        vms=(VmSpec("vm1 (idle, then busy)", 1000, vm_mb, ((0, idle_ws_mb), (BUSY_FROM_EPOCH, later_ws_mb))),
             VmSpec("vm2 (busy)", 1000, vm_mb, ((0, busy_ws_mb),))),
        memory_mb=memory_mb, epochs=90, tax_schedule=((0, 0.0), (TAX_FROM_EPOCH, tax)))


def entitlements(vms: Sequence[VmSpec], memory_mb: float) -> list[float]:
    """Pure proportional-share allocations: memory * S_i / sum S."""
    total = sum(vm.shares for vm in vms)
    return [memory_mb * vm.shares / total for vm in vms]


def protected_working_sets(vms: Sequence[VmSpec], working_sets: Sequence[float], memory_mb: float) -> list[float]:
    """The floor below which no VM is reclaimed: its working set, as far as its share entitles it, or its
    reservation. Floors of VMs whose working sets fit in their shares always fit in memory together."""
    shares = entitlements(vms, memory_mb)
    return [max(vm.reserved_mb, min(ws, vm.size_mb, share))
            for vm, ws, share in zip(vms, working_sets, shares, strict=True)]


def simulate(scenario: Scenario) -> Timeline:
    rng = np.random.default_rng(scenario.seed)
    vms = scenario.vms
    count = len(vms)
    if sum(vm.reserved_mb for vm in vms) > scenario.memory_mb:
        raise ConfigError("reservations", [vm.reserved_mb for vm in vms], "exceed host memory")
    allocation = np.array([vm.size_mb for vm in vms], dtype=float)
    allocation *= min(1.0, scenario.memory_mb / allocation.sum())
    fast = np.array([vm.working_set_at(0) for vm in vms], dtype=float)
    slow = fast.copy()
    rows: dict[str, list[np.ndarray]] = {k: [] for k in ("allocation", "target", "working_set", "estimate")}
    taxes = []
    for epoch in range(scenario.epochs):
        tax = scenario.tax_at(epoch)
        truth = np.array([vm.working_set_at(epoch) for vm in vms])
        measured = np.array([sample_active_fraction(allocation[i], truth[i], scenario.samples, rng) * allocation[i]
                             for i in range(count)])
        fast += scenario.smoothing.fast * (measured - fast)
        slow += scenario.smoothing.slow * (measured - slow)
        estimate = np.maximum(fast, slow)
        floors = protected_working_sets(vms, estimate, scenario.memory_mb)
        clients = [Client(vm.shares, estimate[i], floors[i], vm.size_mb) for i, vm in enumerate(vms)]
        target = np.array(target_allocations(clients, scenario.memory_mb, tax))
        allocation = _balloon_step(allocation, target, scenario.balloon_mb_per_epoch, scenario.memory_mb)
        taxes.append(tax)
        for key, value in (("allocation", allocation), ("target", target), ("working_set", truth),
                           ("estimate", estimate)):
            rows[key].append(np.array(value, dtype=float))
    return Timeline(tuple(vm.name for vm in vms), np.array(taxes),
                    *(np.vstack(rows[k]) for k in ("allocation", "target", "working_set", "estimate")))


def _balloon_step(allocation: np.ndarray, target: np.ndarray, rate: float, memory: float) -> np.ndarray:
    """Inflate balloons (shrink) by at most `rate`, then hand the free memory to VMs below target."""
    shrink = np.minimum(np.maximum(allocation - target, 0.0), rate)
    new: np.ndarray = allocation - shrink
    free = memory - float(new.sum())
    want = np.minimum(np.maximum(target - new, 0.0), rate)
    wanted = float(want.sum())
    if wanted > 0 and free > 0:
        new = new + want * min(1.0, free / wanted)
    return new


# --- The lab model ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SeededRuns:
    """The same scenario sampled with several seeds: per-epoch figures as means with 95 % intervals."""

    scenario: Scenario
    timelines: tuple[Timeline, ...]

    def figure(self, series: str, epoch: int, vm: int) -> Estimate:
        """One value of a Timeline series (allocation, estimate, target) over the seeds."""
        return estimate([float(getattr(t, series)[epoch, vm]) for t in self.timelines]).rounded(1)

    def mean_estimate(self, start: int, stop: int, vm: int) -> Estimate:
        """A VM's sampled working set, averaged over periods start..stop-1, over the seeds."""
        return estimate([float(np.mean(t.estimate[start:stop, vm])) for t in self.timelines]).rounded(1)

    def band(self, series: str, vm: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mean, low and high of a series over the seeds, for every epoch (for the plot)."""
        stack = np.stack([getattr(t, series)[:, vm] for t in self.timelines])
        figures = [estimate([float(v) for v in stack[:, epoch]]) for epoch in range(stack.shape[1])]
        return (np.array([f.mean for f in figures]), np.array([f.low for f in figures]),
                np.array([f.high for f in figures]))


def simulate_seeds(scenario: Scenario, seeds: Sequence[int]) -> SeededRuns:
    return SeededRuns(scenario, tuple(simulate(replace(scenario, seed=seed)) for seed in seeds))


def equilibrium(scenario: Scenario, tax: float) -> tuple[float, float]:
    """The allocations the tax settles on with the idle and busy VMs' working sets of period 0, analytically."""
    idle, busy = scenario.vms
    w_idle, w_busy = idle.working_set_at(0), busy.working_set_at(0)
    floors = protected_working_sets(scenario.vms, [w_idle, w_busy], scenario.memory_mb)
    clients = [Client(idle.shares, w_idle, floors[0], idle.size_mb), Client(busy.shares, w_busy, floors[1], busy.size_mb)]
    a_idle, a_busy = target_allocations(clients, scenario.memory_mb, tax)
    return a_idle, a_busy


class BalloonModel:
    name = "balloon"
    summary = "Share-based memory reclamation with Waldspurger's idle memory tax and sampled working sets"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--tax", type=float, default=DEFAULT_TAX,
                            help=f"idle memory tax rate applied from period {TAX_FROM_EPOCH} (default: %(default)s, "
                                 "ESX's)")
        parser.add_argument("--memory-mb", type=float, default=360.0,
                            help="host memory for the two VMs (assumed; default: %(default)s)")
        parser.add_argument("--vm-mb", type=float, default=256.0,
                            help="configured size of each VM (assumed; default: %(default)s)")
        parser.add_argument("--idle-ws-mb", type=float, default=16.0,
                            help="working set of the idle VM, background activity (assumed, within the 10-20 MB "
                                 "Waldspurger reports for Windows; default: %(default)s)")
        parser.add_argument("--busy-ws-mb", type=float, default=250.0,
                            help="working set of the busy VM (assumed; default: %(default)s)")
        parser.add_argument("--samples", type=int, default=SAMPLE_PAGES,
                            help="pages sampled per VM per period (default: %(default)s, as ESX)")
        parser.add_argument("--balloon-mb", type=float, default=32.0,
                            help="most memory a balloon moves per period (assumed; default: %(default)s)")
        parser.add_argument("--fast-weight", type=float, default=Smoothing.fast,
                            help="weight of a new sample in the fast moving average (assumed; default: %(default)s)")
        parser.add_argument("--slow-weight", type=float, default=Smoothing.slow,
                            help="weight of a new sample in the slow moving average (assumed; default: %(default)s)")
        add_seed_arguments(parser, first=4)

    def run(self, args: argparse.Namespace) -> LabResult:
        if args.samples < 1 or not (0 < args.slow_weight <= 1 and 0 < args.fast_weight <= 1):
            raise ConfigError("--samples/--fast-weight/--slow-weight", (args.samples, args.fast_weight,
                                                                       args.slow_weight),
                              "at least one sample, and weights in (0, 1]")
        base = figure7_scenario(args.tax, args.memory_mb, args.vm_mb, args.idle_ws_mb, args.busy_ws_mb)
        scenario = replace(base, balloon_mb_per_epoch=args.balloon_mb, samples=args.samples,
                           smoothing=Smoothing(args.fast_weight, args.slow_weight))
        runs = simulate_seeds(scenario, seeds_of(args))
        return LabResult(
            tables=(formula_table(), equilibrium_table(scenario), timeline_table(runs)),
            plot=lambda figure: plot(figure, runs),
            summary=_summary(runs),
            headline=_headline(runs, args.tax),
            assumptions=_assumptions(args),
        )


def _headline(runs: SeededRuns, tax: float) -> tuple[tuple[str, float | Estimate], ...]:
    idle_mb, _ = equilibrium(runs.scenario, tax)
    return (("idle VM MB (equilibrium)", round(idle_mb, 1)),
            ("idle VM MB (simulated)", runs.figure("allocation", TAXED_EPOCH, 0)),
            ("busy VM MB (simulated)", runs.figure("allocation", TAXED_EPOCH, 1)),
            ("idle VM sampled WS MB", runs.mean_estimate(TAX_FROM_EPOCH, TAXED_EPOCH, 0)))


def _assumptions(args: argparse.Namespace) -> tuple[Assumption, ...]:
    paper = "Waldspurger, OSDI 2002"
    return (
        Assumption("tax rate", args.tax, f"{paper}, section 5.2 (the ESX default, 75 %)"),
        Assumption("pages sampled per period", args.samples, f"{paper}, section 5.3 (ESX default: 100 per 30 s)"),
        Assumption("sampling period s", SAMPLE_PERIOD_S, f"{paper}, section 5.3"),
        Assumption("estimate = max(fast, slow moving average)", True, f"{paper}, Figure 6"),
        Assumption("two VMs, equal shares, one idle and one busy, tax raised during the run", True,
                   f"{paper}, Figure 7's set-up"),
        Assumption("host memory MB", args.memory_mb, "assumed (Figure 7's could not be retrieved)"),
        Assumption("VM size MB", args.vm_mb, "assumed (Figure 7's could not be retrieved)"),
        Assumption("idle VM working set MB", args.idle_ws_mb,
                   f"assumed, within the 10-20 MB of Windows background activity ({paper}, Figure 6 text)"),
        Assumption("busy VM working set MB", args.busy_ws_mb, "assumed"),
        Assumption("VM1's working set once busy MB", 200.0, "assumed"),
        Assumption("periods: tax from, VM1 busy from", (TAX_FROM_EPOCH, BUSY_FROM_EPOCH), "assumed"),
        Assumption("balloon MB per period", args.balloon_mb, "assumed"),
        Assumption("fast moving-average weight", args.fast_weight, "assumed"),
        Assumption("slow moving-average weight", args.slow_weight, "assumed"),
        Assumption("floor: min(working-set estimate, proportional share), or the reservation", True,
                   "assumed (the model's reading of section 5.2)"),
    )


def formula_table() -> Table:
    rows = []
    for tax in (0.0, 0.25, 0.5, 0.75, 0.9):
        k = idle_page_cost(tax)
        idle = adjusted_ratio(1000, 100, 0.1, tax)
        busy = adjusted_ratio(1000, 100, 1.0, tax)
        rows.append((f"{tax:.0%}", round(k, 3), round(busy, 3), round(idle, 3), round(busy / idle, 3)))
    return Table(
        title="Adjusted shares per page rho = S / (P (f + k (1 - f))), k = 1 / (1 - tau); S = 1000, P = 100",
        columns=("tax tau", "k", "rho busy (f=1)", "rho idle (f=0.1)", "busy/idle"),
        rows=tuple(rows),
        notes=("the lowest rho loses memory first; at the ESX default tau = 75 % an idle page costs 4 active ones.",),
    )


def equilibrium_table(scenario: Scenario) -> Table:
    idle, busy = scenario.vms
    w_idle, w_busy = idle.working_set_at(0), busy.working_set_at(0)
    share = scenario.memory_mb * idle.shares / (idle.shares + busy.shares)
    rows = []
    for tax in (0.0, 0.25, 0.5, 0.75, 0.9, 0.99):
        a_idle, a_busy = equilibrium(scenario, tax)
        kept = (a_idle - w_idle) / (share - w_idle) if share > w_idle else 1.0
        rows.append((f"{tax:.0%}", round(a_idle, 1), round(a_busy, 1), round(kept, 3), round(1 - tax, 3)))
    return Table(
        title=f"Steady state, {scenario.memory_mb:g} MB for two VMs with equal shares "
              f"(working sets {w_idle:g} and {w_busy:g} MB)",
        columns=("tax tau", "idle VM MB", "busy VM MB", "idle pages kept", ">= 1 - tau"),
        rows=tuple(rows),
        notes=("idle pages kept: the idle VM's idle memory as a share of what pure share-based allocation "
               f"({share:g} MB) leaves it; the tax never takes more than tau of it.",),
    )


def timeline_table(runs: SeededRuns) -> Table:
    scenario, first = runs.scenario, runs.timelines[0]
    shown = sorted({0, 10, 19, 21, 25, 30, 40, 59, 61, 65, 70, scenario.epochs - 1} & set(range(scenario.epochs)))
    rows = []
    for epoch in shown:
        row: list[object] = [epoch, f"{first.tax[epoch]:.0%}"]
        for i in range(len(first.names)):
            row += [round(first.working_set[epoch, i]), runs.figure("estimate", epoch, i),
                    runs.figure("allocation", epoch, i)]
        rows.append(tuple(row))
    columns: list[str] = ["epoch", "tax"]
    for i in range(len(first.names)):
        columns += [f"vm{i + 1} WS", f"vm{i + 1} est", f"vm{i + 1} MB"]
    count = len(runs.timelines)
    return Table(
        title=f"Memory moving between VMs (one epoch = one {SAMPLE_PERIOD_S} s sampling period), {count} seed"
              f"{'s' if count != 1 else ''} from {scenario.seed}: mean [95 % interval]",
        columns=tuple(columns), rows=tuple(rows),
        notes=(f"WS: true working set; est: sampled estimate ({scenario.samples} pages per period, max of fast "
               "and slow averages); MB: allocation after ballooning. " + "; ".join(
                   f"vm{i + 1} = {name}" for i, name in enumerate(first.names)),),
    )


def _summary(runs: SeededRuns) -> tuple[str, ...]:
    scenario = runs.scenario
    below = []
    for timeline in runs.timelines:
        protected = np.array([protected_working_sets(scenario.vms, row, scenario.memory_mb)
                              for row in timeline.working_set])
        below.append(float(np.count_nonzero((timeline.allocation < protected - 1.0).any(axis=1))))
    idle = [runs.figure("allocation", epoch, 0) for epoch in (TAX_FROM_EPOCH - 1, TAXED_EPOCH, scenario.epochs - 1)]
    return (f"idle VM: {idle[0]:.4g} MB at tax 0 %, {idle[1]:.4g} MB at tax {scenario.tax_at(TAXED_EPOCH):.0%}, "
            f"{idle[2]:.4g} MB once busy (mean [95 % interval] of {len(runs.timelines)} seeds)",
            f"its sampled working set under the tax: {runs.mean_estimate(TAX_FROM_EPOCH, TAXED_EPOCH, 0):.4g} MB "
            f"(true: {scenario.vms[0].working_set_at(TAX_FROM_EPOCH):g} MB)",
            f"periods with a VM below its protected working set (balloon still moving): {estimate(below).rounded(1):.4g}")


def plot(figure: Figure, runs: SeededRuns) -> None:
    """Allocations and sampled estimates (means over the seeds, with their 95 % intervals shaded), the true
    working sets, and the 10-20 MB of Windows background activity Waldspurger reports. Figure 7's own values
    could not be retrieved, so none are drawn."""
    scenario, first = runs.scenario, runs.timelines[0]
    axes = figure.subplots()
    epochs = np.arange(len(first.tax))
    low_bg, high_bg = WINDOWS_BACKGROUND_MB
    axes.axhspan(low_bg, high_bg, color="grey", alpha=0.2,
                 label="Waldspurger 2002 (Fig. 6 text): 10-20 MB Windows background")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for i, name in enumerate(first.names):
        colour = colours[i % len(colours)]
        for series, style, what in (("allocation", "-", "allocation"), ("estimate", ":", "sampled estimate")):
            mean, low, high = runs.band(series, i)
            axes.plot(epochs, mean, color=colour, linestyle=style, linewidth=2 if series == "allocation" else 1.2,
                      label=f"{name}: {what}")
            axes.fill_between(epochs, low, high, color=colour, alpha=0.25, linewidth=0)
        axes.plot(epochs, first.working_set[:, i], color=colour, linestyle="--", linewidth=0.8,
                  label=f"{name}: true working set")
    for start, tax in scenario.tax_schedule[1:]:
        axes.axvline(start, color="grey", linestyle="-.", linewidth=0.8)
        axes.annotate(f"tax {tax:.0%}", (start, scenario.memory_mb * 0.95), xytext=(4, 0),
                      textcoords="offset points", fontsize="small")
    axes.set_xlabel(f"sampling period ({SAMPLE_PERIOD_S} s each)")
    axes.set_ylabel("MB")
    axes.set_ylim(0, scenario.memory_mb)
    axes.set_title(f"Idle memory tax: {scenario.memory_mb:g} MB shared by two VMs with equal shares "
                   f"({len(runs.timelines)} seeds, 95 % intervals shaded)", fontsize="medium")
    axes.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)


MODEL = BalloonModel()
