"""Pre-copy migration: the closed form against its own recurrence, the three stop rules, the WWS simulator, the CLI."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from json_check import lab_json
from png_check import assert_real_png

from pyrovisor.errors import ConfigError
from pyrovisor.lab.precopy import (
    MB,
    MODEL,
    PYROVISOR_MAX_ROUNDS,
    QEMU_DOWNTIME_LIMIT_S,
    XEN_FEW_PAGES,
    XEN_MAX_FACTOR,
    XEN_MAX_ITERS,
    MiB,
    StopReason,
    precopy_rounds,
    predict,
    pyrovisor_rule,
    qemu_rule,
    simulate,
    xen_rule,
)
from pyrovisor.lab.stats import Estimate

GiB = 1 << 30
PAGE = 4096

# Tolerances of the claims docs/lab/precopy.md makes, each named after the sentence it checks.
CLOSED_FORM_REL = 1e-9  # "The closed form is checked against the recurrence": equal up to float rounding
SIM_BYTES_REL = 0.03  # "the simulator reproduces the model; the tests check rounds equal and bytes within 3 %"
SIM_DOWNTIME_REL = 0.15  # "... and downtime within 15 %"


def iterate(memory: float, bandwidth: float, dirty: float, limit: float, max_rounds: int) -> tuple[int, list[float]]:
    """The recurrence itself: send V_i, dirty D * V_i / R meanwhile (at most all of memory), stop when it fits."""
    volumes = [memory]
    while True:
        left = min(memory, dirty * volumes[-1] / bandwidth)
        if left <= bandwidth * limit or len(volumes) >= max_rounds:
            return len(volumes), [*volumes, left]
        volumes.append(left)


def iterate_xen(pages: int, ratio: float, max_iters: int = 29, max_factor: float = 3.0,
                few: int = 50) -> tuple[int, list[float]]:
    """Xen's save loop transcribed (xc_domain_save.c): iter counts passes from 1; after each live pass, the last
    iteration starts if iter >= max_iters, or sent_this_iter < 50, or total_sent > p2m_size * max_factor."""
    iteration, total_sent, to_send, sent = 0, 0.0, float(pages), []
    while True:
        iteration += 1
        sent_this_iter = to_send
        total_sent += sent_this_iter
        sent.append(sent_this_iter)
        to_send = pages * ratio**iteration if ratio < 1 else float(pages)  # dirtied while this pass ran
        if iteration >= max_iters or sent_this_iter < few or total_sent > pages * max_factor:
            return iteration, [*sent, to_send]


memories = st.integers(1, 64 * GiB)
bandwidths = st.floats(1e6, 1e10)
limits = st.one_of(st.just(0.0), st.floats(1e-6, 2.0))  # no subnormal products
round_limits = st.integers(1, 40)


@settings(max_examples=300, deadline=None)
@given(memories, bandwidths, st.one_of(st.just(0.0), st.floats(1e-6, 3.0)), limits, round_limits)
def test_closed_form_equals_the_recurrence(memory: int, bandwidth: float, ratio: float, limit: float,
                                          max_rounds: int) -> None:
    p = predict(memory, bandwidth, ratio * bandwidth, limit, max_rounds, page_size=1)
    rounds, volumes = iterate(memory, bandwidth, ratio * bandwidth, limit, max_rounds)
    assert p.rounds == rounds == precopy_rounds(memory, ratio, bandwidth * limit, max_rounds)
    assert p.round_bytes == pytest.approx(volumes, rel=CLOSED_FORM_REL)
    assert p.bytes_sent == pytest.approx(sum(volumes), rel=CLOSED_FORM_REL, abs=1)
    assert p.total_time_s == pytest.approx(sum(volumes) / bandwidth, rel=CLOSED_FORM_REL)
    assert p.downtime_s == pytest.approx(volumes[-1] / bandwidth, rel=CLOSED_FORM_REL, abs=1e-12)
    assert p.converged == (volumes[-1] <= bandwidth * limit)


@settings(max_examples=200, deadline=None)
@given(memories, bandwidths, st.floats(1.0, 5.0), limits, round_limits)
def test_no_convergence_when_dirtying_at_least_as_fast_as_sending(memory: int, bandwidth: float, ratio: float,
                                                                   limit: float, max_rounds: int) -> None:
    p = predict(memory, bandwidth, ratio * bandwidth, limit, max_rounds, page_size=1)
    if memory > bandwidth * limit:
        assert not p.converged and p.rounds == max_rounds and p.stop is StopReason.ROUND_CAP
        assert p.downtime_s == pytest.approx(p.round_bytes[0] / bandwidth)  # everything is still dirty
    else:
        assert p.converged and p.rounds == 1


@settings(max_examples=200, deadline=None)
@given(memories, bandwidths, st.floats(0.0, 0.99), st.floats(0.001, 2.0))
def test_below_the_bandwidth_pre_copy_converges_within_the_limit(memory: int, bandwidth: float, ratio: float,
                                                                 limit: float) -> None:
    p = predict(memory, bandwidth, ratio * bandwidth, limit, max_rounds=10_000, page_size=1)
    assert p.converged and p.downtime_s <= limit * (1 + 1e-9)
    if ratio > 0 and memory > bandwidth * limit:  # Liu et al.: n = ceil(log_lambda(V_thd / V_mem))
        assert p.rounds == max(1, math.ceil(math.log(bandwidth * limit / memory, ratio) - 1e-9))
        assert p.bytes_sent == pytest.approx(memory * (1 - ratio ** (p.rounds + 1)) / (1 - ratio), rel=1e-9, abs=1)


def test_a_worked_example() -> None:
    # 1 GiB at 125 MB/s while dirtying 50 MB/s: lambda = 0.4, V_thd = 37.5 MB,
    # V_i = 1073.7, 429.5, 171.8, 68.7, 27.5 MB -> four live rounds, 220 ms of downtime.
    p = predict(GiB, 125 * MB, 50 * MB, 0.3)
    assert (p.rounds, p.converged, p.stop) == (4, True, StopReason.FITS_LIMIT)
    assert p.downtime_s == pytest.approx(GiB * 0.4**4 / 125e6)
    assert p.total_time_s == pytest.approx(GiB * (1 - 0.4**5) / 0.6 / 125e6)
    idle = predict(GiB, 125 * MB, 0.0)
    assert (idle.rounds, idle.downtime_s, idle.bytes_sent) == (1, 0.0, GiB)
    assert predict(GiB, 125 * MB, 10 * MB, resume_time_s=0.02).downtime_s == pytest.approx(
        GiB * 0.08**2 / 125e6 + 0.02)


def test_more_dirtying_never_makes_migration_faster() -> None:
    totals = [predict(GiB, 125 * MB, rate * MB).total_time_s for rate in range(0, 124, 3)]
    assert totals == sorted(totals)
    assert precopy_rounds(100.0, 0.5, 10.0, 30) == 4  # 100 * 0.5^4 = 6.25 <= 10 < 12.5


# --- The stop rules on hand-computed cases ----------------------------------------------------------------

def test_the_defaults_are_the_sources_and_pyrovisors_own() -> None:
    from pyrovisor.migration.policy import PrecopyPolicy

    assert (XEN_MAX_ITERS, XEN_MAX_FACTOR, XEN_FEW_PAGES) == (29, 3.0, 50)  # xc_domain_save.c
    assert QEMU_DOWNTIME_LIMIT_S == 0.3  # QEMU: DEFAULT_MIGRATE_SET_DOWNTIME 300 (ms)
    # pyrovisor's cap is its own: the model's default is whatever the VMM's default policy uses
    assert PrecopyPolicy().max_rounds == PYROVISOR_MAX_ROUNDS
    assert PrecopyPolicy().downtime_limit_s == QEMU_DOWNTIME_LIMIT_S


def test_pyrovisor_stops_at_its_cap_where_qemu_iterates_on() -> None:
    # lambda = 0.95, V_thd = 37.5 MB: n = ceil(ln(37.5e6 / 2^30) / ln 0.95) = ceil(65.4) = 66 rounds.
    rate = 0.95 * 125 * MB
    capped = predict(GiB, 125 * MB, rate, rule=pyrovisor_rule())
    assert (capped.rounds, capped.converged, capped.stop) == (30, False, StopReason.ROUND_CAP)
    assert capped.downtime_s == pytest.approx(GiB * 0.95**30 / 125e6)  # forced: 1.84 s
    qemu = predict(GiB, 125 * MB, rate, rule=qemu_rule(cutoff_rounds=100))
    assert (qemu.rounds, qemu.converged, qemu.stop) == (66, True, StopReason.FITS_LIMIT)
    assert qemu.downtime_s == pytest.approx(GiB * 0.95**66 / 125e6) and qemu.downtime_s <= 0.3
    # with the default cutoff the model gives up where pyrovisor does, and says it is its own cutoff
    cut = predict(GiB, 125 * MB, rate, rule=qemu_rule())
    assert (cut.rounds, cut.converged, cut.stop) == (30, False, StopReason.MODEL_CUTOFF)
    assert "QEMU iterates on" in qemu_rule().describe(cut.stop)


def test_qemu_downtime_limit_option() -> None:
    # lambda = 0.4 with a 30 ms limit: V_thd = 3.75 MB, n = ceil(ln(3.75e6 / 2^30) / ln 0.4) = ceil(6.17) = 7
    p = predict(GiB, 125 * MB, 50 * MB, rule=qemu_rule(downtime_limit_s=0.03))
    assert (p.rounds, p.stop) == (7, StopReason.FITS_LIMIT) and p.downtime_s <= 0.03
    never = predict(GiB, 125 * MB, 200 * MB, rule=qemu_rule(cutoff_rounds=500))  # lambda = 1.6
    assert (never.rounds, never.converged, never.stop) == (500, False, StopReason.MODEL_CUTOFF)


def test_xen_stops_after_a_round_of_fewer_than_50_pages() -> None:
    # lambda = 0.4 over 2^18 pages: V_9 = 2^18 * 0.4^9 = 68.7 pages, V_10 = 27.5 pages < 50: the last live
    # round is round 10, so 11 live rounds, then V_11 = 11.0 pages (0.36 ms) in the pause. No 3x: 1/(1-0.4) < 3.
    p = predict(GiB, 125 * MB, 50 * MB, rule=xen_rule())
    assert (p.rounds, p.converged, p.stop) == (11, True, StopReason.FEW_PAGES)
    assert p.round_bytes[9] / PAGE >= 50 > p.round_bytes[10] / PAGE
    assert p.downtime_s == pytest.approx(GiB * 0.4**11 / 125e6)
    assert p.bytes_sent == pytest.approx(GiB * (1 - 0.4**12) / 0.6, abs=1)


def test_xen_stops_once_more_than_three_times_memory_was_sent() -> None:
    # lambda = 0.8: memory sent after rounds 0..4 is 1, 1.8, 2.44, 2.952, 3.3616 times memory: > 3 after the
    # fifth live round, then V_5 = 0.8^5 = 0.328 of memory in the pause (2.81 s), 3.69 times memory in all.
    p = predict(GiB, 125 * MB, 100 * MB, rule=xen_rule())
    assert (p.rounds, p.converged, p.stop) == (5, False, StopReason.SENT_FACTOR)
    assert sum(p.round_bytes[:4]) <= 3 * GiB < sum(p.round_bytes[:5])
    assert p.downtime_s == pytest.approx(GiB * 0.8**5 / 125e6)
    # D >= R: every round sends all of memory, 4 x memory > 3 x memory after the fourth; 5 x memory in all
    fast = predict(GiB, 125 * MB, 200 * MB, rule=xen_rule())
    assert (fast.rounds, fast.stop, fast.bytes_sent) == (4, StopReason.SENT_FACTOR, 5 * GiB)
    assert fast.downtime_s == pytest.approx(GiB / 125e6)


def test_xen_stops_after_29_iterations() -> None:
    # lambda = 0.65 never sends 3x (the series sums to 1/0.35 = 2.86 times memory), and over 64 GiB (2^24 pages)
    # V_28 = 2^24 * 0.65^28 = 96.9 pages is still >= 50: the 29-iteration cap stops it, V_29 = 63 pages left.
    p = predict(64 * GiB, 125 * MB, 0.65 * 125 * MB, rule=xen_rule())
    assert (p.rounds, p.converged, p.stop) == (29, False, StopReason.ROUND_CAP)
    assert p.round_bytes[28] / PAGE == pytest.approx(2**24 * 0.65**28)
    assert p.round_bytes[29] / PAGE == pytest.approx(63.0, abs=0.1)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2**26), st.one_of(st.just(0.0), st.floats(1e-3, 3.0)), st.integers(1, 40),
       st.floats(0.5, 5.0), st.integers(0, 200))
def test_xen_rule_equals_its_loop_transcribed(pages: int, ratio: float, max_iters: int, factor: float,
                                               few: int) -> None:
    p = predict(pages * PAGE, 1e9, ratio * 1e9, page_size=PAGE, rule=xen_rule(max_iters, factor, few))
    rounds, sent = iterate_xen(pages, ratio, max_iters, factor, few)
    assert p.rounds == rounds
    assert [v / PAGE for v in p.round_bytes] == pytest.approx(sent, rel=CLOSED_FORM_REL)


# --- The simulator ---------------------------------------------------------------------------------------

def test_simulator_without_rewrites_follows_the_model() -> None:
    # Writes spread over all of memory and few per round: nearly every write dirties a new page.
    for rate in (5, 10, 20):
        p = predict(4 * GiB, 125 * MB, rate * MB, 0.3)
        for seed in range(5):
            s = simulate(4 * GiB, 125 * MB, rate * MB, wws_bytes=4 * GiB, seed=seed)
            assert s.rounds == p.rounds
            assert s.bytes_sent == pytest.approx(p.bytes_sent, rel=SIM_BYTES_REL)
            assert s.downtime_s == pytest.approx(p.downtime_s, rel=SIM_DOWNTIME_REL)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 128), st.floats(0, 100), st.integers(0, 2**16))
def test_simulated_dirty_set_stays_within_the_working_set(wws_mib: int, rate: float, seed: int) -> None:
    memory = 128 * MiB
    s = simulate(memory, 30 * MB, rate * MB, wws_mib * MiB, max_rounds=10, seed=seed)
    assert all(pages <= s.wws_pages for pages in s.round_pages[1:])
    assert s.round_pages[0] == memory // 4096
    assert s.bytes_sent == sum(s.round_pages) * 4096
    assert s.converged == (s.round_pages[-1] * 4096 / (30 * MB) <= 0.3)
    assert s.rounds == len(s.round_pages) - 1 <= 10


def test_a_small_working_set_converges_where_the_model_cannot() -> None:
    # 200 MB/s of writes over a 125 MB/s link: the model never converges, but the writes keep hitting
    # the same 16 MiB, which fits in 0.3 s (16 MiB / 125 MB/s = 134 ms).
    p = predict(GiB, 125 * MB, 200 * MB, 0.3)
    s = simulate(GiB, 125 * MB, 200 * MB, wws_bytes=16 * MiB)
    assert not p.converged and s.converged
    assert s.downtime_s <= 0.3 and s.round_pages[-1] <= 16 * MiB // 4096
    assert s.rounds < p.rounds


LINK = 1000 * PAGE  # bytes/s: one page per millisecond


@pytest.mark.parametrize("seed", range(3))
def test_simulated_stop_points_by_hand(seed: int) -> None:
    # 1024 pages; 512 writes/s into 10 hot pages: round 0 (1.024 s) dirties all 10 (a miss has odds ~1e-22).
    few = simulate(1024 * PAGE, LINK, 512 * PAGE, 10 * PAGE, seed=seed, rule=xen_rule())
    assert (few.rounds, few.stop, few.round_pages[:2]) == (2, StopReason.FEW_PAGES, (1024, 10))  # round 1: 10 < 50
    fits = simulate(1024 * PAGE, LINK, 512 * PAGE, 10 * PAGE, seed=seed, rule=pyrovisor_rule(downtime_limit_s=0.02))
    assert (fits.rounds, fits.stop, fits.round_pages) == (1, StopReason.FITS_LIMIT, (1024, 10))  # 10 ms <= 20 ms
    # 64 pages all rewritten every round (100 writes per page sent): 64, 128, 192, 256 pages sent > 3 x 64
    churn = (64 * PAGE, LINK, 100 * LINK, 64 * PAGE)
    factor = simulate(*churn, seed=seed, rule=xen_rule())
    assert (factor.rounds, factor.stop, factor.round_pages) == (4, StopReason.SENT_FACTOR, (64,) * 5)
    capped = simulate(*churn, seed=seed, rule=pyrovisor_rule(downtime_limit_s=0.01, max_rounds=7))
    assert (capped.rounds, capped.converged, capped.stop) == (7, False, StopReason.ROUND_CAP)
    cut = simulate(*churn, seed=seed, rule=qemu_rule(downtime_limit_s=0.01, cutoff_rounds=9))
    assert (cut.rounds, cut.converged, cut.stop) == (9, False, StopReason.MODEL_CUTOFF)
    # 100 hot pages of 10000 rewritten every round: never < 50 pages, 10000 + 28 x 100 < 3 x 10000 -> the cap
    iters = simulate(10_000 * PAGE, LINK, 50 * LINK, 100 * PAGE, seed=seed, rule=xen_rule())
    assert (iters.rounds, iters.stop, iters.round_pages[1:]) == (29, StopReason.ROUND_CAP, (100,) * 29)


def test_invalid_inputs() -> None:
    with pytest.raises(ConfigError):
        predict(GiB, 0.0, 1.0)
    with pytest.raises(ConfigError):
        predict(GiB, 1.0, -1.0)
    with pytest.raises(ConfigError):
        simulate(GiB, 1.0, 1.0, wws_bytes=2 * GiB)
    with pytest.raises(ConfigError):
        xen_rule(max_iters=0)
    with pytest.raises(ConfigError):
        pyrovisor_rule(downtime_limit_s=-1.0)


# --- The lab command -------------------------------------------------------------------------------------

def model_args(*options: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    MODEL.add_arguments(parser)
    return parser.parse_args(list(options))


def test_simulated_figures_are_estimates_over_the_seeds() -> None:
    result = MODEL.run(model_args("--seeds", "4", "--dirty-rates", "50,100"))
    simulated = result.tables[1]
    assert "4 seeds" in simulated.title
    for cell in simulated.column("downtime ms") + simulated.column("total s") + simulated.column("MiB sent"):
        assert isinstance(cell, Estimate) and cell.n == 4 and cell.low <= cell.mean <= cell.high
    assert simulated.column("converged") == ["4/4", "4/4"]


def test_plot_has_no_negative_decades(tmp_path: Path) -> None:
    # The symlog axes used to show decades below zero; every axis is now logarithmic over positive values.
    from matplotlib.figure import Figure

    result = MODEL.run(model_args("--policy", "all", "--seeds", "2", "--memory-mib", "256", "--wws-mib", "64",
                                    "--dirty-rates", "0,50,200"))
    assert result.plot is not None
    figure = Figure(figsize=(8, 5), dpi=120, layout="constrained")
    result.plot(figure)
    assert len(figure.axes) == 3
    for axes in figure.axes:
        assert axes.get_yscale() == "log"
        assert axes.get_ylim()[0] > 0
        drawn = [line for line in axes.get_lines() if line.get_transform() is axes.transData]
        assert drawn and all(float(y) > 0 for line in drawn for y in line.get_ydata())  # type: ignore[union-attr]
    labels = [text.get_text() for legend in figure.legends for text in legend.get_texts()]
    assert any("Clark et al. 2005" in label and "210 ms" in label for label in labels)
    assert any("Clark et al. 2005" in label and "60 ms" in label for label in labels)


def test_cli_prints_tables_and_writes_a_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pyrovisor.api.cli import main

    png = tmp_path / "precopy.png"
    assert main(["lab", "precopy", "--seeds", "2", "--dirty-rates", "50,200", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "lambda" in out and "Simulation with a 256 MiB writable working set, 2 seeds" in out
    row = next(line for line in out.splitlines() if line.startswith("│ pyrovisor │         50 │"))
    cells = [cell.strip() for cell in row.strip("│").split("│")]
    assert cells[2:9] == ["0.4", "4", "14.17", "219.9", "1689", "yes", "fits 300 ms"]
    assert "does not converge" in out and "cap: 30 rounds" in out
    assert_real_png(png)


def test_cli_policy_all_compares_the_three_rules(capsys: pytest.CaptureFixture[str]) -> None:
    from pyrovisor.api.cli import main

    assert main(["lab", "precopy", "--policy", "all", "--seeds", "2", "--dirty-rates", "200", "--memory-mib", "256",
                 "--wws-mib", "64"]) == 0
    out = capsys.readouterr().out
    assert "cap: 30 rounds" in out and "> 3x memory sent" in out and "model cutoff at 30 (QEMU iterates on)" in out
    assert "QEMU never completes" in out


def test_json_headline_and_assumptions(capsys: pytest.CaptureFixture[str]) -> None:
    document = lab_json(capsys, "precopy", "--seeds", "2")
    headline = document["headline"]
    # at the headline rate of 100 MB/s: lambda = 0.8, 16 rounds, V_16 = 2^30 * 0.8^16 bytes in the pause
    assert headline["downtime ms (model)"] == pytest.approx(GiB * 0.8**16 / 125e6 * 1e3, abs=1e-3)
    assert headline["total s (model)"] == pytest.approx(GiB * (1 - 0.8**17) / 0.2 / 125e6, abs=1e-3)
    for name in ("downtime ms (simulated)", "total s (simulated)"):
        assert headline[name]["n"] == 2 and headline[name]["low"] <= headline[name]["mean"] <= headline[name]["high"]
    assumptions = {a["name"]: a for a in document["assumptions"]}
    assert assumptions["pyrovisor round cap"]["value"] == 30
    assert "own choice" in assumptions["pyrovisor round cap"]["basis"]
    assert assumptions["downtime limit s"]["value"] == 0.3 and "QEMU" in assumptions["downtime limit s"]["basis"]
    assert assumptions["bandwidth MB/s"] == {"name": "bandwidth MB/s", "value": 125.0,
                                             "basis": "assumed (one gigabit per second)"}
    every = {a["name"]: a for a in lab_json(capsys, "precopy", "--policy", "all", "--seeds", "1",
                                            "--dirty-rates", "100")["assumptions"]}
    assert every["Xen iteration cap"]["value"] == 29 and every["Xen sent-memory factor"]["value"] == 3.0
    assert "no round cap" in every["QEMU model cutoff rounds"]["basis"]


def test_sweeps_move_the_headline(capsys: pytest.CaptureFixture[str]) -> None:
    from pyrovisor.api.cli import main

    def sweep(*options: str) -> list[dict[str, object]]:
        capsys.readouterr()
        assert main(["lab", "precopy", "--json", "--seeds", "2", "--dirty-rates", "100", *options]) == 0
        return [point["headline"] for point in json.loads(capsys.readouterr().out)["sweep"]["points"]]

    # a faster link: lambda falls, so the migration takes less time
    faster = [h["total s (model)"] for h in sweep("--sweep", "bandwidth=110:250:4")]
    assert faster == sorted(faster, reverse=True) and faster[0] > faster[-1]
    # more dirtying: more time, in the model and (through its working set) in the simulation
    dirtier = sweep("--sweep", "dirty-rate=20:100:3")
    assert [h["total s (model)"] for h in dirtier] == sorted(h["total s (model)"] for h in dirtier)
    means = [h["total s (simulated)"]["mean"] for h in dirtier]  # type: ignore[index]
    assert means == sorted(means)
    # a bigger writable working set: a longer simulated migration
    wider = [h["total s (simulated)"]["mean"] for h in sweep("--sweep", "wws-mib=64:512:3")]  # type: ignore[index]
    assert wider == sorted(wider)
