"""Waldspurger's idle memory tax: the formula, its equilibrium, sampling, and the ballooning timeline."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from json_check import lab_json
from png_check import assert_real_png

from pyrovisor.errors import ConfigError
from pyrovisor.lab.balloon import (
    DEFAULT_TAX,
    MODEL,
    SAMPLE_PAGES,
    TAX_FROM_EPOCH,
    TAXED_EPOCH,
    Client,
    adjusted_ratio,
    equilibrium,
    figure7_scenario,
    idle_page_cost,
    protected_working_sets,
    revoke_until_stable,
    sample_active_fraction,
    simulate,
    simulate_seeds,
    target_allocations,
)
from pyrovisor.lab.stats import Estimate

# Tolerances of the claims docs/lab/balloon.md makes, each named after the sentence it checks.
REVOCATION_TOLERANCE_STEPS = 2  # "Step-by-step revocation ... reaches the same allocation ... within two steps"
SAMPLER_MEAN_TOLERANCE = 0.005  # "the sampler is unbiased (mean within 0.005 of f over 2000 samples)"
SAMPLER_SPREAD_TOLERANCE = 0.10  # "... with binomial spread sqrt(f(1 - f)/n), within 10 %"
EQUAL_SPLIT_TOLERANCE_MB = 1.0  # "At tau = 0 the two VMs split memory evenly (within 1 MB)"
EQUILIBRIUM_TOLERANCE_MB = 2.0  # "the simulated allocations settle within 2 MB of the equilibrium the formula gives"
RECOVERY_TOLERANCE_MB = 3.0  # "its allocation climbs back to within 3 MB of its 180 MB share"
ESTIMATE_TOLERANCE_MB = 3.0  # "the sampled estimate of the idle VM's 16 MB working set is within 3 MB of it"
FLOOR_SLACK_MB = 3.0  # "at steady state no VM is more than 3 MB below its protected working set"


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
        assert got == pytest.approx(want, abs=REVOCATION_TOLERANCE_STEPS * 0.25)


def test_bounds_are_respected() -> None:
    clients = [Client(1000, 10, minimum=50, maximum=60), Client(10, 300, maximum=400)]
    assert target_allocations(clients, 200, 0.75) == pytest.approx([60, 140])
    assert target_allocations(clients, 1000, 0.75) == [60, 400]  # no pressure: everyone gets its maximum


def test_sampling_estimates_the_active_fraction() -> None:
    rng = np.random.default_rng(11)
    estimates = [sample_active_fraction(400, 100, 100, rng) for _ in range(2000)]
    assert np.mean(estimates) == pytest.approx(0.25, abs=SAMPLER_MEAN_TOLERANCE)
    # binomial spread of one 100-page sample: sqrt(f (1 - f) / n)
    assert np.std(estimates) == pytest.approx(math.sqrt(0.25 * 0.75 / 100), rel=SAMPLER_SPREAD_TOLERANCE)
    assert sample_active_fraction(100, 500, 100, rng) == 1.0  # cannot see beyond the allocation


def test_protected_working_set_is_capped_by_the_share() -> None:
    scenario = figure7_scenario()
    assert protected_working_sets(scenario.vms, [16, 250], 360) == [16, 180]


def test_figure7_shaped_run() -> None:
    # The shape of Figure 7's set-up (its values could not be retrieved), over five seeds.
    scenario = figure7_scenario()
    runs = simulate_seeds(scenario, range(4, 9))
    idle, busy = 0, 1
    share = scenario.memory_mb / 2
    # tax 0 %: equal shares, equal allocations, whatever the activity (pure share-based isolation)
    for vm in (idle, busy):
        assert runs.figure("allocation", TAX_FROM_EPOCH - 1, vm).mean == pytest.approx(share,
                                                                                     abs=EQUAL_SPLIT_TOLERANCE_MB)
    # tax 75 %: idle memory moves to the busy VM, as far as the equilibrium the formula gives (104 / 256 MB)
    want_idle, want_busy = equilibrium(scenario, DEFAULT_TAX)
    assert (round(want_idle), round(want_busy)) == (104, 256)
    taxed_idle = runs.figure("allocation", TAXED_EPOCH, idle)
    assert taxed_idle.mean == pytest.approx(want_idle, abs=EQUILIBRIUM_TOLERANCE_MB)
    assert runs.figure("allocation", TAXED_EPOCH, busy).mean == pytest.approx(want_busy, abs=EQUILIBRIUM_TOLERANCE_MB)
    assert taxed_idle.low >= 16  # never below its working set
    # the formerly idle VM becomes busy and gets its share back
    assert runs.figure("allocation", scenario.epochs - 1, idle).mean == pytest.approx(share, abs=RECOVERY_TOLERANCE_MB)
    for timeline in runs.timelines:
        assert np.all(timeline.allocation.sum(axis=1) <= scenario.memory_mb + 1e-6)
    # the sampled estimate tracks the idle VM's 16 MB working set within sampling noise, on every seed
    sampled = runs.mean_estimate(TAX_FROM_EPOCH, TAXED_EPOCH, idle)
    assert sampled.n == 5
    assert sampled.low == pytest.approx(16, abs=ESTIMATE_TOLERANCE_MB)
    assert sampled.high == pytest.approx(16, abs=ESTIMATE_TOLERANCE_MB)


def test_seeds_give_different_samples_and_an_interval() -> None:
    scenario = figure7_scenario()
    one, other = simulate(scenario), simulate(replace(scenario, seed=5))
    assert not np.array_equal(one.estimate[:, 0], other.estimate[:, 0])
    runs = simulate_seeds(scenario, range(4, 7))
    value = runs.figure("estimate", 30, 0)
    assert isinstance(value, Estimate) and value.n == 3 and value.low < value.mean < value.high


@given(st.floats(0, 0.95), st.floats(300, 512))
@settings(max_examples=15, deadline=None)
def test_allocations_never_fall_below_protected_working_sets_at_steady_state(tax: float, memory: float) -> None:
    scenario = figure7_scenario(tax, memory)
    assume(memory / 2 >= 16)
    timeline = simulate(scenario)
    for epoch in (55, 59):  # settled, before the workload change
        floors = protected_working_sets(scenario.vms, timeline.working_set[epoch], memory)
        assert all(a >= f - FLOOR_SLACK_MB for a, f in zip(timeline.allocation[epoch], floors, strict=True))


def model_args(*options: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    MODEL.add_arguments(parser)
    return parser.parse_args(list(options))


def test_timeline_figures_are_estimates_over_the_seeds() -> None:
    result = MODEL.run(model_args("--seeds", "3"))
    timeline = result.tables[2]
    assert "3 seeds from 4" in timeline.title
    for column in ("vm1 est", "vm1 MB", "vm2 est", "vm2 MB"):
        assert all(isinstance(cell, Estimate) and cell.n == 3 for cell in timeline.column(column))


def test_plot_draws_the_published_background_band_and_no_invented_points(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    result = MODEL.run(model_args("--seeds", "2"))
    assert result.plot is not None
    figure = Figure(figsize=(8, 5), dpi=120, layout="constrained")
    result.plot(figure)
    [axes] = figure.axes
    labels = axes.get_legend_handles_labels()[1]
    assert any("10-20 MB Windows background" in label for label in labels)
    assert not any("Fig. 7" in label or "Figure 7" in label for label in labels)  # its values were not found
    assert len(axes.collections) == 4  # an interval around each VM's allocation and sampled estimate


def test_cli_prints_tables_and_writes_a_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pyrovisor.api.cli import main

    png = tmp_path / "balloon.png"
    assert main(["lab", "balloon", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "Adjusted shares per page" in out and "Steady state" in out and "Memory moving between VMs" in out
    assert "idle VM: 180 MB at tax 0 %, 104 MB at tax 75%" in out and "of 5 seeds" in out
    assert_real_png(png)


def test_json_headline_and_assumptions(capsys: pytest.CaptureFixture[str]) -> None:
    document = lab_json(capsys, "balloon", "--seeds", "3")
    headline = document["headline"]
    assert headline["idle VM MB (equilibrium)"] == pytest.approx(104.0, abs=0.1)
    for name in ("idle VM MB (simulated)", "busy VM MB (simulated)", "idle VM sampled WS MB"):
        figure = headline[name]
        assert figure["n"] == 3 and figure["low"] <= figure["mean"] <= figure["high"]
    assert headline["idle VM MB (simulated)"]["mean"] == pytest.approx(104.0, abs=EQUILIBRIUM_TOLERANCE_MB)
    assert headline["busy VM MB (simulated)"]["mean"] == pytest.approx(256.0, abs=EQUILIBRIUM_TOLERANCE_MB)
    assumptions = {a["name"]: a for a in document["assumptions"]}
    assert assumptions["tax rate"]["value"] == 0.75 and "Waldspurger" in assumptions["tax rate"]["basis"]
    assert assumptions["pages sampled per period"]["value"] == 100
    assert assumptions["host memory MB"] == {"name": "host memory MB", "value": 360.0,
                                             "basis": "assumed (Figure 7's could not be retrieved)"}
    assert assumptions["balloon MB per period"]["basis"] == "assumed"


def test_sweeps_move_the_headline(capsys: pytest.CaptureFixture[str]) -> None:
    from pyrovisor.api.cli import main

    def sweep(spec: str) -> list[dict[str, object]]:
        capsys.readouterr()
        assert main(["lab", "balloon", "--json", "--seeds", "2", "--sweep", spec]) == 0
        return [point["headline"] for point in json.loads(capsys.readouterr().out)["sweep"]["points"]]

    # a higher tax takes more of the idle VM's memory: 180, 156.6, 125.3, 104 MB at 0, 25, 50, 75 %
    taxed = sweep("tax=0:0.75:4")
    assert [h["idle VM MB (equilibrium)"] for h in taxed] == pytest.approx([180, 156.6, 125.3, 104], abs=0.1)
    simulated = [h["idle VM MB (simulated)"]["mean"] for h in taxed]  # type: ignore[index]
    assert simulated == sorted(simulated, reverse=True)
    # a larger idle working set: it keeps more, and the sampler sees more
    wider = sweep("idle-ws-mb=8:32:3")
    kept = [h["idle VM MB (equilibrium)"] for h in wider]
    seen = [h["idle VM sampled WS MB"]["mean"] for h in wider]  # type: ignore[index]
    assert kept == sorted(kept) and seen == sorted(seen) and seen[0] < seen[-1]
