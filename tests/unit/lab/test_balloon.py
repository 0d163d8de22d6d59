"""Waldspurger's idle memory tax: the formula, its equilibrium, sampling, and the ballooning timeline."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from png_check import assert_real_png

from pyrovisor.errors import ConfigError
from pyrovisor.lab.balloon import (
    DEFAULT_TAX,
    SAMPLE_PAGES,
    Client,
    adjusted_ratio,
    figure7_scenario,
    idle_page_cost,
    protected_working_sets,
    revoke_until_stable,
    sample_active_fraction,
    simulate,
    target_allocations,
)


def test_paper_defaults_and_formula() -> None:
    assert DEFAULT_TAX == 0.75 and SAMPLE_PAGES == 100
    assert idle_page_cost(0.75) == 4.0  # an idle page costs four active ones at the default rate
    assert idle_page_cost(0.0) == 1.0
    # rho = S / (P (f + k (1 - f))): 1000 shares, 100 pages, half active, tau = 75 %: 1000 / (100 * 2.5).
    assert adjusted_ratio(1000, 100, 0.5, 0.75) == pytest.approx(4.0)
    assert adjusted_ratio(1000, 100, 1.0, 0.9) == pytest.approx(10.0)  # fully active: the tax does not apply
    with pytest.raises(ConfigError):
        idle_page_cost(1.0)


CLIENTS = st.lists(
    st.tuples(st.floats(1, 1000), st.floats(0, 500)), min_size=2, max_size=5,
).map(lambda specs: [Client(shares, active) for shares, active in specs])


@given(CLIENTS, st.floats(10, 2000))
def test_no_tax_is_pure_proportional_share(clients: list[Client], memory: float) -> None:
    allocations = target_allocations(clients, memory, 0.0)
    total_shares = sum(c.shares for c in clients)
    for client, allocation in zip(clients, allocations, strict=True):
        assert allocation == pytest.approx(memory * client.shares / total_shares, rel=1e-6)


@given(CLIENTS, st.floats(10, 2000), st.floats(0, 0.99))
def test_equilibrium_uses_memory_and_equalises_rho(clients: list[Client], memory: float, tax: float) -> None:
    allocations = target_allocations(clients, memory, tax)
    assert sum(allocations) == pytest.approx(memory, rel=1e-6)
    ratios = [adjusted_ratio(c.shares, p, min(1.0, c.active / p), tax) for c, p in zip(clients, allocations, strict=True)]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-5)


@given(CLIENTS, st.floats(10, 2000), st.floats(0, 0.99))
def test_the_tax_takes_at_most_tau_of_a_clients_idle_memory(clients: list[Client], memory: float,
                                                             tax: float) -> None:
    """With P_i the pure share allocation and W_i the active pages, each client keeps
    at least (1 - tau) of its idle pages P_i - W_i (section 5.2's reading of tau)."""
    allocations = target_allocations(clients, memory, tax)
    total_shares = sum(c.shares for c in clients)
    for client, allocation in zip(clients, allocations, strict=True):
        share = memory * client.shares / total_shares
        if share > client.active:
            assert allocation - client.active >= (1 - tax) * (share - client.active) - 1e-6 * memory


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 10), st.integers(0, 60)), min_size=2, max_size=3), st.sampled_from([0.0, 0.5, 0.75]))
def test_step_by_step_revocation_reaches_the_same_allocation(specs: list[tuple[int, int]], tax: float) -> None:
    clients = [Client(float(s), float(a)) for s, a in specs]
    memory = 120.0
    start = [memory / len(clients)] * len(clients)
    stepped = revoke_until_stable(clients, start, tax, chunk=0.25)
    target = target_allocations(clients, memory, tax)
    assert sum(stepped) == pytest.approx(memory)
    for got, want in zip(stepped, target, strict=True):
        assert got == pytest.approx(want, abs=2 * 0.25)  # within two chunks


def test_bounds_are_respected() -> None:
    clients = [Client(1000, 10, minimum=50, maximum=60), Client(10, 300, maximum=400)]
    assert target_allocations(clients, 200, 0.75) == pytest.approx([60, 140])
    assert target_allocations(clients, 1000, 0.75) == [60, 400]  # no pressure: everyone gets its maximum


def test_sampling_estimates_the_active_fraction() -> None:
    rng = np.random.default_rng(11)
    estimates = [sample_active_fraction(400, 100, 100, rng) for _ in range(2000)]
    assert np.mean(estimates) == pytest.approx(0.25, abs=0.005)
    # binomial spread of one 100-page sample: sqrt(f (1 - f) / n)
    assert np.std(estimates) == pytest.approx(math.sqrt(0.25 * 0.75 / 100), rel=0.1)
    assert sample_active_fraction(100, 500, 100, rng) == 1.0  # cannot see beyond the allocation


def test_protected_working_set_is_capped_by_the_share() -> None:
    scenario = figure7_scenario()
    assert protected_working_sets(scenario.vms, [16, 250], 360) == [16, 180]


def test_figure7_shaped_run() -> None:
    scenario = figure7_scenario()
    timeline = simulate(scenario)
    idle, busy = 0, 1
    # tax 0 %: equal shares, equal allocations, whatever the activity (pure share-based isolation)
    assert timeline.allocation[19, idle] == pytest.approx(180, abs=1)
    assert timeline.allocation[19, busy] == pytest.approx(180, abs=1)
    # tax 75 %: idle memory moves to the busy VM, which reaches its configured size
    assert timeline.allocation[59, busy] == pytest.approx(256, abs=1)
    assert timeline.allocation[59, idle] == pytest.approx(104, abs=2)
    assert timeline.allocation[59, idle] >= 16  # never below its working set
    # the formerly idle VM becomes busy and gets its share back
    assert timeline.allocation[-1, idle] == pytest.approx(180, abs=3)
    assert np.all(timeline.allocation.sum(axis=1) <= scenario.memory_mb + 1e-6)
    # the sampled estimate tracks the idle VM's 16 MB working set within sampling noise
    assert np.mean(timeline.estimate[20:59, idle]) == pytest.approx(16, abs=3)


@given(st.floats(0, 0.95), st.floats(300, 512))
@settings(max_examples=15, deadline=None)
def test_allocations_never_fall_below_protected_working_sets_at_steady_state(tax: float, memory: float) -> None:
    scenario = figure7_scenario(tax, memory)
    assume(memory / 2 >= 16)
    timeline = simulate(scenario)
    for epoch in (55, 59):  # settled, before the workload change
        floors = protected_working_sets(scenario.vms, timeline.working_set[epoch], memory)
        assert all(a >= f - 3 for a, f in zip(timeline.allocation[epoch], floors, strict=True))


def test_cli_prints_tables_and_writes_a_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pyrovisor.api.cli import main

    png = tmp_path / "balloon.png"
    assert main(["lab", "balloon", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "Adjusted shares per page" in out and "Steady state" in out and "Memory moving between VMs" in out
    assert "idle VM: 180 MB at tax 0 %, 104 MB at tax 75%" in out
    assert_real_png(png)
