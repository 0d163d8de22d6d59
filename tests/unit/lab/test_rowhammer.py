"""The Rowhammer bank model: published thresholds and density, single- and double-sided hammering, refresh
windows, ECC outcomes under both codes, seeds, the plot, JSON and sweeps."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from json_check import lab_json
from png_check import assert_real_png

from pyrovisor.api.cli import main
from pyrovisor.lab import ecc
from pyrovisor.lab.bitflips import BufferMemory, EccMemory, MachineCheck
from pyrovisor.lab.rowhammer import (
    DDR3_ACTIVATIONS_PER_WINDOW,
    DEFAULT_ROW_CYCLE_NS,
    PROFILES,
    BankSlice,
    DramBank,
    default_hammer_counts,
    first_flip_per_aggressor,
)

# docs/lab/rowhammer.md: "the share of cells that flip at the cap with every data cell charged is within 8 % of
# Kim et al.'s 1 in 1.7K" (a binomial count of about 2,470 cells: 4 standard deviations).
KIM2014_DENSITY_TOLERANCE = 0.08
# docs/lab/rowhammer.md: "the simulated flip rate matches p_flip(D) within 4 binomial standard deviations".
FLIP_RATE_SIGMAS = 4
# docs/lab/rowhammer.md: "flips at the cap grow with the refresh window as log10(ACT_max / HC_first), within 0.1
# of the 64 ms figure".
WINDOW_SWEEP_TOLERANCE = 0.1


def test_published_thresholds() -> None:
    assert PROFILES["ddr3-park2014"].first_flip_activations == 98_000
    assert PROFILES["lpddr4-kim2020"].first_flip_activations == 2 * 4_800
    # Park et al.: 98K is 7.54 % of the 1,300K activations the specification permits per window.
    share = PROFILES["ddr3-park2014"].first_flip_activations / DDR3_ACTIVATIONS_PER_WINDOW
    assert round(share * 100, 2) == 7.54
    # The default tRC is the one Park's 1,300K per 64 ms imply.
    assert BankSlice().max_activations_per_window == DDR3_ACTIVATIONS_PER_WINDOW
    assert round(DEFAULT_ROW_CYCLE_NS, 2) == 49.23


def test_kim2014_profile_carries_the_abstract_figures() -> None:
    kim = PROFILES["ddr3-kim2014"]
    assert kim.first_flip_activations == 139_000  # "as few as 139K accesses to induce an error"
    assert kim.susceptible_fraction == pytest.approx(1 / 1_700)  # "up to one in every 1.7K cells"
    assert kim.refresh_window_ms == 64.0 and not kim.double_sided
    # Its thresholds end at the DDR3 window's cap, so every vulnerable cell can flip within one window.
    assert 139_000 * 10 ** kim.default_threshold_decades == pytest.approx(1_300_000)


def _kim2014_bank(**changes: object) -> DramBank:
    kim = PROFILES["ddr3-kim2014"]
    fields: dict[str, object] = {"victim_rows": 64, "words_per_row": 1024, "first_flip_activations": 139_000,
                                 "vulnerable_fraction": kim.susceptible_fraction,
                                 "threshold_decades": kim.default_threshold_decades, "seed": 11, **changes}
    return DramBank(BankSlice(**fields), data="ones")  # type: ignore[arg-type]


def test_kim2014_first_flip_and_density() -> None:
    bank = _kim2014_bank(true_cell_fraction=1.0)  # every data cell holds its charged value
    assert bank.hammer(138_999, double_sided=False).flipped_bits == 0
    assert bank.hammer(139_000, double_sided=False).flipped_bits >= 1
    at_cap = bank.hammer(DDR3_ACTIVATIONS_PER_WINDOW, double_sided=False)
    data_flips = len(at_cap.data_flips())
    data_cells = 64 * 1024 * 64
    assert data_flips / data_cells == pytest.approx(1 / 1_700, rel=KIM2014_DENSITY_TOLERANCE)


@pytest.fixture(scope="module")
def bank() -> DramBank:
    return DramBank(BankSlice(victim_rows=16, words_per_row=256, first_flip_activations=9_600,
                              vulnerable_fraction=0.01, seed=7), codes=(ecc.HAMMING, ecc.HSIAO))


def test_nothing_flips_below_the_first_flip_threshold_and_something_flips_at_it(bank: DramBank) -> None:
    below = bank.hammer(4_799)
    assert below.flipped_bits == 0 and below.corrected == below.detected == below.silent == 0
    at = bank.hammer(4_800)
    assert at.disturbance == 9_600
    assert at.flipped_bits >= 1


def test_double_sided_hammering_needs_half_the_activations_per_row(bank: DramBank) -> None:
    # Both neighbours disturb the victim: 4,800 on each is the 9,600 one neighbour needs alone.
    assert bank.hammer(4_800, double_sided=False).flipped_bits == 0
    assert bank.hammer(9_600, double_sided=False).flipped_bits >= 1
    for count in (20_000, 100_000):
        single, double = bank.hammer(2 * count, double_sided=False), bank.hammer(count, double_sided=True)
        assert single.disturbance == double.disturbance
        assert single.data_flips() == double.data_flips()
    assert first_flip_per_aggressor(9_600, True) == 4_800 and first_flip_per_aggressor(98_000, False) == 98_000


def test_activations_are_capped_by_the_refresh_window(bank: DramBank) -> None:
    result = bank.hammer(5_000_000)
    assert result.capped and result.activations_per_aggressor == 650_000 and result.disturbance == 1_300_000
    assert result.time_ms == pytest.approx(64.0)
    assert not bank.hammer(650_000).capped


def test_lpddr4_refreshes_every_32_ms() -> None:
    lpddr4 = PROFILES["lpddr4-kim2020"]
    assert lpddr4.refresh_window_ms == 32.0 and lpddr4.double_sided
    slice_ = BankSlice(victim_rows=2, words_per_row=16, first_flip_activations=9_600,
                       refresh_window_ms=lpddr4.refresh_window_ms)
    assert slice_.max_activations_per_window == DDR3_ACTIVATIONS_PER_WINDOW // 2  # same tRC, half the window
    result = DramBank(slice_).hammer(1_000_000)
    assert result.capped and result.activations_per_aggressor == 325_000 and result.time_ms == pytest.approx(32.0)


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=0, max_value=700_000), st.integers(min_value=0, max_value=700_000))
def test_more_hammering_never_unflips_a_cell(bank: DramBank, a: int, b: int) -> None:
    low, high = sorted((a, b))
    low_flips = set(bank.hammer(low).data_flips())
    high_flips = set(bank.hammer(high).data_flips())
    assert low_flips <= high_flips


@pytest.mark.parametrize("code", ["hamming", "hsiao"])
def test_outcome_counts_are_consistent(bank: DramBank, code: str) -> None:
    result = bank.hammer(650_000).code(code)
    assert sum(result.words_by_flips) == 16 * 256
    assert result.corrected == result.words_by_flips[1]
    assert result.corrected + result.detected + result.silent == 16 * 256 - result.words_by_flips[0]
    assert result.words_by_flips[2] > 0  # with 1 % vulnerable cells, some words take two flips


def test_both_codes_see_the_same_data_cell_flips(bank: DramBank) -> None:
    result = bank.hammer(650_000)
    hamming, hsiao = result.code("hamming"), result.code("hsiao")

    def data_cells(outcome_positions: tuple[tuple[int, tuple[int, ...]], ...], code: ecc.SecdedCode) -> set[object]:
        data = set(code.data_positions)
        return {(w, code.data_positions.index(p)) for w, ps in outcome_positions for p in ps if p in data}

    assert data_cells(hamming.flip_positions, ecc.HAMMING) == data_cells(hsiao.flip_positions, ecc.HSIAO)


def test_only_charged_cells_flip() -> None:
    slice_ = BankSlice(victim_rows=4, words_per_row=64, first_flip_activations=1_000, vulnerable_fraction=0.2)
    zeros = DramBank(slice_, data="zeros")
    result = zeros.hammer(650_000)
    cell_of = {p: c for c, p in enumerate(ecc.HAMMING.data_positions + ecc.HAMMING.check_positions)}
    assert result.flipped_bits > 0
    for word, positions in result.flip_positions:
        for position in positions:
            assert zeros.codewords(ecc.HAMMING)[word, position] == 0  # all-zero data: an all-zero codeword
            assert zeros.is_true_cell(word, cell_of[position]) is False  # anti cells hold charge as 0


@pytest.mark.parametrize("code", [ecc.HAMMING, ecc.HSIAO], ids=lambda c: c.key)
def test_ecc_memory_sees_the_same_outcomes_as_the_vectorised_count(code: ecc.SecdedCode) -> None:
    bank = DramBank(BankSlice(victim_rows=16, words_per_row=256, first_flip_activations=9_600,
                              vulnerable_fraction=0.01, seed=7), codes=(code,))
    result = bank.hammer(650_000)
    words = [int(sum(int(b) << i for i, b in enumerate(row))) for row in bank.data_bits]
    buffer = bytearray(b"".join(w.to_bytes(8, "little") for w in words))
    memory = EccMemory(BufferMemory(buffer), len(buffer), code)
    for word, positions in result.flip_positions:
        memory.inject_codeword_flips(word * 8, positions)
    silent = detected = 0
    for word, original in enumerate(words):
        try:
            if int.from_bytes(memory.read(word * 8, 8), "little") != original:
                silent += 1
        except MachineCheck:
            detected += 1
    assert (memory.log.corrected - silent, detected, silent) == (result.corrected, result.detected, result.silent)


def test_flip_rate_matches_the_cell_model() -> None:
    slice_ = BankSlice(victim_rows=32, words_per_row=512, first_flip_activations=9_600,
                       vulnerable_fraction=0.02, seed=3)
    bank = DramBank(slice_)
    cells = 32 * 512 * 72
    for disturbance in (9_600, 30_000, 96_000, 300_000, 1_300_000):
        observed = bank.hammer(disturbance // 2).flipped_bits / cells
        expected = slice_.flip_probability(disturbance)
        tolerance = FLIP_RATE_SIGMAS * (expected / cells) ** 0.5 + 2 / cells
        assert observed == pytest.approx(expected, abs=tolerance), disturbance


def test_default_sweep_spans_threshold_to_cap() -> None:
    counts = default_hammer_counts(98_000, 1_300_000, 2)
    assert counts[0] == 24_500 and 49_000 in counts and counts[-1] == 650_000
    assert default_hammer_counts(98_000, 1_300_000, 1)[-1] == 1_300_000


QUICK = ("--rows", "8", "--seeds", "3")


def test_cli_prints_tables_and_writes_a_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "rowhammer.png"
    assert main(["lab", "rowhammer", *QUICK, "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "Hammering, extended Hamming (72,64): 8 victim rows" in out and "single-sided" in out
    assert "SECDED outcome, Hsiao (72,64)" in out and "SECDED outcome, extended Hamming (72,64)" in out
    assert "98,000" in out and "0.7596" in out and "0.5628" in out  # HC_first, the exact triple-error shares
    assert "first flips at 98,000" in out
    assert_real_png(png)


def test_plot_keeps_flipped_bits_and_corrected_words_apart_and_draws_the_published_points() -> None:
    import argparse

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes
    from matplotlib.container import ErrorbarContainer
    from matplotlib.figure import Figure

    from pyrovisor.lab.rowhammer import MODEL

    parser = argparse.ArgumentParser()
    MODEL.add_arguments(parser)
    result = MODEL.run(parser.parse_args(["--profile", "ddr3-kim2014", *QUICK]))
    assert result.plot is not None
    figure = Figure()
    result.plot(figure)

    def axes_of(label: str) -> Axes:
        for axes in figure.axes:
            _, labels = axes.get_legend_handles_labels()
            if label in labels:
                return axes
        raise AssertionError(f"no {label!r} in the plot")

    # The issue: the flipped-bits line hid under "words corrected". They are on separate axes now.
    assert axes_of("flipped bits (model)") is not axes_of("corrected, hamming")
    assert axes_of("Kim 2014: first flip, 139K") is axes_of("flipped bits (model)")
    assert axes_of("Kim 2014: 1 in 1,700 cells susceptible") is axes_of("flipped bits (model)")
    # The two codes' corrected words coincide almost everywhere: filled small markers over hollow large ones.
    words = axes_of("corrected, hamming")
    lines = {bars.get_label(): bars.lines[0] for bars in words.containers if isinstance(bars, ErrorbarContainer)}
    hamming, hsiao = lines["corrected, hamming"], lines["corrected, hsiao"]
    assert hamming.get_fillstyle() == "full" and hsiao.get_fillstyle() == "none"
    assert hsiao.get_markersize() > hamming.get_markersize() and hamming.get_zorder() > hsiao.get_zorder()


def test_json_headline_and_assumptions(capsys: pytest.CaptureFixture[str]) -> None:
    document = lab_json(capsys, "rowhammer", *QUICK)
    headline = document["headline"]
    assert headline["first flip ACTs/aggressor"] == 98_000
    flips = headline["flips/MiB at max"]
    assert flips["n"] == 3 and flips["low"] <= flips["mean"] <= flips["high"]
    assert {"silent words/MiB at max, hamming", "silent words/MiB at max, hsiao"} <= set(headline)
    assumptions = {a["name"]: a for a in document["assumptions"]}
    assert assumptions["HC_first (adjacent-row activations at the first flip)"]["value"] == 98_000
    assert assumptions["refresh window ms"]["value"] == 64.0
    assert assumptions["activations per window (cap)"]["value"] == 1_300_000
    assert assumptions["vulnerable fraction"] == {"name": "vulnerable fraction", "value": 0.001, "basis": "assumed"}
    assert assumptions["hammering"]["value"] == "single-sided"
    assert assumptions["code hsiao"]["basis"] == "Hsiao, IBM J. Res. Dev. 1970"


def test_json_profiles_set_sides_window_and_density(capsys: pytest.CaptureFixture[str]) -> None:
    lpddr4 = lab_json(capsys, "rowhammer", "--profile", "lpddr4-kim2020", "--code", "hsiao", *QUICK)
    assumptions = {a["name"]: a["value"] for a in lpddr4["assumptions"]}
    assert assumptions["hammering"] == "double-sided" and assumptions["refresh window ms"] == 32.0
    assert assumptions["activations per window (cap)"] == 650_000
    assert lpddr4["headline"]["first flip ACTs/aggressor"] == 4_800  # the profile's double_sided is read
    assert set(lpddr4["headline"]) == {"first flip ACTs/aggressor", "flips/MiB at max", "MCE words/MiB at max",
                                       "silent words/MiB at max"}
    single = lab_json(capsys, "rowhammer", "--profile", "lpddr4-kim2020", "--single-sided", *QUICK)
    assert single["headline"]["first flip ACTs/aggressor"] == 9_600
    park = lab_json(capsys, "rowhammer", "--double-sided", *QUICK)
    assert park["headline"]["first flip ACTs/aggressor"] == 49_000
    kim = lab_json(capsys, "rowhammer", "--profile", "ddr3-kim2014", *QUICK)
    density = next(a for a in kim["assumptions"] if a["name"] == "vulnerable fraction")
    assert density["value"] == pytest.approx(1 / 1_700) and density["basis"] == "Kim et al., ISCA 2014 (abstract)"


def test_sweep_of_the_refresh_window_moves_the_flips(capsys: pytest.CaptureFixture[str]) -> None:
    # A longer window lets more activations in before refresh: more cells reach their threshold.
    capsys.readouterr()
    assert main(["lab", "rowhammer", "--json", "--sweep", "refresh-window-ms=16:64:3", *QUICK]) == 0
    import json

    document = json.loads(capsys.readouterr().out)
    points = document["sweep"]["points"]
    assert [p["value"] for p in points] == [16.0, 40.0, 64.0]
    flips = [p["headline"]["flips/MiB at max"]["mean"] for p in points]
    assert flips[0] < flips[1] < flips[2]
    # p_flip at the cap grows with log10(cap / HC_first): 16 ms lets 325K activations in, 64 ms 1,300K.
    expected = [math.log10(325_000 / 98_000), math.log10(812_500 / 98_000), math.log10(1_300_000 / 98_000)]
    ratios = np.array(flips) / flips[-1]
    assert ratios == pytest.approx(np.array(expected) / expected[-1], abs=WINDOW_SWEEP_TOLERANCE)


def test_cli_rejects_bad_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "rowhammer", "--hammer-counts", "lots"]) == 1
    assert "--hammer-counts" in capsys.readouterr().err
