"""A SECDED (72,64) extended Hamming code: 64 data bits, 8 check bits, single-error correction, double-error detection.

The code (Hamming, "Error detecting and error correcting codes", Bell System Technical Journal 29(2), 1950,
extended by one overall parity bit) is the one server DIMMs use per 64-bit word: a rank of 72-bit-wide
memory stores 8 check bits next to every 8 data bytes.

Layout: codeword bit `p` (0..71) is "position p". Positions 1, 2, 4, 8, 16, 32, 64 hold the Hamming check
bits, position 0 holds the overall parity bit, the other 64 positions hold data bits 0..63 in order.
Check bit 2^k is chosen so that the XOR of all positions whose index has bit k set is 0; the overall bit
makes the parity of all 72 bits even. Decoding computes

    syndrome s = XOR of the indices of all set bits in positions 1..71     (7 bits)
    parity   q = XOR of all 72 bits

    s == 0, q == 0  -> no error
    q == 1, s <= 71 -> one error, at position s (s == 0 means the overall bit itself): corrected
    q == 1, s > 71  -> an odd number (>= 3) of errors that points nowhere: detected, uncorrectable
    q == 0, s != 0  -> an even number (>= 2) of errors: detected, uncorrectable

Three or more flips can also look like one (q == 1, s <= 71): the decoder then "corrects" the wrong bit
and returns wrong data without complaint (miscorrection), and four flips can form another codeword
(s == 0, q == 0): silent corruption. Because the code is linear, the outcome depends only on the error
pattern, never on the data, which is what lets `outcome_fractions` enumerate patterns exactly.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass

import numpy as np

WORD_BITS = 64
CODEWORD_BITS = 72
CHECK_POSITIONS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
OVERALL_PARITY_POSITION = 0
DATA_POSITIONS: tuple[int, ...] = tuple(
    p for p in range(1, CODEWORD_BITS) if p not in CHECK_POSITIONS
)
assert len(DATA_POSITIONS) == WORD_BITS

_WORD_MASK = (1 << WORD_BITS) - 1


class Outcome(enum.Enum):
    """What the memory controller reports for one word, judged against the data that was written."""

    CLEAN = "no error"
    CORRECTED = "corrected"
    DETECTED = "detected (machine check)"
    SILENT = "silent corruption"


@dataclass(frozen=True)
class Decoded:
    """The decoder's verdict on one codeword. `data` is None when the error was detected but not corrected."""

    data: int | None
    syndrome: int
    parity: int
    corrected_position: int | None

    @property
    def uncorrectable(self) -> bool:
        return self.data is None


def _syndrome_and_parity(codeword: int) -> tuple[int, int]:
    syndrome = 0
    bits = codeword >> 1
    position = 1
    while bits:
        if bits & 1:
            syndrome ^= position
        bits >>= 1
        position += 1
    return syndrome, codeword.bit_count() & 1


def encode(data: int) -> int:
    """The 72-bit codeword of a 64-bit data word."""
    if not 0 <= data <= _WORD_MASK:
        raise ValueError(f"data word {data:#x} does not fit in 64 bits")
    codeword = 0
    syndrome = 0
    for bit, position in enumerate(DATA_POSITIONS):
        if (data >> bit) & 1:
            codeword |= 1 << position
            syndrome ^= position
    for check in CHECK_POSITIONS:
        if syndrome & check:
            codeword |= 1 << check
    if codeword.bit_count() & 1:
        codeword |= 1 << OVERALL_PARITY_POSITION
    return codeword


def extract_data(codeword: int) -> int:
    """The 64 data bits of a codeword, without checking anything."""
    data = 0
    for bit, position in enumerate(DATA_POSITIONS):
        if (codeword >> position) & 1:
            data |= 1 << bit
    return data


def decode(codeword: int) -> Decoded:
    """Check a 72-bit codeword, correct a single flipped bit, detect two."""
    if not 0 <= codeword < 1 << CODEWORD_BITS:
        raise ValueError(f"codeword {codeword:#x} does not fit in 72 bits")
    syndrome, parity = _syndrome_and_parity(codeword)
    if parity == 0:
        if syndrome == 0:
            return Decoded(extract_data(codeword), syndrome, parity, None)
        return Decoded(None, syndrome, parity, None)
    if syndrome >= CODEWORD_BITS:
        return Decoded(None, syndrome, parity, None)
    repaired = codeword ^ (1 << syndrome)
    return Decoded(extract_data(repaired), syndrome, parity, syndrome)


def flip(codeword: int, positions: tuple[int, ...] | list[int]) -> int:
    for position in positions:
        if not 0 <= position < CODEWORD_BITS:
            raise ValueError(f"bit position {position} is outside a 72-bit codeword")
        codeword ^= 1 << position
    return codeword


def classify(written: int, flipped_positions: tuple[int, ...] | list[int]) -> Outcome:
    """The outcome of reading back `written` after the given codeword bits flipped."""
    decoded = decode(flip(encode(written), flipped_positions))
    if decoded.data is None:
        return Outcome.DETECTED
    if decoded.data != written:
        return Outcome.SILENT
    if decoded.corrected_position is None:
        return Outcome.CLEAN
    return Outcome.CORRECTED


# --- Vectorised error-pattern outcomes (the code is linear: only the pattern matters) ------------------

def pattern_outcomes(patterns: np.ndarray) -> np.ndarray:
    """Outcome codes for error patterns given as an (N, k) array of distinct flipped positions.

    Returns an int array: 0 clean, 1 corrected, 2 detected, 3 silent (miscorrected or undetected).
    """
    patterns = np.asarray(patterns, dtype=np.int64)
    if patterns.ndim != 2:
        raise ValueError("patterns must be a 2-D array of bit positions")
    flips = patterns.shape[1]
    syndrome = np.zeros(patterns.shape[0], dtype=np.int64)
    for column in range(flips):
        syndrome ^= patterns[:, column]  # position 0 contributes 0, as it should
    parity = flips & 1
    result = np.empty(patterns.shape[0], dtype=np.int8)
    if flips == 0:
        result[:] = 0
        return result
    if parity == 0:
        result[:] = np.where(syndrome == 0, 3, 2)
        return result
    if flips == 1:
        result[:] = 1
        return result
    # Three or more (odd) flips: a syndrome beyond the last position is detected; any other syndrome
    # makes the decoder flip one more bit. The word then differs from the written one in at least two
    # positions, and two or more distinct check positions never XOR to zero, so some data bit is wrong:
    # every such pattern is a silent miscorrection.
    result[:] = np.where(syndrome < CODEWORD_BITS, 3, 2)
    return result


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


def _generator_matrix() -> np.ndarray:
    """A (64, 72) 0/1 matrix G with codeword bits = data bits @ G (mod 2)."""
    matrix = np.zeros((WORD_BITS, CODEWORD_BITS), dtype=np.uint8)
    for bit in range(WORD_BITS):
        row = encode(1 << bit)
        matrix[bit] = [(row >> position) & 1 for position in range(CODEWORD_BITS)]
    return matrix


_GENERATOR = _generator_matrix()


def encode_bits(data_bits: np.ndarray) -> np.ndarray:
    """Vectorised `encode`: an (N, 64) array of data bits (bit i of each word) to an (N, 72) codeword array."""
    data_bits = np.asarray(data_bits, dtype=np.uint8)
    return ((data_bits.astype(np.int64) @ _GENERATOR.astype(np.int64)) & 1).astype(np.uint8)


def error_mask_outcomes(errors: np.ndarray) -> np.ndarray:
    """Outcome codes (as `pattern_outcomes`) for an (N, 72) boolean array of flipped codeword positions."""
    errors = np.asarray(errors, dtype=bool)
    positions = np.arange(CODEWORD_BITS, dtype=np.int64)
    syndrome = np.bitwise_xor.reduce(np.where(errors, positions, 0), axis=1)
    flips = errors.sum(axis=1)
    result = np.full(errors.shape[0], 3, dtype=np.int8)
    result[flips == 0] = 0
    result[flips == 1] = 1
    even = (flips % 2 == 0) & (flips > 0)
    result[even & (syndrome != 0)] = 2
    odd_many = (flips % 2 == 1) & (flips >= 3)
    result[odd_many & (syndrome >= CODEWORD_BITS)] = 2
    return result


@dataclass(frozen=True)
class OutcomeFractions:
    """Shares of error patterns with `flips` flipped bits per word that end corrected, detected or silent."""

    flips: int
    patterns: int
    exhaustive: bool
    corrected: float
    detected: float
    silent: float


def outcome_fractions(flips: int, samples: int = 200_000, seed: int = 0,
                      exhaustive_limit: int = 1_100_000) -> OutcomeFractions:
    """Outcome shares for `flips` distinct flipped bits in one 72-bit word, uniformly placed.

    Exhaustive over all C(72, flips) patterns when there are at most `exhaustive_limit` of them
    (flips <= 4), otherwise estimated from `samples` random patterns.
    """
    if not 0 <= flips <= CODEWORD_BITS:
        raise ValueError(f"flips per word must be between 0 and {CODEWORD_BITS}")
    from math import comb

    total = comb(CODEWORD_BITS, flips)
    if total <= exhaustive_limit:
        patterns = np.fromiter(
            itertools.chain.from_iterable(itertools.combinations(range(CODEWORD_BITS), flips)),
            dtype=np.int64, count=total * flips,
        ).reshape(total, flips)
        exhaustive = True
    else:
        patterns = random_patterns(np.random.default_rng(seed), samples, flips)
        exhaustive = False
    codes = pattern_outcomes(patterns)
    count = len(codes)
    clean = float(np.count_nonzero(codes == 0)) / count
    return OutcomeFractions(
        flips=flips,
        patterns=count,
        exhaustive=exhaustive,
        corrected=float(np.count_nonzero(codes == 1)) / count + clean,
        detected=float(np.count_nonzero(codes == 2)) / count,
        silent=float(np.count_nonzero(codes == 3)) / count,
    )
