"""The host's memory policy, pure: share-based allocation with the idle memory tax over working-set floors, and
the bookkeeping that notices a guest ignoring its balloon.

Each VM i has shares S_i, configured RAM M_i, a minimum m_i (admission's floor) and a working set W_i. The memory
for guests is A = budget - the host's own overhead. A VM may hold its allocation a_i; its balloon target is
M_i - a_i.

1. Floors. f_i = clamp(W_i (1 + margin_fraction) + margin, m_i, M_i): no VM is ballooned below what it uses plus a
   margin. If the floors do not fit in A (working sets outgrew the budget), they are cut by shares
   (f_i = clamp(L S_i, m_i, desired f_i) with L chosen so that they fill A) and the decision says `pressure`.
2. Idle memory tax (Waldspurger, OSDI 2002, §5.2; `pyrovisor.idle_tax`, which the lab's model uses too): with k = 1 / (1 - tau),
   a VM holding P pages of which W are active costs W + k (P - W) and pays rho = S / cost per page. Memory is
   allocated so that rho is equal for all VMs, each between its floor and M_i, using all of A (bisection on rho,
   `pyrovisor.idle_tax.target_allocations`). Idle pages cost k times as much, so they are what is reclaimed first.
3. Allocations are rounded down to 2 MiB (so their sum stays within A) and a change smaller than `min_move` is
   not made when keeping the old value still fits (no balloon churn).

The `guest-stats` policy runs the same allocator but takes W_i from what the guest says it uses (total - free, or
total - available; the total a guest reports leaves its balloon out), as QEMU/libvirt/MOM-style policies do. The
`share` policy takes W_i from the host's own estimate (`WorkingSetEstimator`: the larger of its fast and slow
averages, or the latest interval when that is larger still, so growth is answered at once).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pyrovisor.errors import ConfigError
from pyrovisor.idle_tax import Client, target_allocations

MiB = 1 << 20
GRANULE = 2 * MiB
PAGE_SIZE = 4096
POLICIES = ("share", "guest-stats")
GUEST_STATS_FIELDS = ("free", "available")


@dataclass(frozen=True)
class PolicySettings:
    kind: str = "share"  # "share" (host-measured working sets) or "guest-stats" (what the guest reports)
    tax: float = 0.75  # idle memory tax rate tau (ESX's default): an idle page costs 1 / (1 - tau) active ones
    margin_bytes: int = 16 * MiB  # added to a working set before it becomes a floor
    margin_fraction: float = 0.10  # ... and this fraction of it (sampling error, growth within an interval)
    min_move_bytes: int = 8 * MiB  # smaller changes of an allocation are not made (when keeping it fits)
    interval_s: float = 1.0  # the policy runs this often (and at once when a working set grows)
    balloon_timeout_s: float = 10.0  # a guest whose balloon does not move toward its target this long is reported
    guest_stats_field: str = "free"  # guest-stats: used = total - free, or total - available
    guest_stats_max_age_s: float = 10.0  # guest-stats: older statistics are not used
    reclaim_backoff_s: float = 30.0  # a guest that took pages back from its balloon (out of memory) is not shrunk

    def validate(self) -> None:
        if self.kind not in POLICIES:
            raise ConfigError("policy", self.kind, f"one of {', '.join(POLICIES)}")
        if not (math.isfinite(self.tax) and 0.0 <= self.tax < 1.0):
            raise ConfigError("tax", self.tax, "a rate in [0, 1), e.g. 0.75")
        if not 0 <= self.margin_bytes <= 1 << 40:
            raise ConfigError("margin", self.margin_bytes, "between 0 and 1 TiB")
        if not (math.isfinite(self.margin_fraction) and 0.0 <= self.margin_fraction <= 10.0):
            raise ConfigError("margin fraction", self.margin_fraction, "between 0 and 10")
        if not 0 <= self.min_move_bytes <= 1 << 40:
            raise ConfigError("min move", self.min_move_bytes, "between 0 and 1 TiB")
        for name, value in (("policy interval", self.interval_s), ("balloon timeout", self.balloon_timeout_s),
                            ("guest statistics age", self.guest_stats_max_age_s),
                            ("reclaim back-off", self.reclaim_backoff_s)):
            if not (math.isfinite(value) and 0.05 <= value <= 86400):
                raise ConfigError(name, value, "between 0.05 and 86400 seconds")
        if self.guest_stats_field not in GUEST_STATS_FIELDS:
            raise ConfigError("guest statistics field", self.guest_stats_field, "'free' or 'available'")


@dataclass(frozen=True)
class GuestStats:
    """What the guest's balloon driver reported (bytes); None where it supplied nothing."""

    total: int | None = None
    free: int | None = None
    available: int | None = None
    caches: int | None = None
    age_s: float = 0.0


@dataclass(frozen=True)
class VmInput:
    """One VM as the policy sees it (bytes)."""

    vm_id: str
    shares: float
    configured: int
    minimum: int
    held: int  # configured - what the guest has in its balloon now
    working_set: int | None = None  # the host's estimate; None before the first interval
    responsive: bool = True  # False: its balloon ignored the last request: it keeps what it holds (or gets more)
    fixed: bool = False  # pinned by the operator: it holds exactly `held`
    stats: GuestStats | None = None


@dataclass(frozen=True)
class Decision:
    """How much each VM may hold (bytes, a multiple of 2 MiB), with the floors and the working sets used."""

    allocations: dict[str, int]
    floors: dict[str, int]
    working_sets: dict[str, int]
    available: int
    pressure: bool = False  # the working sets (plus margins) did not fit: floors were cut by shares
    notes: tuple[str, ...] = field(default_factory=tuple)

    def balloon_pages(self, vm: VmInput) -> int:
        """The balloon target that leaves `vm` its allocation."""
        return max(0, vm.configured - self.allocations[vm.vm_id]) // PAGE_SIZE


def share_cut(desired: Sequence[float], minimum: Sequence[float], shares: Sequence[float],
              memory: float) -> list[float]:
    """clamp(L S_i, minimum_i, desired_i) with the level L that fills `memory` (water-filling by shares); the
    desired values when they fit, the minima when not even those do."""
    if sum(desired) <= memory:
        return list(desired)
    if sum(minimum) >= memory:
        return list(minimum)

    def total(level: float) -> float:
        return sum(min(max(level * s, lo), hi) for s, lo, hi in zip(shares, minimum, desired, strict=True))

    low, high = 0.0, max(d / s for d, s in zip(desired, shares, strict=True) if s > 0) + 1.0
    for _ in range(200):
        middle = (low + high) / 2
        if total(middle) > memory:
            high = middle
        else:
            low = middle
    return [min(max(low * s, lo), hi) for s, lo, hi in zip(shares, minimum, desired, strict=True)]


# --- the policies ----------------------------------------------------------------------------------------------------
def guest_used(vm: VmInput, settings: PolicySettings) -> int | None:
    """What the guest says it uses, or None without (recent enough) statistics."""
    stats = vm.stats
    if stats is None or stats.total is None or stats.age_s > settings.guest_stats_max_age_s:
        return None
    if settings.guest_stats_field == "available":
        if stats.available is None:
            return None
        return max(0, stats.total - stats.available)
    if stats.free is None:
        return None
    return max(0, stats.total - stats.free)


def working_set_of(vm: VmInput, settings: PolicySettings) -> int:
    """The working set the policy protects: the host's estimate (share) or the guest's word (guest-stats). Before
    the first estimate (or statistics) a VM is taken to use its minimum, its boot footprint: the estimate comes
    one sampling interval later, and growth is answered at once then."""
    measured = vm.working_set if settings.kind == "share" else guest_used(vm, settings)
    return vm.minimum if measured is None else measured


def decide(vms: Sequence[VmInput], available: int, settings: PolicySettings,
           current: Mapping[str, int] | None = None) -> Decision:
    """The allocation of `available` bytes among `vms` (see the module's description). `current` holds the
    allocations in force (for hysteresis); a pinned VM holds exactly its amount, one that is not responsive at least
    what it holds, and the others share the rest."""
    notes: list[str] = []
    working = {vm.vm_id: min(vm.configured, max(0, working_set_of(vm, settings))) for vm in vms}
    desired, minimum, maximum = [], [], []
    for vm in vms:
        held = float(min(max(vm.held, 0), vm.configured))
        if vm.fixed:
            desired.append(held)
            minimum.append(held)
            maximum.append(held)
            continue
        wanted = working[vm.vm_id] * (1 + settings.margin_fraction) + settings.margin_bytes
        low = float(min(vm.minimum, vm.configured))
        if not vm.responsive:  # nothing can be taken from it, but a growing working set still gets more
            low = max(low, held)
        desired.append(min(float(vm.configured), max(low, wanted)))
        minimum.append(low)
        maximum.append(float(vm.configured))
    shares = [max(vm.shares, 1e-9) for vm in vms]
    pressure = sum(desired) > available
    floors = share_cut(desired, minimum, shares, float(available)) if pressure else desired
    if pressure:
        notes.append(f"working sets plus margins ({sum(desired) / MiB:.0f} MiB) exceed the memory for guests "
                     f"({available / MiB:.0f} MiB): floors cut by shares")
    to_mib = 1.0 / MiB
    claims = [Client(share, working[vm.vm_id] * to_mib, floor * to_mib, high * to_mib)
              for vm, share, floor, high in zip(vms, shares, floors, maximum, strict=True)]
    amounts = target_allocations(claims, available * to_mib, settings.tax)
    allocations = {vm.vm_id: _round_down(max(amount * MiB, floor), vm.configured)
                   for vm, amount, floor in zip(vms, amounts, floors, strict=True)}
    floors_by_id = {vm.vm_id: _round_down(floor, vm.configured) for vm, floor in zip(vms, floors, strict=True)}
    _fit(allocations, floors_by_id, available)
    if current:
        _keep_small_changes(allocations, floors_by_id, current, available, settings.min_move_bytes,
                            {vm.vm_id for vm in vms if vm.responsive and not vm.fixed})
    return Decision(allocations, floors_by_id, working, available, pressure, tuple(notes))


def _round_down(amount: float, configured: int) -> int:
    """A multiple of 2 MiB (the VM's RAM granule), at most the configured size."""
    return min(configured, int(amount) // GRANULE * GRANULE)


def _fit(allocations: dict[str, int], floors: Mapping[str, int], available: int) -> None:
    """Rounding can only lower allocations; should floors rounded down still exceed `available` (minima that do
    not fit: admission prevents it), take the excess from the largest allocations above their floors."""
    excess = sum(allocations.values()) - available
    for vm_id in sorted(allocations, key=lambda name: allocations[name] - floors[name], reverse=True):
        if excess <= 0:
            return
        spare = allocations[vm_id] - floors[vm_id]
        cut = min(spare, -(-excess // GRANULE) * GRANULE)
        allocations[vm_id] -= cut
        excess -= cut


def _keep_small_changes(allocations: dict[str, int], floors: Mapping[str, int], current: Mapping[str, int],
                        available: int, min_move: int, movable: Iterable[str]) -> None:
    """Where an allocation would move by less than `min_move`, keep the one in force, as long as it is not below
    the new floor and the total still fits."""
    for vm_id in sorted(movable):
        old = current.get(vm_id)
        new = allocations.get(vm_id)
        if old is None or new is None or old == new or abs(new - old) >= min_move or old < floors[vm_id]:
            continue
        if sum(allocations.values()) - new + old <= available:
            allocations[vm_id] = old


def change_order(current: Mapping[str, int], allocations: Mapping[str, int]) -> list[str]:
    """The order to apply new allocations in: every raise (a deflate: a VM that needs memory gets it now) before
    any cut (an inflate), largest first within each group; unchanged VMs are left out."""
    raises = sorted((vm for vm in allocations if allocations[vm] > current.get(vm, 0)),
                    key=lambda vm: current.get(vm, 0) - allocations[vm])
    cuts = sorted((vm for vm in allocations if allocations[vm] < current.get(vm, 0)),
                  key=lambda vm: allocations[vm] - current.get(vm, 0))
    return raises + cuts


# --- a guest that ignores its balloon ----------------------------------------------------------------------------------
@dataclass
class BalloonWatch:
    """Whether one VM's balloon follows its target. A request whose `actual` has not moved toward the target within
    `timeout_s` is counted as ignored once, and the VM stays unresponsive until its balloon moves again. A balloon
    that shrinks below its target on the guest's own (deflate on OOM: the guest ran short) is counted as a reclaim;
    the host then leaves the VM what it holds for a while. Pure: the caller passes the time."""

    timeout_s: float
    backoff_s: float = 30.0  # after a reclaim, the guest is short of memory: not reported as ignoring its balloon
    target: int | None = None  # pages
    since: float = 0.0  # when the current request was made (or last made progress)
    actual_then: int = 0
    ignored: int = 0  # requests ignored so far
    unresponsive: bool = False
    last_actual: int = 0
    reclaims: int = 0  # times the guest took pages back from its balloon
    reclaimed_at: float | None = None

    def requested(self, target: int, actual: int, now: float) -> None:
        """A new target was set."""
        if target != self.target:
            self.target, self.since, self.actual_then = target, now, actual

    def observe(self, actual: int, now: float) -> None:
        """The balloon's `actual` now."""
        shrank_on_its_own = self.target is not None and actual < self.last_actual and actual < self.target
        self.last_actual = actual
        if shrank_on_its_own:
            self.reclaims += 1
            self.reclaimed_at = now
        if self.target is None:
            return
        remaining = abs(self.target - actual)
        if remaining == 0 or remaining < abs(self.target - self.actual_then):  # reached, or moving toward it
            self.unresponsive = False
            self.since, self.actual_then = now, actual
            return
        if self.backing_off(now, self.backoff_s):  # the guest is short of memory, not deaf: the host backs off
            self.since, self.actual_then = now, actual
            return
        if not self.unresponsive and now - self.since >= self.timeout_s:
            self.unresponsive = True
            self.ignored += 1

    def backing_off(self, now: float, backoff_s: float) -> bool:
        """The guest reclaimed pages less than `backoff_s` ago: do not shrink it below what it holds."""
        return self.reclaimed_at is not None and now - self.reclaimed_at < backoff_s

    @property
    def settled(self) -> bool:
        return self.target is None or not self.unresponsive
