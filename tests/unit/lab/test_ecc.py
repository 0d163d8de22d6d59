"""SECDED (72,64): every single-bit error corrected, every double-bit error detected, exhaustively."""

from __future__ import annotations

import itertools
from math import comb

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyrovisor.lab import ecc

WORDS = [0, (1 << 64) - 1, 0x0123456789ABCDEF, 0x8000000000000001, 0xAAAAAAAAAAAAAAAA]
ALL_PAIRS = list(itertools.combinations(range(ecc.CODEWORD_BITS), 2))


def test_layout_is_a_72_64_code() -> None:
    assert len(ecc.DATA_POSITIONS) == 64
    assert set(ecc.DATA_POSITIONS).isdisjoint(ecc.CHECK_POSITIONS)
    assert ecc.OVERALL_PARITY_POSITION not in ecc.DATA_POSITIONS
    assert len(ALL_PAIRS) == comb(72, 2) == 2556


def _assert_single_and_double_errors(word: int) -> None:
    codeword = ecc.encode(word)
    assert codeword < 1 << 72
    assert codeword.bit_count() % 2 == 0
    clean = ecc.decode(codeword)
    assert clean.data == word and clean.corrected_position is None
    for position in range(ecc.CODEWORD_BITS):
        decoded = ecc.decode(codeword ^ (1 << position))
        assert decoded.data == word, position
        assert decoded.corrected_position == position
    for a, b in ALL_PAIRS:
        decoded = ecc.decode(codeword ^ (1 << a) ^ (1 << b))
        assert decoded.uncorrectable, (a, b)


@pytest.mark.parametrize("word", WORDS)
def test_every_single_error_is_corrected_and_every_double_error_detected(word: int) -> None:
    _assert_single_and_double_errors(word)


@settings(max_examples=12, deadline=None)
@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_random_words_single_and_double_errors(word: int) -> None:
    _assert_single_and_double_errors(word)


@given(st.integers(min_value=0, max_value=(1 << 64) - 1), st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_distinct_words_have_codewords_at_distance_at_least_four(a: int, b: int) -> None:
    if a != b:
        assert (ecc.encode(a) ^ ecc.encode(b)).bit_count() >= 4


def test_the_code_is_linear() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        a, b = (int(x) for x in rng.integers(0, 1 << 63, size=2))
        assert ecc.encode(a ^ b) == ecc.encode(a) ^ ecc.encode(b)


def test_a_weight_four_codeword_is_an_undetected_four_bit_error() -> None:
    # Data bit at position 3 = positions 1 and 2 in the syndrome, plus the overall parity: weight 4
    # codewords exist, so four flips can turn one valid word into another without any report.
    other = ecc.encode(1 << 0)
    assert other.bit_count() == 4
    flipped = [p for p in range(72) if (other >> p) & 1]
    assert ecc.classify(0, flipped) is ecc.Outcome.SILENT


def test_classify_outcomes() -> None:
    word = 0xDEADBEEFCAFEBABE
    assert ecc.classify(word, []) is ecc.Outcome.CLEAN
    assert ecc.classify(word, [70]) is ecc.Outcome.CORRECTED
    assert ecc.classify(word, [0]) is ecc.Outcome.CORRECTED
    assert ecc.classify(word, [5, 9]) is ecc.Outcome.DETECTED
    assert ecc.classify(word, [3, 5, 6]) is ecc.Outcome.SILENT  # 3 ^ 5 ^ 6 = 0: overall bit "fixed"


@given(st.integers(min_value=0, max_value=(1 << 64) - 1),
       st.lists(st.integers(min_value=0, max_value=71), min_size=3, max_size=7, unique=True))
def test_vectorised_outcomes_agree_with_the_decoder(word: int, positions: list[int]) -> None:
    expected = {ecc.Outcome.CORRECTED: 1, ecc.Outcome.DETECTED: 2, ecc.Outcome.SILENT: 3}
    code = int(ecc.pattern_outcomes(np.array([positions]))[0])
    assert code == expected[ecc.classify(word, positions)]
    mask = np.zeros((1, 72), dtype=bool)
    mask[0, positions] = True
    assert int(ecc.error_mask_outcomes(mask)[0]) == code


def test_vectorised_encoder_matches() -> None:
    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2, size=(64, 64), dtype=np.uint8)
    codewords = ecc.encode_bits(bits)
    for row, code_row in zip(bits, codewords, strict=True):
        word = sum(int(b) << i for i, b in enumerate(row))
        expected = ecc.encode(word)
        assert [int(x) for x in code_row] == [(expected >> p) & 1 for p in range(72)]


def test_outcome_fractions_single_double_triple() -> None:
    one, two, three = (ecc.outcome_fractions(k) for k in (1, 2, 3))
    assert (one.patterns, one.corrected) == (72, 1.0)
    assert (two.patterns, two.detected) == (2556, 1.0)
    assert three.exhaustive and three.patterns == comb(72, 3)
    # A triple error is detected only when its syndrome lands beyond position 71; count those directly.
    beyond = sum(1 for t in itertools.combinations(range(72), 3) if t[0] ^ t[1] ^ t[2] >= 72)
    assert three.detected == pytest.approx(beyond / comb(72, 3))
    assert three.silent == pytest.approx(1 - beyond / comb(72, 3))
    assert three.corrected == 0.0


def test_out_of_range_inputs_are_rejected() -> None:
    with pytest.raises(ValueError):
        ecc.encode(1 << 64)
    with pytest.raises(ValueError):
        ecc.decode(1 << 72)
    with pytest.raises(ValueError):
        ecc.flip(0, [72])
