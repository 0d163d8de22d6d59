"""SECDED (72,64) codes: 64 data bits, 8 check bits, single-error correction, double-error detection.

A rank of 72-bit-wide ECC memory stores 8 check bits beside every 8 data bytes. Two codes are offered, both
given by their parity-check matrix H: one 8-bit column per codeword position (0..71).

- `HAMMING`: an extended Hamming code (R. W. Hamming, "Error detecting and error correcting codes", Bell
  System Technical Journal 29(2), 1950, plus one overall parity bit). Check bits sit at positions 1, 2, 4, 8,
  16, 32, 64, the overall parity bit at position 0, data bits 0..63 in the other positions in order. The
  column of position p is (p << 1) | 1: the 7-bit position index, and a 1 for the overall parity row. The
  syndrome of a word is then (s << 1) | q, with s the XOR of the positions of its set bits and q the parity
  of all 72 bits, which is the textbook decoder:

      s == 0, q == 0  -> no error
      q == 1, s <= 71 -> one error, at position s (s == 0: the overall bit itself): corrected
      q == 1, s > 71  -> an odd number (>= 3) of errors that points nowhere: detected
      q == 0, s != 0  -> an even number (>= 2) of errors: detected

- `HSIAO`: a Hsiao code (M. Y. Hsiao, "A Class of Optimal Minimum Odd-weight-column SEC-DED Codes", IBM
  Journal of Research and Development 14(4), 1970), the odd-weight-column family memory controllers are
  generally said to use (no particular controller's matrix was checked). Every column has odd weight: the
  8 check bits have the weight-1 columns, the 64 data bits all 56 weight-3 columns and 8 weight-5 columns
  (the 8 rotations of 00011111). That is the least total weight 72 distinct
  odd-weight columns can have (8 + 56 * 3 + 8 * 5 = 216), and every row of H has the same weight (27), the
  two criteria of Hsiao's paper. Which 8 of the 56 weight-5 columns are used is a choice: the paper's own
  matrix may use others, which changes the 3- and 4-flip shares slightly (see docs/lab/rowhammer.md).
  Data bits occupy positions 0..63, check bits 64..71 (check bit k at 64 + k, column 1 << k).

One decoder serves both. The syndrome of a received word r is H r, the XOR of the columns of its set bits;
a codeword has syndrome 0, and an error pattern e leaves the syndrome H e whatever the data:

    syndrome == 0                -> accepted as it is
    syndrome == column of bit j  -> bit j flipped back: corrected
    any other syndrome           -> detected, uncorrectable (a machine check)

The code corrects every single error and detects every double error exactly when the columns are distinct,
non-zero, and no column is the XOR of two others; odd-weight columns guarantee the last (three odd-weight
columns XOR to an odd, so non-zero, vector). Three or more flips can still look like one: the decoder then
"corrects" a wrong bit and returns wrong data without complaint (miscorrection), and four flips can form
another codeword (syndrome 0): silent corruption. Because the codes are linear, the outcome depends only on
the error pattern, never on the data, which is what lets `outcome_fractions` enumerate patterns and
`exact_outcome_fractions` count them by syndrome, for any number of flips.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from math import comb

import numpy as np

WORD_BITS = 64
CODEWORD_BITS = 72
CHECK_BITS = CODEWORD_BITS - WORD_BITS
SYNDROMES = 1 << CHECK_BITS
CHECK_POSITIONS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # Hamming layout
OVERALL_PARITY_POSITION = 0  # Hamming layout
DATA_POSITIONS: tuple[int, ...] = tuple(p for p in range(1, CODEWORD_BITS) if p not in CHECK_POSITIONS)
assert len(DATA_POSITIONS) == WORD_BITS

_WORD_MASK = (1 << WORD_BITS) - 1

# Outcome codes of the vectorised functions.
CLEAN, CORRECTED, DETECTED, SILENT = 0, 1, 2, 3


class Outcome(enum.Enum):
    """What the memory controller reports for one word, judged against the data that was written."""

    CLEAN = "no error"
    CORRECTED = "corrected"
    DETECTED = "detected (machine check)"
    SILENT = "silent corruption"


@dataclass(frozen=True)
class Decoded:
    """The decoder's verdict on one codeword. `data` is None when the error was detected but not corrected.

    `syndrome` is the 8-bit H r; `parity` the parity of the number of flipped bits it implies."""

    data: int | None
    syndrome: int
    parity: int
    corrected_position: int | None

    @property
    def uncorrectable(self) -> bool:
        return self.data is None


@dataclass(frozen=True)
class OutcomeFractions:
    """Shares of error patterns with `flips` flipped bits per word that end corrected, detected or silent."""

    flips: int
    patterns: int
    exhaustive: bool
    corrected: float
    detected: float
    silent: float


@dataclass(frozen=True)
class SecdedCode:
    """A (72,64) SEC-DED code given by its parity-check matrix: `columns[p]` is the 8-bit column of position p."""

    key: str
    name: str
    source: str
    columns: tuple[int, ...]
    data_positions: tuple[int, ...]  # the codeword position of data bit i
    check_positions: tuple[int, ...]  # the positions of the 8 check bits, in the order of the stored check byte
    parity_mask: int  # the syndrome bits whose XOR is the parity of the number of flipped bits
    _column_array: np.ndarray = field(init=False, repr=False, compare=False)
    _position_of_syndrome: np.ndarray = field(init=False, repr=False, compare=False)
    _check_bits_of_syndrome: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _generator: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.columns) != CODEWORD_BITS or not all(0 < c < SYNDROMES for c in self.columns):
            raise ValueError(f"{self.key}: needs {CODEWORD_BITS} non-zero {CHECK_BITS}-bit columns")
        if len(set(self.columns)) != CODEWORD_BITS:
            raise ValueError(f"{self.key}: two positions share a column, so a single error is ambiguous")
        if sorted(self.data_positions + self.check_positions) != list(range(CODEWORD_BITS)) or \
                len(self.data_positions) != WORD_BITS:
            raise ValueError(f"{self.key}: data and check positions must split the 72 positions 64 + 8")
        column_array = np.array(self.columns, dtype=np.int64)
        position_of = np.full(SYNDROMES, -1, dtype=np.int64)
        position_of[column_array] = np.arange(CODEWORD_BITS)
        # Encoding: the check bits whose columns XOR to the data part's syndrome cancel it. The check columns
        # must be linearly independent so that every syndrome has exactly one such set.
        check_bits = [-1] * SYNDROMES
        for subset in range(SYNDROMES):
            syndrome = 0
            word = 0
            for index, position in enumerate(self.check_positions):
                if (subset >> index) & 1:
                    syndrome ^= self.columns[position]
                    word |= 1 << position
            check_bits[syndrome] = word
        if -1 in check_bits:
            raise ValueError(f"{self.key}: the check columns are not linearly independent")
        object.__setattr__(self, "_column_array", column_array)
        object.__setattr__(self, "_position_of_syndrome", position_of)
        object.__setattr__(self, "_check_bits_of_syndrome", tuple(check_bits))
        generator = np.zeros((WORD_BITS, CODEWORD_BITS), dtype=np.uint8)
        for bit in range(WORD_BITS):
            row = self.encode(1 << bit)
            generator[bit] = [(row >> position) & 1 for position in range(CODEWORD_BITS)]
        object.__setattr__(self, "_generator", generator)

    # --- One word at a time ------------------------------------------------------------------------------

    def syndrome(self, word: int) -> int:
        """H r: the XOR of the columns of the set bits of a 72-bit word."""
        syndrome = 0
        while word:
            lowest = word & -word
            syndrome ^= self.columns[lowest.bit_length() - 1]
            word ^= lowest
        return syndrome

    def encode(self, data: int) -> int:
        """The 72-bit codeword of a 64-bit data word."""
        if not 0 <= data <= _WORD_MASK:
            raise ValueError(f"data word {data:#x} does not fit in 64 bits")
        codeword = 0
        syndrome = 0
        for bit, position in enumerate(self.data_positions):
            if (data >> bit) & 1:
                codeword |= 1 << position
                syndrome ^= self.columns[position]
        return codeword | self._check_bits_of_syndrome[syndrome]

    def extract_data(self, codeword: int) -> int:
        """The 64 data bits of a codeword, without checking anything."""
        data = 0
        for bit, position in enumerate(self.data_positions):
            if (codeword >> position) & 1:
                data |= 1 << bit
        return data

    def decode(self, codeword: int) -> Decoded:
        """Check a 72-bit codeword, correct a single flipped bit, detect two."""
        if not 0 <= codeword < 1 << CODEWORD_BITS:
            raise ValueError(f"codeword {codeword:#x} does not fit in 72 bits")
        syndrome = self.syndrome(codeword)
        parity = (syndrome & self.parity_mask).bit_count() & 1
        if syndrome == 0:
            return Decoded(self.extract_data(codeword), syndrome, parity, None)
        position = int(self._position_of_syndrome[syndrome])
        if position < 0:
            return Decoded(None, syndrome, parity, None)
        return Decoded(self.extract_data(codeword ^ (1 << position)), syndrome, parity, position)

    def classify(self, written: int, flipped_positions: Sequence[int]) -> Outcome:
        """The outcome of reading back `written` after the given codeword bits flipped."""
        decoded = self.decode(flip(self.encode(written), flipped_positions))
        if decoded.data is None:
            return Outcome.DETECTED
        if decoded.data != written:
            return Outcome.SILENT
        if decoded.corrected_position is None:
            return Outcome.CLEAN
        return Outcome.CORRECTED

    # --- Vectorised (the code is linear: only the error pattern matters) ------------------------------------

    def outcome_codes(self, syndromes: np.ndarray, flips: np.ndarray) -> np.ndarray:
        """CLEAN / CORRECTED / DETECTED / SILENT for error patterns with these syndromes and flip counts.

        A non-zero pattern with syndrome 0 is another codeword: silent. A pattern of two or more flips whose
        syndrome is some column makes the decoder flip one more bit; the result differs from the written
        codeword by a non-zero codeword, whose data bits cannot all be zero (the data bits determine the check
        bits), so the data is wrong: silent. Any other non-zero syndrome is detected."""
        syndromes = np.asarray(syndromes, dtype=np.int64)
        flips = np.asarray(flips)
        looks_single = self._position_of_syndrome[syndromes] >= 0
        result = np.full(syndromes.shape, DETECTED, dtype=np.int8)
        result[looks_single] = SILENT
        result[looks_single & (flips == 1)] = CORRECTED
        result[syndromes == 0] = SILENT
        result[flips == 0] = CLEAN
        return result

    def pattern_outcomes(self, patterns: np.ndarray) -> np.ndarray:
        """Outcome codes for error patterns given as an (N, k) array of distinct flipped positions."""
        patterns = np.asarray(patterns, dtype=np.int64)
        if patterns.ndim != 2:
            raise ValueError("patterns must be a 2-D array of bit positions")
        flips = np.full(patterns.shape[0], patterns.shape[1])
        if patterns.shape[1] == 0:
            return self.outcome_codes(np.zeros(patterns.shape[0], dtype=np.int64), flips)
        syndromes = np.bitwise_xor.reduce(self._column_array[patterns], axis=1)
        return self.outcome_codes(syndromes, flips)

    def error_mask_outcomes(self, errors: np.ndarray) -> np.ndarray:
        """Outcome codes for an (N, 72) boolean array of flipped codeword positions."""
        errors = np.asarray(errors, dtype=bool)
        syndromes = np.bitwise_xor.reduce(np.where(errors, self._column_array, 0), axis=1)
        return self.outcome_codes(syndromes, errors.sum(axis=1))

    def encode_bits(self, data_bits: np.ndarray) -> np.ndarray:
        """Vectorised `encode`: an (N, 64) array of data bits (bit i of each word) to an (N, 72) codeword array."""
        sums = np.asarray(data_bits, dtype=np.float32) @ self._generator.astype(np.float32)  # at most 64: exact
        codewords: np.ndarray = (np.rint(sums).astype(np.int64) & 1).astype(np.uint8)
        return codewords

    def outcome_fractions(self, flips: int, samples: int = 200_000, seed: int = 0,
                          exhaustive_limit: int = 1_100_000) -> OutcomeFractions:
        """Outcome shares for `flips` distinct flipped bits in one 72-bit word, uniformly placed.

        Exhaustive over all C(72, flips) patterns when there are at most `exhaustive_limit` of them
        (flips <= 4), otherwise estimated from `samples` random patterns."""
        if not 0 <= flips <= CODEWORD_BITS:
            raise ValueError(f"flips per word must be between 0 and {CODEWORD_BITS}")
        exhaustive = comb(CODEWORD_BITS, flips) <= exhaustive_limit
        patterns = all_patterns(flips) if exhaustive else random_patterns(np.random.default_rng(seed), samples, flips)
        codes = self.pattern_outcomes(patterns)
        count = len(codes)
        return OutcomeFractions(
            flips=flips,
            patterns=count,
            exhaustive=exhaustive,
            corrected=float(np.count_nonzero((codes == CORRECTED) | (codes == CLEAN))) / count,
            detected=float(np.count_nonzero(codes == DETECTED)) / count,
            silent=float(np.count_nonzero(codes == SILENT)) / count,
        )

    def syndrome_counts(self, flips: int) -> list[int]:
        """How many of the C(72, flips) error patterns have each syndrome 0..255, counted exactly.

        Column by column: a pattern of j flips either leaves the new column out, or takes it and one of the
        patterns of j - 1 flips among the earlier columns (whose syndrome then differs by the column)."""
        if not 0 <= flips <= CODEWORD_BITS:
            raise ValueError(f"flips per word must be between 0 and {CODEWORD_BITS}")
        counts = [[0] * SYNDROMES for _ in range(flips + 1)]
        counts[0][0] = 1
        for column in self.columns:
            for size in range(flips, 0, -1):
                smaller, current = counts[size - 1], counts[size]
                for syndrome in range(SYNDROMES):
                    if smaller[syndrome]:
                        current[syndrome ^ column] += smaller[syndrome]
        return counts[flips]

    def exact_outcome_fractions(self, flips: int) -> OutcomeFractions:
        """Outcome shares over all C(72, flips) placements of `flips` flipped bits, from `syndrome_counts`."""
        counts = self.syndrome_counts(flips)
        total = comb(CODEWORD_BITS, flips)
        if flips <= 1:
            return OutcomeFractions(flips, total, True, 1.0, 0.0, 0.0)
        silent = counts[0] + sum(counts[column] for column in self.columns)
        return OutcomeFractions(flips, total, True, 0.0, (total - silent) / total, silent / total)


@cache
def all_patterns(flips: int) -> np.ndarray:
    """Every set of `flips` distinct positions of a 72-bit word, one per row (C(72, flips) rows)."""
    total = comb(CODEWORD_BITS, flips)
    patterns = np.fromiter(itertools.chain.from_iterable(itertools.combinations(range(CODEWORD_BITS), flips)),
                           dtype=np.int64, count=total * flips).reshape(total, flips)
    patterns.setflags(write=False)
    return patterns


def random_patterns(rng: np.random.Generator, samples: int, flips: int) -> np.ndarray:
    """`samples` error patterns of `flips` distinct positions each, uniformly chosen (rejection sampling)."""
    patterns = rng.integers(0, CODEWORD_BITS, size=(samples, flips))
    while True:
        ordered = np.sort(patterns, axis=1)
        repeated = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
        count = int(np.count_nonzero(repeated))
        if count == 0:
            return patterns
        patterns[repeated] = rng.integers(0, CODEWORD_BITS, size=(count, flips))


def flip(codeword: int, positions: Sequence[int]) -> int:
    for position in positions:
        if not 0 <= position < CODEWORD_BITS:
            raise ValueError(f"bit position {position} is outside a 72-bit codeword")
        codeword ^= 1 << position
    return codeword


def _rotate_left(value: int, shift: int, bits: int = CHECK_BITS) -> int:
    mask = (1 << bits) - 1
    return ((value << shift) | (value >> (bits - shift))) & mask


def hsiao_columns() -> tuple[int, ...]:
    """Data columns (all weight 3, then the rotations of 00011111), then the weight-1 check columns."""
    weight_three = [c for c in range(SYNDROMES) if c.bit_count() == 3]
    weight_five = [_rotate_left(0b00011111, shift) for shift in range(CHECK_BITS)]
    return tuple(weight_three + weight_five + [1 << k for k in range(CHECK_BITS)])


HAMMING = SecdedCode(
    key="hamming",
    name="extended Hamming (72,64)",
    source="Hamming, BSTJ 1950, plus an overall parity bit",
    columns=tuple((position << 1) | 1 for position in range(CODEWORD_BITS)),
    data_positions=DATA_POSITIONS,
    check_positions=(OVERALL_PARITY_POSITION, *CHECK_POSITIONS),
    parity_mask=0b1,
)
HSIAO = SecdedCode(
    key="hsiao",
    name="Hsiao (72,64)",
    source="Hsiao, IBM J. Res. Dev. 1970",
    columns=hsiao_columns(),
    data_positions=tuple(range(WORD_BITS)),
    check_positions=tuple(range(WORD_BITS, CODEWORD_BITS)),
    parity_mask=SYNDROMES - 1,
)
CODES: dict[str, SecdedCode] = {HAMMING.key: HAMMING, HSIAO.key: HSIAO}


# --- The Hamming-layout code as module functions (the original interface of this module) -------------------

def encode(data: int) -> int:
    """The 72-bit extended-Hamming codeword of a 64-bit data word."""
    return HAMMING.encode(data)


def extract_data(codeword: int) -> int:
    return HAMMING.extract_data(codeword)


def decode(codeword: int) -> Decoded:
    return HAMMING.decode(codeword)


def classify(written: int, flipped_positions: Sequence[int]) -> Outcome:
    return HAMMING.classify(written, flipped_positions)


def pattern_outcomes(patterns: np.ndarray) -> np.ndarray:
    return HAMMING.pattern_outcomes(patterns)


def error_mask_outcomes(errors: np.ndarray) -> np.ndarray:
    return HAMMING.error_mask_outcomes(errors)


def encode_bits(data_bits: np.ndarray) -> np.ndarray:
    return HAMMING.encode_bits(data_bits)


def outcome_fractions(flips: int, samples: int = 200_000, seed: int = 0,
                      exhaustive_limit: int = 1_100_000) -> OutcomeFractions:
    return HAMMING.outcome_fractions(flips, samples, seed, exhaustive_limit)
