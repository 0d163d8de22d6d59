"""The Rowhammer bank model: published thresholds, refresh-window cap, ECC outcomes, and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from png_check import assert_real_png

from pyrovisor.lab import ecc
from pyrovisor.lab.bitflips import BufferMemory, EccMemory, MachineCheck
from pyrovisor.lab.rowhammer import (
    DDR3_ACTIVATIONS_PER_WINDOW,
    PROFILES,
    BankSlice,
    DramBank,
    default_hammer_counts,
)


def test_published_thresholds() -> None:
    assert PROFILES["ddr3-park2014"].first_flip_activations == 98_000
    assert PROFILES["lpddr4-kim2020"].first_flip_activations == 2 * 4_800
    # Park et al.: 98K is 7.54 % of the 1,300K activations the specification permits per window.
    share = PROFILES["ddr3-park2014"].first_flip_activations / DDR3_ACTIVATIONS_PER_WINDOW
    assert round(share * 100, 2) == 7.54


@pytest.fixture(scope="module")
def bank() -> DramBank:
    return DramBank(BankSlice(victim_rows=16, words_per_row=256, first_flip_activations=9_600,
                              vulnerable_fraction=0.01, seed=7))


def test_nothing_flips_below_the_first_flip_threshold_and_something_flips_at_it(bank: DramBank) -> None:
    below = bank.hammer(4_799)
    assert below.flipped_bits == 0 and below.corrected == below.detected == below.silent == 0
    at = bank.hammer(4_800)
    assert at.disturbance == 9_600
    assert at.flipped_bits >= 1


def test_single_sided_hammering_needs_twice_the_activations_per_row(bank: DramBank) -> None:
    assert bank.hammer(4_800, double_sided=False).flipped_bits == 0
    assert bank.hammer(9_600, double_sided=False).flipped_bits >= 1


def test_activations_are_capped_by_the_refresh_window(bank: DramBank) -> None:
    result = bank.hammer(5_000_000)
    assert result.capped and result.activations_per_aggressor == 650_000 and result.disturbance == 1_300_000
    assert not bank.hammer(650_000).capped


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=0, max_value=700_000), st.integers(min_value=0, max_value=700_000))
def test_more_hammering_never_unflips_a_cell(bank: DramBank, a: int, b: int) -> None:
    low, high = sorted((a, b))
    low_flips = set(bank.hammer(low).data_flips())
    high_flips = set(bank.hammer(high).data_flips())
    assert low_flips <= high_flips


def test_outcome_counts_are_consistent(bank: DramBank) -> None:
    result = bank.hammer(650_000)
    assert sum(result.words_by_flips) == result.words == 16 * 256
    assert result.corrected == result.words_by_flips[1]
    assert result.corrected + result.detected + result.silent == result.words - result.words_by_flips[0]
    assert result.words_by_flips[2] > 0  # with 1 % vulnerable cells, some words take two flips


def test_only_charged_cells_flip() -> None:
    slice_ = BankSlice(victim_rows=4, words_per_row=64, first_flip_activations=1_000, vulnerable_fraction=0.2)
    zeros = DramBank(slice_, data="zeros")
    result = zeros.hammer(650_000)
    for word, positions in result.flip_positions:
        for position in positions:
            stored = zeros.codewords[word, position]
            assert stored == 0 and not zeros.true_cells[word, position]  # anti cells hold charge as 0


def test_ecc_memory_sees_the_same_outcomes_as_the_vectorised_count(bank: DramBank) -> None:
    result = bank.hammer(650_000)
    data_positions = np.asarray(ecc.DATA_POSITIONS)
    words = [int(sum(int(b) << i for i, b in enumerate(row))) for row in bank.codewords[:, data_positions]]
    buffer = bytearray(b"".join(w.to_bytes(8, "little") for w in words))
    memory = EccMemory(BufferMemory(buffer), len(buffer))
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
        assert observed == pytest.approx(expected, abs=4 * (expected / cells) ** 0.5 + 2 / cells), disturbance


def test_default_sweep_spans_threshold_to_cap() -> None:
    counts = default_hammer_counts(98_000, 1_300_000, 2)
    assert counts[0] == 24_500 and 49_000 in counts and counts[-1] == 650_000


def test_cli_prints_tables_and_writes_a_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pyrovisor.api.cli import main

    png = tmp_path / "rowhammer.png"
    assert main(["lab", "rowhammer", "--rows", "16", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "Hammering 16 victim rows" in out
    assert "SECDED (72,64) outcome" in out
    assert "98,000" in out and "0.7596" in out  # HC_first, and the exact triple-error miscorrection share
    assert "first flips at 98,000" in out
    assert_real_png(png)


def test_cli_rejects_bad_counts(capsys: pytest.CaptureFixture[str]) -> None:
    from pyrovisor.api.cli import main

    assert main(["lab", "rowhammer", "--hammer-counts", "lots"]) == 1
    assert "--hammer-counts" in capsys.readouterr().err
