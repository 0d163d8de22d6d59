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
working-set sizes, smoothing weights and balloon rate of the default scenario are assumptions.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pyrovisor.errors import ConfigError
from pyrovisor.idle_tax import Client, adjusted_ratio, idle_page_cost, target_allocations
from pyrovisor.lab.model import LabResult, Table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_TAX = 0.75
SAMPLE_PAGES = 100
SAMPLE_PERIOD_S = 30


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


def figure7_scenario(tax: float = DEFAULT_TAX, memory_mb: float = 360.0) -> Scenario:
    """Two 256 MB VMs with equal shares: VM1 idle (background activity only), VM2 busy; the tax rate goes
    from 0 to `tax` at epoch 20 (as in the paper's Figure 7 experiment); VM1 becomes busy at epoch 60."""
    return Scenario(
        vms=(VmSpec("vm1 (idle, then busy)", 1000, 256, ((0, 16.0), (60, 200.0))),
             VmSpec("vm2 (busy)", 1000, 256, ((0, 250.0),))),
        memory_mb=memory_mb, epochs=90, tax_schedule=((0, 0.0), (20, tax)))


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

class BalloonModel:
    name = "balloon"
    summary = "Share-based memory reclamation with Waldspurger's idle memory tax and sampled working sets"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--tax", type=float, default=DEFAULT_TAX,
                            help="idle memory tax rate applied from epoch 20 (default: %(default)s)")
        parser.add_argument("--memory-mb", type=float, default=360.0,
                            help="host memory for the two 256 MB VMs (assumed; default: %(default)s)")
        parser.add_argument("--samples", type=int, default=SAMPLE_PAGES,
                            help="pages sampled per VM per period (default: %(default)s, as ESX)")
        parser.add_argument("--balloon-mb", type=float, default=32.0,
                            help="most memory a balloon moves per period (assumed; default: %(default)s)")
        parser.add_argument("--seed", type=int, default=4)

    def run(self, args: argparse.Namespace) -> LabResult:
        base = figure7_scenario(args.tax, args.memory_mb)
        scenario = Scenario(base.vms, base.memory_mb, base.epochs, base.tax_schedule,
                            balloon_mb_per_epoch=args.balloon_mb, samples=args.samples, seed=args.seed)
        timeline = simulate(scenario)
        return LabResult(
            tables=(formula_table(), equilibrium_table(scenario), timeline_table(scenario, timeline)),
            plot=lambda figure: plot(figure, scenario, timeline),
            summary=_summary(scenario, timeline),
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
        floors = protected_working_sets(scenario.vms, [w_idle, w_busy], scenario.memory_mb)
        clients = [Client(idle.shares, w_idle, floors[0], idle.size_mb),
                   Client(busy.shares, w_busy, floors[1], busy.size_mb)]
        a_idle, a_busy = target_allocations(clients, scenario.memory_mb, tax)
        kept = (a_idle - w_idle) / (share - w_idle)
        rows.append((f"{tax:.0%}", round(a_idle, 1), round(a_busy, 1), round(kept, 3), round(1 - tax, 3)))
    return Table(
        title=f"Steady state, {scenario.memory_mb:g} MB for two VMs with equal shares "
              f"(working sets {w_idle:g} and {w_busy:g} MB)",
        columns=("tax tau", "idle VM MB", "busy VM MB", "idle pages kept", ">= 1 - tau"),
        rows=tuple(rows),
        notes=("idle pages kept: the idle VM's idle memory as a share of what pure share-based allocation "
               f"({share:g} MB) leaves it; the tax never takes more than tau of it.",),
    )


def timeline_table(scenario: Scenario, timeline: Timeline) -> Table:
    shown = sorted({0, 10, 19, 21, 25, 30, 40, 59, 61, 65, 70, scenario.epochs - 1} & set(range(scenario.epochs)))
    rows = []
    for epoch in shown:
        row: list[object] = [epoch, f"{timeline.tax[epoch]:.0%}"]
        for i in range(len(timeline.names)):
            row += [round(timeline.working_set[epoch, i]), round(timeline.estimate[epoch, i]),
                    round(timeline.allocation[epoch, i])]
        rows.append(tuple(row))
    columns: list[str] = ["epoch", "tax"]
    for i in range(len(timeline.names)):
        columns += [f"vm{i + 1} WS", f"vm{i + 1} est", f"vm{i + 1} MB"]
    return Table(
        title=f"Memory moving between VMs (one epoch = one {SAMPLE_PERIOD_S} s sampling period)",
        columns=tuple(columns), rows=tuple(rows),
        notes=(f"WS: true working set; est: sampled estimate ({scenario.samples} pages per period, max of fast "
               "and slow averages); MB: allocation after ballooning. " + "; ".join(
                   f"vm{i + 1} = {name}" for i, name in enumerate(timeline.names)),),
    )


def _summary(scenario: Scenario, timeline: Timeline) -> tuple[str, ...]:
    protected = np.array([protected_working_sets(scenario.vms, row, scenario.memory_mb)
                          for row in timeline.working_set])
    below = int(np.count_nonzero((timeline.allocation < protected - 1.0).any(axis=1)))
    return (f"idle VM: {timeline.allocation[19, 0]:.0f} MB at tax 0 %, {timeline.allocation[59, 0]:.0f} MB at tax "
            f"{scenario.tax_at(59):.0%}, {timeline.allocation[-1, 0]:.0f} MB once busy",
            f"periods with a VM below its protected working set (balloon still moving): {below}")


def plot(figure: Figure, scenario: Scenario, timeline: Timeline) -> None:
    axes = figure.subplots()
    epochs = np.arange(len(timeline.tax))
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for i, name in enumerate(timeline.names):
        colour = colours[i % len(colours)]
        axes.plot(epochs, timeline.allocation[:, i], color=colour, linewidth=2, label=f"{name}: allocation")
        axes.plot(epochs, timeline.estimate[:, i], color=colour, linestyle=":", label=f"{name}: sampled estimate")
        axes.plot(epochs, timeline.working_set[:, i], color=colour, linestyle="--", linewidth=0.8,
                  label=f"{name}: true working set")
    for start, tax in scenario.tax_schedule[1:]:
        axes.axvline(start, color="grey", linestyle="-.", linewidth=0.8)
        axes.annotate(f"tax {tax:.0%}", (start, scenario.memory_mb * 0.95), xytext=(4, 0),
                      textcoords="offset points", fontsize="small")
    axes.set_xlabel(f"sampling period ({SAMPLE_PERIOD_S} s each)")
    axes.set_ylabel("MB")
    axes.set_ylim(0, scenario.memory_mb)
    axes.set_title(f"Idle memory tax: {scenario.memory_mb:g} MB shared by two VMs with equal shares")
    axes.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)


MODEL = BalloonModel()
