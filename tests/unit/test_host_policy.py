"""The host's memory policy without KVM: shares, the idle memory tax (against hand-computed cases),
floors, growth, the budget, guests that ignore their balloon, and the host's configuration parser."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyrovisor.errors import ConfigError
from pyrovisor.host.config import DEFAULT_MIN, load_host_config, parse_host_config, size_value
from pyrovisor.host.policy import (
    GRANULE,
    BalloonWatch,
    GuestStats,
    PolicySettings,
    VmInput,
    change_order,
    decide,
    share_cut,
)
from pyrovisor.idle_tax import Client, adjusted_ratio, idle_page_cost, target_allocations

MiB = 1 << 20
GiB = 1 << 30


def vm(name: str, working_set: int | None, configured: int = GiB, shares: float = 1000, minimum: int = 32 * MiB,
       held: int | None = None, **extra: object) -> VmInput:
    return VmInput(name, shares, configured, minimum, configured if held is None else held, working_set,
                   **extra)  # type: ignore[arg-type]


# --- the idle memory tax ---------------------------------------------------------------------------------------------
def test_idle_page_cost_and_ratio_match_the_paper() -> None:
    assert idle_page_cost(0.0) == 1.0 and idle_page_cost(0.75) == pytest.approx(4.0)
    # S = 1000, P = 100: all active -> 10 per page; 10 % active at tau = 75 % -> 1000 / (100 (0.1 + 4 * 0.9))
    assert adjusted_ratio(1000, 100, 1.0, 0.75) == pytest.approx(10.0)
    assert adjusted_ratio(1000, 100, 0.1, 0.75) == pytest.approx(1000 / 370)
    with pytest.raises(ConfigError):
        idle_page_cost(1.0)


def test_without_tax_memory_is_split_by_shares() -> None:
    claims = [Client(1000, 10, 0, 1000), Client(3000, 10, 0, 1000)]
    assert target_allocations(claims, 400, 0.0) == pytest.approx([100, 300], rel=1e-6)


def test_the_tax_takes_idle_memory_hand_computed() -> None:
    """Two 256 MB VMs with equal shares in 360 MB, working sets 16 and 250 MB, tau = 75 % (k = 4). Equal costs:
    16 + 4 (a1 - 16) = 250 + 4 (a2 - 250) gives a1 = a2 - 175.5, so a2 = 267.75 > 256: the busy VM gets all of its
    256 MB and the idle one the remaining 104 MB (at tau = 0 both would get 180)."""
    claims = [Client(1000, 16, 0, 256), Client(1000, 250, 0, 256)]
    assert target_allocations(claims, 360, 0.75) == pytest.approx([104, 256], rel=1e-6)
    assert target_allocations(claims, 360, 0.0) == pytest.approx([180, 180], rel=1e-6)


def test_everyone_gets_the_maximum_when_it_fits_and_the_minimum_when_nothing_else_does() -> None:
    claims = [Client(1, 1, 10, 50), Client(1, 1, 20, 60)]
    assert target_allocations(claims, 200, 0.75) == [50, 60]
    assert target_allocations(claims, 25, 0.75) == [10, 20]


claim_lists = st.lists(st.tuples(st.floats(1, 5000), st.floats(0, 1000), st.floats(0, 200), st.floats(0, 1000)),
                       min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(claim_lists, st.floats(1, 8000), st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9]))
def test_allocations_stay_within_their_bounds_and_the_memory(raw: list[tuple[float, float, float, float]],
                                                            memory: float, tax: float) -> None:
    """The allocator the policy uses (`pyrovisor.idle_tax`, the lab's too), for any clients and memory."""
    claims = [Client(shares, active, low, low + extra) for shares, active, low, extra in raw]
    ours = target_allocations(claims, memory, tax)
    assert all(c.minimum - 1e-6 <= a <= c.maximum + 1e-6 for c, a in zip(claims, ours, strict=True))
    if sum(c.minimum for c in claims) <= memory:
        assert sum(ours) <= memory + 1e-6


def test_share_cut_fills_memory_by_shares_between_bounds() -> None:
    assert share_cut([100, 100], [10, 10], [1, 1], 300) == [100, 100]
    assert share_cut([300, 300], [10, 10], [1, 3], 200) == pytest.approx([50, 150], rel=1e-6)
    assert share_cut([300, 40], [10, 10], [1, 1], 200) == pytest.approx([160, 40], rel=1e-6)
    assert share_cut([300, 300], [150, 150], [1, 1], 200) == [150, 150]


# --- the policy ---------------------------------------------------------------------------------------------------------
def test_floors_are_working_set_plus_margin_and_idle_memory_goes_to_the_busy() -> None:
    policy = PolicySettings(tax=0.75, margin_bytes=16 * MiB, margin_fraction=0.10)
    vms = [vm("idle", 40 * MiB), vm("busy", 400 * MiB)]
    decision = decide(vms, 1000 * MiB, policy)
    assert decision.floors["idle"] == 60 * MiB  # 40 * 1.1 + 16 = 60 MiB
    assert decision.floors["busy"] == 456 * MiB  # 440 + 16
    assert not decision.pressure
    allocations = decision.allocations
    assert sum(allocations.values()) <= 1000 * MiB
    assert allocations["busy"] > allocations["idle"] >= 60 * MiB
    assert all(amount % GRANULE == 0 for amount in allocations.values())
    # what the allocator gives for the same clients (MiB), rounded down to 2 MiB
    expected = target_allocations([Client(1000, 40, 60, 1024), Client(1000, 400, 456, 1024)], 1000, 0.75)
    assert [allocations["idle"] / MiB, allocations["busy"] / MiB] == [2 * math.floor(x / 2) for x in expected]
    assert decision.balloon_pages(vms[0]) == (GiB - allocations["idle"]) // 4096


def test_no_target_is_below_working_set_plus_margin_when_they_fit() -> None:
    policy = PolicySettings()
    sets = [100, 400, 250, 100, 380, 120, 200, 100]
    vms = [vm(f"vm{i}", ws * MiB) for i, ws in enumerate(sets)]
    decision = decide(vms, 2900 * MiB, policy)
    for each in vms:
        assert each.working_set is not None
        assert decision.allocations[each.vm_id] >= each.working_set * 1.1 + 16 * MiB - GRANULE
    assert sum(decision.allocations.values()) <= 2900 * MiB


def test_growth_raises_the_target_at_once_and_it_is_applied_first() -> None:
    policy = PolicySettings()
    before = decide([vm("a", 100 * MiB), vm("b", 100 * MiB), vm("c", 100 * MiB)], 1200 * MiB, policy)
    after = decide([vm("a", 600 * MiB), vm("b", 100 * MiB), vm("c", 100 * MiB)], 1200 * MiB, policy,
                   before.allocations)
    assert after.allocations["a"] >= 676 * MiB  # 600 * 1.1 + 16
    assert after.allocations["b"] < before.allocations["b"]
    order = change_order(before.allocations, after.allocations)
    assert order[0] == "a", "the deflate of the VM that grew goes out before the others inflate"
    assert set(order[1:]) == {"b", "c"}


def test_the_budget_holds_under_pressure_and_floors_are_cut_by_shares() -> None:
    policy = PolicySettings(margin_bytes=0, margin_fraction=0.0)
    vms = [vm("a", 800 * MiB, shares=1000), vm("b", 800 * MiB, shares=3000)]
    decision = decide(vms, 1000 * MiB, policy)
    assert decision.pressure and decision.notes
    assert sum(decision.allocations.values()) <= 1000 * MiB
    assert decision.floors["a"] == 250 * MiB and decision.floors["b"] == 750 * MiB


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2048), st.integers(64, 2048), st.floats(1, 4000), st.integers(0, 64)),
                min_size=1, max_size=10), st.integers(0, 16384), st.sampled_from(["share", "guest-stats"]))
def test_allocations_stay_in_the_budget_and_above_the_minima(raw: list[tuple[int, int, float, int]],
                                                             spare: int, kind: str) -> None:
    vms = []
    for index, (ws, size, shares, minimum) in enumerate(raw):
        configured = size * 2 * MiB
        low = min(minimum * MiB, configured)
        vms.append(VmInput(f"vm{index}", shares, configured, low, configured, ws * MiB,
                           stats=GuestStats(total=configured, free=max(0, configured - ws * MiB))))
    available = sum(v.minimum for v in vms) + spare * MiB  # admission guarantees the minima fit
    decision = decide(vms, available, PolicySettings(kind=kind))
    assert sum(decision.allocations.values()) <= available
    for v in vms:
        assert v.minimum - GRANULE < decision.allocations[v.vm_id] <= v.configured


def test_small_changes_are_not_made_when_keeping_the_old_value_fits() -> None:
    policy = PolicySettings(min_move_bytes=8 * MiB)
    first = decide([vm("a", 100 * MiB), vm("b", 300 * MiB)], 800 * MiB, policy)
    again = decide([vm("a", 102 * MiB), vm("b", 300 * MiB)], 800 * MiB, policy, first.allocations)
    assert again.allocations == first.allocations


def test_a_vm_that_ignores_its_balloon_keeps_what_it_holds_and_the_others_share_the_rest() -> None:
    policy = PolicySettings()
    vms = [vm("stuck", 50 * MiB, held=700 * MiB, responsive=False), vm("a", 100 * MiB), vm("b", 100 * MiB)]
    decision = decide(vms, 1000 * MiB, policy)
    assert decision.allocations["stuck"] == 700 * MiB
    assert decision.allocations["a"] + decision.allocations["b"] <= 300 * MiB
    grown = decide([vm("stuck", 800 * MiB, held=700 * MiB, responsive=False), vm("a", 10 * MiB)], 1500 * MiB,
                   policy)
    assert grown.allocations["stuck"] >= 896 * MiB, "it cannot shrink, but growth still gets it more"
    pinned = decide([vm("pin", 800 * MiB, held=300 * MiB, fixed=True), vm("a", 10 * MiB)], 1500 * MiB, policy)
    assert pinned.allocations["pin"] == 300 * MiB, "the operator's amount, whatever the working set"


def test_before_the_first_estimate_a_vm_is_taken_at_its_minimum() -> None:
    decision = decide([vm("new", None), vm("old", 500 * MiB)], 700 * MiB, PolicySettings())
    assert decision.working_sets["new"] == 32 * MiB


# --- trusting the guest -------------------------------------------------------------------------------------------------
def test_guest_stats_policy_believes_what_the_guest_says() -> None:
    policy = PolicySettings(kind="guest-stats")
    honest = vm("honest", 100 * MiB, stats=GuestStats(total=GiB, free=GiB - 300 * MiB))
    cold_cache = vm("cache", 50 * MiB, stats=GuestStats(total=GiB, free=GiB - 800 * MiB, caches=700 * MiB))
    liar = vm("liar", 400 * MiB, stats=GuestStats(total=GiB, free=GiB))  # says all is free
    decision = decide([honest, cold_cache, liar], 2000 * MiB, policy)
    assert decision.working_sets == {"honest": 300 * MiB, "cache": 800 * MiB, "liar": 0}
    share = decide([honest, cold_cache, liar], 2000 * MiB, PolicySettings())
    assert share.working_sets == {"honest": 100 * MiB, "cache": 50 * MiB, "liar": 400 * MiB}
    # the guest's total leaves its balloon out: 1 GiB with 500 MiB ballooned reports 524 MiB in total
    ballooned = vm("b", None, stats=GuestStats(total=GiB - 500 * MiB, free=100 * MiB))
    assert decide([ballooned], GiB, policy).working_sets["b"] == GiB - 600 * MiB
    stale = vm("s", None, stats=GuestStats(total=GiB, free=0, age_s=60))
    assert decide([stale], GiB, policy).working_sets["s"] == 32 * MiB
    available = PolicySettings(kind="guest-stats", guest_stats_field="available")
    assert decide([vm("c", None, stats=GuestStats(total=GiB, available=GiB - 200 * MiB))], GiB,
                  available).working_sets["c"] == 200 * MiB


# --- a guest that ignores its balloon -----------------------------------------------------------------------------------
def test_an_ignored_request_is_counted_once_and_never_waited_on() -> None:
    watch = BalloonWatch(timeout_s=10)
    watch.requested(1000, actual=0, now=0)
    watch.observe(0, now=5)
    assert watch.settled and watch.ignored == 0
    watch.observe(0, now=10)
    assert watch.unresponsive and watch.ignored == 1
    watch.observe(0, now=30)
    assert watch.ignored == 1, "one request, counted once"
    watch.observe(10, now=31)  # it moves again
    assert not watch.unresponsive
    watch.observe(10, now=45)
    assert watch.unresponsive and watch.ignored == 2, "stuck part way for another timeout"


def test_a_balloon_that_moves_toward_its_target_is_not_reported() -> None:
    watch = BalloonWatch(timeout_s=2)
    watch.requested(1000, actual=0, now=0)
    for second in range(1, 10):
        watch.observe(100 * second, now=second)
        assert not watch.unresponsive
    watch.observe(1000, now=20)
    assert watch.settled
    watch.requested(200, actual=1000, now=21)  # deflating counts as moving toward the target too
    watch.observe(600, now=22)
    watch.observe(200, now=30)
    assert watch.settled and watch.ignored == 0


# --- the configuration -----------------------------------------------------------------------------------------------
def test_a_host_file_is_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "host.toml"
    path.write_text('[host]\nbudget = "3G"\npolicy = "guest-stats"\ntax = 0.5\nmargin = 32\nlog_dir = "logs"\n'
                    '[sampling]\nsample_pages = 500\ninterval_s = 0.5\n'
                    '[[vm]]\nid = "web"\nguest = "os"\nmemory = "1G"\nvcpus = 1\nshares = 2000\nmin = "64M"\n'
                    '[[vm]]\nguest = "os"\nmemory = 128\n')
    config = load_host_config(path)
    assert config.settings.budget == 3 * GiB and config.settings.policy.kind == "guest-stats"
    assert config.settings.policy.margin_bytes == 32 * MiB and config.settings.sampling.sample_pages == 500
    assert config.settings.log_dir == tmp_path / "logs"
    web, second = config.vms
    assert (web.vm_id, web.memory_size, web.shares, web.minimum) == ("web", GiB, 2000, 64 * MiB)
    assert (second.vm_id, second.memory_size, second.minimum) == ("vm2", 128 * MiB, DEFAULT_MIN)
    assert web.log == tmp_path / "logs" / "web.log"


@pytest.mark.parametrize(("text", "message"), [
    ("[host\nbudget = 1", "not valid TOML"),
    ("[host]\n", "budget"),
    ('[host]\nbudget = "lots"', "expected a size"),
    ('[host]\nbudget = "3G"\npolicy = "magic"', "policy"),
    ('[host]\nbudget = "3G"\ntax = 1.5', "tax"),
    ('[host]\nbudget = "3G"\ncolour = "red"', "unknown key"),
    ('[host]\nbudget = "3G"\n[[vm]]\nguest = "nosuch"', "not a file and not a built-in guest"),
    ('[host]\nbudget = "3G"\n[[vm]]\nguest = "/nowhere/kernel.elf"', "no such file"),
    ('[host]\nbudget = "3G"\n[[vm]]\nmemory = "64M"', "missing"),
    ('[host]\nbudget = "3G"\n[[vm]]\nguest = "os"\nmemory = "64M"\nmin = "128M"', "larger than the VM's memory"),
    ('[host]\nbudget = "3G"\n[[vm]]\nguest = "os"\nid = "a b"', "letters, digits"),
    ('[host]\nbudget = "3G"\n[[vm]]\nguest = "os"\nid = "a"\n[[vm]]\nguest = "os"\nid = "a"', "more than one"),
    ('[host]\nbudget = "3G"\n[[vm]]\nguest = "os"\nshares = -1', "shares"),
])
def test_bad_host_files_are_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "host.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_host_config(path)
    assert "\n" not in str(caught.value)


def test_sizes_and_a_missing_file() -> None:
    assert size_value("64M", "x") == 64 * MiB and size_value(64, "x") == 64 * MiB
    for bad in (True, -1, "64Q", 1.5):
        with pytest.raises(ConfigError):
            size_value(bad, "x")
    with pytest.raises(ConfigError, match=r"cannot be read|No such file"):
        load_host_config(Path("/nowhere/host.toml"))
    with pytest.raises(ConfigError, match=r"\[host\]"):
        parse_host_config({}, Path("."))


def test_a_guest_that_takes_pages_back_is_counted_and_backed_off_from() -> None:
    watch = BalloonWatch(timeout_s=10)
    watch.requested(1000, actual=0, now=0)
    watch.observe(1000, now=1)  # reached
    watch.observe(500, now=2)  # below its target on its own: deflate on OOM
    assert watch.reclaims == 1 and watch.backing_off(now=20, backoff_s=30)
    assert not watch.backing_off(now=40, backoff_s=30)
    watch.observe(500, now=30)
    assert not watch.unresponsive, "a guest short of memory is not a guest that ignores its balloon"
    watch.requested(200, actual=500, now=31)  # the host asks for a deflate: the balloon shrinking is no reclaim
    watch.observe(300, now=32)
    assert watch.reclaims == 1
    # while backing off, the host hands the VM at least what it holds (its minimum is raised to it)
    held = vm("short", 50 * MiB, held=600 * MiB, minimum=600 * MiB)
    decision = decide([held, vm("other", 100 * MiB)], 900 * MiB, PolicySettings())
    assert decision.allocations["short"] >= 600 * MiB
