"""Waldspurger's idle memory tax: the adjusted shares-per-page ratio and the allocator that equalises it."""

# OSDI 2002, section 5.2. A client with S shares holding P pages, W of them active, costs W + k (P - W) with
# k = 1 / (1 - tau) and pays rho = S / cost per page. Repeated min-funding revocation (take from the lowest rho)
# ends where rho is equal for every client between its bounds: `target_allocations` finds that point by
# bisection on rho. The lab's balloon model and the host's memory policy both allocate with it; it needs no numpy.

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pyrovisor.errors import ConfigError


def idle_page_cost(tax: float) -> float:
    """k = 1 / (1 - tau): how many active pages one idle page costs."""
    if not 0.0 <= tax < 1.0:
        raise ConfigError("--tax", tax, "the tax rate must be in [0, 1)")
    return 1.0 / (1.0 - tax)


def adjusted_ratio(shares: float, pages: float, active_fraction: float, tax: float) -> float:
    """rho = S / (P (f + k (1 - f))): shares per page, idle pages charged k times."""
    k = idle_page_cost(tax)
    return shares / (pages * (active_fraction + k * (1.0 - active_fraction)))


@dataclass(frozen=True)
class Client:
    """One VM as the allocator sees it (any unit: MB, MiB, pages): shares, active memory, and bounds on its
    allocation."""

    shares: float
    active: float
    minimum: float = 0.0
    maximum: float = math.inf


def _allocation_at(client: Client, rho: float, k: float) -> float:
    """The allocation whose adjusted ratio is rho (cost = S / rho), within the client's bounds."""
    cost = client.shares / rho
    amount = cost if cost <= client.active else client.active + (cost - client.active) / k
    return min(max(amount, client.minimum), client.maximum)


def target_allocations(clients: Sequence[Client], memory: float, tax: float) -> list[float]:
    """Allocations with one adjusted ratio for all (bounds permitting) that use `memory`. Everyone gets its maximum
    when that fits, its minimum when not even that fits."""
    k = idle_page_cost(tax)
    if sum(c.maximum for c in clients) <= memory:
        return [c.maximum for c in clients]
    if sum(c.minimum for c in clients) >= memory:
        return [c.minimum for c in clients]
    low, high = 1e-12, 1e12  # a bracket on rho; the total falls as rho rises
    for _ in range(200):
        rho = math.sqrt(low * high)
        if sum(_allocation_at(c, rho, k) for c in clients) > memory:
            low = rho
        else:
            high = rho
    return [_allocation_at(c, high, k) for c in clients]
