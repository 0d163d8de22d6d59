"""SECDED (72,64), extended Hamming and Hsiao: every single-bit error corrected, every double-bit error
detected, exhaustively; the outcome shares for 1..6 flips, exact, and how the two codes differ at 3 flips."""

from __future__ import annotations

import itertools
from math import comb

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyrovisor.lab import ecc
from pyrovisor.lab.stats import estimate

WORDS = [0, (1 << 64) - 1, 0x0123456789ABCDEF, 0x8000000000000001, 0xAAAAAAAAAAAAAAAA]
ALL_PAIRS = list(itertools.combinations(range(ecc.CODEWORD_BITS), 2))
CODES = [ecc.HAMMING, ecc.HSIAO]

# Exact outcome counts of all C(72, k) placements of k flipped bits (docs/lab/rowhammer.md, the outcome
# table): silent patterns for k = 3 and k = 4, per code. Every other k = 3 or 4 pattern is detected.
SILENT_PATTERNS = {
    ("hamming", 3): 45_304,  # of 59,640: 0.7596
    ("hsiao", 3): 33_568,  # 0.5628
    ("hamming", 4): 11_326,  # of 1,028,790: 0.0110
    ("hsiao", 4): 8_392,  # 0.0082
}
# docs/lab/rowhammer.md: "for three flips the silent share differs markedly: 76 % against 56 %".
THREE_FLIP_SILENT_GAP = 0.15
# docs/lab/rowhammer.md: "the sampler (200,000 patterns over 5 seeds) agrees with the exact shares within its
# 95 % interval, widened by this much for the rare seed set that misses".
SAMPLED_SHARE_TOLERANCE = 0.005


def test_layout_is_a_72_64_code() -> None:
    assert len(ecc.DATA_POSITIONS) == 64
    assert set(ecc.DATA_POSITIONS).isdisjoint(ecc.CHECK_POSITIONS)
    assert ecc.OVERALL_PARITY_POSITION not in ecc.DATA_POSITIONS
    assert len(ALL_PAIRS) == comb(72, 2) == 2556
    for code in CODES:
        assert sorted(code.data_positions + code.check_positions) == list(range(72))


@pytest.mark.parametrize("code", CODES, ids=lambda c: c.key)
def test_parity_check_matrix_has_distance_four(code: ecc.SecdedCode) -> None:
    # Distinct non-zero columns: every single error has its own syndrome. No column is the XOR of two others
    # (checked over all 2,556 pairs): no double error looks like a single one, and no triple is a codeword.
    columns = set(code.columns)
    assert len(columns) == 72 and 0 not in columns
    assert all(code.columns[a] ^ code.columns[b] not in columns for a, b in ALL_PAIRS)


def test_hsiao_columns_follow_the_paper_criteria() -> None:
    weights = sorted(c.bit_count() for c in ecc.HSIAO.columns)
    assert all(w % 2 == 1 for w in weights)  # odd-weight columns
    # The least total weight of 72 distinct odd-weight 8-bit columns: all 8 of weight 1, all 56 of weight 3,
    # then 8 of weight 5 (Hsiao 1970): 216 ones.
    assert weights == [1] * 8 + [3] * 56 + [5] * 8 and sum(weights) == 216
    rows = [sum((c >> row) & 1 for c in ecc.HSIAO.columns) for row in range(8)]
    assert rows == [27] * 8  # every row of H as heavy as the others (216 / 8)
    assert [ecc.HSIAO.columns[p] for p in ecc.HSIAO.check_positions] == [1 << k for k in range(8)]  # systematic


def _assert_single_and_double_errors(code: ecc.SecdedCode, word: int) -> None:
    codeword = code.encode(word)
    assert codeword < 1 << 72
    assert code.syndrome(codeword) == 0
    clean = code.decode(codeword)
    assert clean.data == word and clean.corrected_position is None
    for position in range(ecc.CODEWORD_BITS):
        decoded = code.decode(codeword ^ (1 << position))
        assert decoded.data == word, position
        assert decoded.corrected_position == position
        assert decoded.parity == 1
    for a, b in ALL_PAIRS:
        decoded = code.decode(codeword ^ (1 << a) ^ (1 << b))
        assert decoded.uncorrectable, (a, b)
        assert decoded.parity == 0


@pytest.mark.parametrize("code", CODES, ids=lambda c: c.key)
@pytest.mark.parametrize("word", WORDS)
def test_every_single_error_is_corrected_and_every_double_error_detected(code: ecc.SecdedCode, word: int) -> None:
    _assert_single_and_double_errors(code, word)


@settings(max_examples=8, deadline=None)
@given(st.sampled_from(CODES), st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_random_words_single_and_double_errors(code: ecc.SecdedCode, word: int) -> None:
    _assert_single_and_double_errors(code, word)


@given(st.sampled_from(CODES), st.integers(min_value=0, max_value=(1 << 64) - 1),
       st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_distinct_words_have_codewords_at_distance_at_least_four(code: ecc.SecdedCode, a: int, b: int) -> None:
    if a != b:
        assert (code.encode(a) ^ code.encode(b)).bit_count() >= 4
        assert code.extract_data(code.encode(a)) == a


@pytest.mark.parametrize("code", CODES, ids=lambda c: c.key)
def test_the_code_is_linear(code: ecc.SecdedCode) -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        a, b = (int(x) for x in rng.integers(0, 1 << 63, size=2))
        assert code.encode(a ^ b) == code.encode(a) ^ code.encode(b)


def test_hamming_module_functions_are_the_hamming_code() -> None:
    # The syndrome of the Hamming layout is (s << 1) | q: s the XOR of the set positions, q the overall parity.
    word = 0x0123456789ABCDEF
    codeword = ecc.encode(word)
    assert codeword == ecc.HAMMING.encode(word) and ecc.extract_data(codeword) == word
    decoded = ecc.decode(codeword ^ (1 << 70))
    assert decoded.syndrome == (70 << 1) | 1 and decoded.parity == 1 and decoded.corrected_position == 70
    assert ecc.decode(codeword ^ (1 << 5) ^ (1 << 9)).syndrome == (5 ^ 9) << 1


def test_a_weight_four_codeword_is_an_undetected_four_bit_error() -> None:
    # Data bit at position 3 = positions 1 and 2 in the syndrome, plus the overall parity: weight 4
    # codewords exist, so four flips can turn one valid word into another without any report.
    other = ecc.encode(1 << 0)
    assert other.bit_count() == 4
    flipped = [p for p in range(72) if (other >> p) & 1]
    assert ecc.classify(0, flipped) is ecc.Outcome.SILENT
    # In the Hsiao code the lightest data column has weight 3, so a codeword has weight at least 4 as well.
    assert min(ecc.HSIAO.encode(1 << bit).bit_count() for bit in range(64)) == 4


def test_classify_outcomes() -> None:
    word = 0xDEADBEEFCAFEBABE
    assert ecc.classify(word, []) is ecc.Outcome.CLEAN
    assert ecc.classify(word, [70]) is ecc.Outcome.CORRECTED
    assert ecc.classify(word, [0]) is ecc.Outcome.CORRECTED
    assert ecc.classify(word, [5, 9]) is ecc.Outcome.DETECTED
    assert ecc.classify(word, [3, 5, 6]) is ecc.Outcome.SILENT  # 3 ^ 5 ^ 6 = 0: overall bit "fixed"
    # Hsiao: data columns 0, 1, 2 are 00000111, 00001011, 00001101; their XOR 00000001 is check bit 0's column,
    # so the decoder flips check bit 0 and the three data errors stay. Check bits 0, 1, 2 XOR to 00000111, data
    # bit 0's column: miscorrected too. Data bit 0 with check bits 3 and 5
    # gives 00101111, a weight-5 vector that is no column: detected.
    assert ecc.HSIAO.columns[:3] == (0b0000_0111, 0b0000_1011, 0b0000_1101)
    assert ecc.HSIAO.classify(word, [0, 1, 2]) is ecc.Outcome.SILENT
    assert ecc.HSIAO.classify(word, [64, 65, 66]) is ecc.Outcome.SILENT
    assert ecc.HSIAO.classify(word, [0, 67, 69]) is ecc.Outcome.DETECTED


@given(st.sampled_from(CODES), st.integers(min_value=0, max_value=(1 << 64) - 1),
       st.lists(st.integers(min_value=0, max_value=71), min_size=1, max_size=7, unique=True))
def test_vectorised_outcomes_agree_with_the_decoder(code: ecc.SecdedCode, word: int, positions: list[int]) -> None:
    expected = {ecc.Outcome.CORRECTED: ecc.CORRECTED, ecc.Outcome.DETECTED: ecc.DETECTED,
                ecc.Outcome.SILENT: ecc.SILENT}
    result = int(code.pattern_outcomes(np.array([positions]))[0])
    assert result == expected[code.classify(word, positions)]
    mask = np.zeros((1, 72), dtype=bool)
    mask[0, positions] = True
    assert int(code.error_mask_outcomes(mask)[0]) == result


@pytest.mark.parametrize("code", CODES, ids=lambda c: c.key)
def test_vectorised_encoder_matches(code: ecc.SecdedCode) -> None:
    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2, size=(64, 64), dtype=np.uint8)
    codewords = code.encode_bits(bits)
    for row, code_row in zip(bits, codewords, strict=True):
        word = sum(int(b) << i for i, b in enumerate(row))
        expected = code.encode(word)
        assert [int(x) for x in code_row] == [(expected >> p) & 1 for p in range(72)]


@pytest.mark.parametrize("code", CODES, ids=lambda c: c.key)
def test_outcome_table_for_one_to_four_flips_enumerated(code: ecc.SecdedCode) -> None:
    one, two, three, four = (code.outcome_fractions(k) for k in (1, 2, 3, 4))
    assert (one.patterns, one.corrected, one.detected, one.silent) == (72, 1.0, 0.0, 0.0)
    assert (two.patterns, two.corrected, two.detected, two.silent) == (2556, 0.0, 1.0, 0.0)
    for fractions, k in ((three, 3), (four, 4)):
        assert fractions.exhaustive and fractions.patterns == comb(72, k)
        assert fractions.silent == SILENT_PATTERNS[(code.key, k)] / comb(72, k)
        assert fractions.detected == pytest.approx(1 - fractions.silent) and fractions.corrected == 0.0


def test_hamming_triple_errors_counted_directly() -> None:
    # A triple error is detected only when its position XOR lands beyond position 71; count those directly.
    beyond = sum(1 for t in itertools.combinations(range(72), 3) if t[0] ^ t[1] ^ t[2] >= 72)
    assert comb(72, 3) - beyond == SILENT_PATTERNS[("hamming", 3)]


@pytest.mark.parametrize("code", CODES, ids=lambda c: c.key)
def test_counting_by_syndrome_equals_enumeration(code: ecc.SecdedCode) -> None:
    for k in (0, 1, 2, 3, 4):
        exact, enumerated = code.exact_outcome_fractions(k), code.outcome_fractions(k)
        assert exact.patterns == enumerated.patterns
        assert exact.detected == pytest.approx(enumerated.detected, abs=1e-15)
        assert exact.silent == pytest.approx(enumerated.silent, abs=1e-15)
        assert sum(code.syndrome_counts(k)) == comb(72, k)


@pytest.mark.parametrize("code", CODES, ids=lambda c: c.key)
@pytest.mark.parametrize("flips", [5, 6])
def test_sampled_shares_agree_with_the_exact_ones(code: ecc.SecdedCode, flips: int) -> None:
    exact = code.exact_outcome_fractions(flips)
    runs = [code.outcome_fractions(flips, samples=40_000, seed=seed) for seed in range(5)]
    assert not runs[0].exhaustive
    silent = estimate([r.silent for r in runs])
    assert silent.low - SAMPLED_SHARE_TOLERANCE <= exact.silent <= silent.high + SAMPLED_SHARE_TOLERANCE


def test_three_flip_silent_share_differs_between_the_codes() -> None:
    hamming, hsiao = (code.exact_outcome_fractions(3) for code in CODES)
    assert round(hamming.silent, 4) == 0.7596 and round(hsiao.silent, 4) == 0.5628
    assert hamming.silent - hsiao.silent > THREE_FLIP_SILENT_GAP
    # Four flips: silent only when the pattern is a codeword; both codes keep that near 1 %.
    assert ecc.HSIAO.exact_outcome_fractions(4).silent < ecc.HAMMING.exact_outcome_fractions(4).silent < 0.012


def test_the_hsiao_shares_depend_on_which_weight_five_columns_are_used() -> None:
    # Another balanced choice (the rotations of 01010111) meets the same criteria and gives 0.5639, not 0.5628:
    # the figure belongs to the matrix, not to "Hsiao codes" in general (docs/lab/rowhammer.md).
    def rotate(value: int, shift: int) -> int:
        return ((value << shift) | (value >> (8 - shift))) & 0xFF

    weight_three = [c for c in range(256) if c.bit_count() == 3]
    other = ecc.SecdedCode("hsiao-b", "Hsiao, other weight-5 columns", "test",
                           tuple(weight_three + [rotate(0b01010111, s) for s in range(8)] + [1 << k for k in range(8)]),
                           tuple(range(64)), tuple(range(64, 72)), 0xFF)
    assert [sum((c >> row) & 1 for c in other.columns) for row in range(8)] == [27] * 8
    assert round(other.exact_outcome_fractions(3).silent, 4) == 0.5639


def test_codes_with_ambiguous_columns_are_refused() -> None:
    with pytest.raises(ValueError):
        ecc.SecdedCode("bad", "bad", "test", (1,) * 72, tuple(range(64)), tuple(range(64, 72)), 0xFF)


def test_out_of_range_inputs_are_rejected() -> None:
    with pytest.raises(ValueError):
        ecc.encode(1 << 64)
    with pytest.raises(ValueError):
        ecc.decode(1 << 72)
    with pytest.raises(ValueError):
        ecc.flip(0, [72])
    with pytest.raises(ValueError):
        ecc.HSIAO.exact_outcome_fractions(73)
