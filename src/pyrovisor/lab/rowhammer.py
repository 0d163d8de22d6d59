"""Rowhammer against SECDED ECC: a DRAM bank slice whose hammered rows flip bits in 72-bit ECC words.

Model. A victim row sits between two aggressor rows. Within one refresh window tREFW (64 ms for DDR3/DDR4,
32 ms for LPDDR4, after which every row has been refreshed) the victim accumulates a disturbance

    D = activations of its adjacent rows within the window
      = 2 N when both neighbours are hammered N times (double-sided), N when one is (single-sided)

so double-sided hammering reaches a given D with half the activations per aggressor row (as Kim et al. 2020
count it: "9.6k (4.8k to two rows each)"). A cell flips when D reaches its own threshold and it holds its
charged value (a disturbance only drains charge, so a "true" cell can flip 1 -> 0 and an "anti" cell
0 -> 1). Refresh restores the charge, so the count starts again in every window. The weakest cell of the
slice has the chip's published first-flip threshold HC_first (in adjacent-row activations); the other
vulnerable cells, a share v of all cells, have thresholds spread log-uniformly over d decades above it, so
the probability that a given cell flips in one window is

    p_flip(D) = v * clamp(log10(D / HC_first) / d, 0, 1) * c

with c the share of cells that hold their charged value (1/2 for random data). By default the spread ends
at the most activations one refresh window of the profile's standard allows, d = log10(ACT_max / HC_first),
so that v is the share of cells that can flip at all within a window: what Kim et al. 2014 call
"susceptible". The activations within one window are capped by the DRAM timing, ACT_max = tREFW / tRC:
1,300K per 64 ms for DDR3 in Park et al. (tRC = 49.2 ns), so a double-sided attack gets at most 650K per
aggressor row. Each profile records whether its source hammered one neighbour or both; runs hammer that
way unless --single-sided or --double-sided says otherwise.

Every victim row stores data words as SECDED (72,64) codewords, extended Hamming or Hsiao (see `ecc.py`).
Physical cell i of a word holds data bit i (i < 64) or check bit i - 64 under either code, so the two codes
see the same flips in data cells. After hammering, each word's error pattern decides the outcome: 1 flip
corrected; 2 flips detected (a machine check); 3 or more flips miscorrected (silent corruption) or
detected, depending on the syndrome, and so on the code.

Sources
- Y. Kim, R. Daly, J. Kim, C. Fallin, J. H. Lee, D. Lee, C. Wilkerson, K. Lai, O. Mutlu, "Flipping Bits
  in Memory Without Accessing Them: An Experimental Study of DRAM Disturbance Errors", ISCA 2014, abstract:
  DDR3 errors in 110 of 129 modules, "as few as 139K accesses to induce an error" and "up to one in every
  1.7K cells is susceptible to errors" (profile `ddr3-kim2014`).
- K. Park, S. Baeg, S.-J. Wen, R. Wong, "Active-Precharge Hammering on a Row Induced Failure in DDR3
  SDRAMs under 3x nm Technology", IEEE IIRW 2014: a cell failed after only 98K accesses to a row,
  7.54 % of the 1,300K accesses the specification permits (profile `ddr3-park2014`, activation cap).
- J. S. Kim, M. Patel, A. G. Yaglikci, H. Hassan, R. Azizi, L. Orosa, O. Mutlu, "Revisiting RowHammer:
  An Experimental Analysis of Modern DRAM Devices and Mitigation Techniques", ISCA 2020, abstract: as few
  as 9.6K activations (4.8K to each of two rows) in the most vulnerable chip (profile `lpddr4-kim2020`).
- U. Drepper, "What Every Programmer Should Know About Memory", 2007, section 2.2.3: each DRAM cell
  must be refreshed every 64 ms according to JEDEC. LPDDR devices refresh every 32 ms (tREFW = 32 ms at
  up to 85 degrees C; the LPDDR4 standard JESD209-4 was not read, see docs/lab/rowhammer.md).
The density of vulnerable cells (where no source gives one), the spread of their thresholds, the share of
true/anti cells, additive disturbance from both neighbours and LPDDR4's tRC are assumptions (options).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from pyrovisor.errors import ConfigError
from pyrovisor.lab import ecc
from pyrovisor.lab.bitflips import BitFlip
from pyrovisor.lab.model import Assumption, LabResult, Table
from pyrovisor.lab.stats import Estimate, add_seed_arguments, estimate, seeds_of

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

REFRESH_WINDOW_MS = 64.0  # DDR3/DDR4 (JEDEC, via Drepper 2007)
LPDDR4_REFRESH_WINDOW_MS = 32.0  # LPDDR4 at up to 85 degrees C
DDR3_ACTIVATIONS_PER_WINDOW = 1_300_000  # Park et al. 2014: accesses the specification permits per 64 ms
DEFAULT_ROW_CYCLE_NS = REFRESH_WINDOW_MS * 1e6 / DDR3_ACTIVATIONS_PER_WINDOW  # tRC implied by Park: 49.23 ns
DEFAULT_VULNERABLE_FRACTION = 1e-3  # assumed where a profile publishes none
BYTES_PER_MIB = 1 << 20


def activations_per_window(refresh_window_ms: float, row_cycle_ns: float) -> int:
    """ACT_max = tREFW / tRC, the activations one bank can receive within one refresh window."""
    return math.floor(refresh_window_ms * 1e6 / row_cycle_ns + 1e-6)


@dataclass(frozen=True)
class DramProfile:
    """A published first-flip threshold HC_first: activations of a victim's adjacent rows within one window."""

    key: str
    description: str
    first_flip_activations: int
    double_sided: bool  # how the source hammered: both neighbours of the victim (True) or one
    refresh_window_ms: float
    source: str  # who published HC_first
    quote: str
    label: str  # the source in a plot legend
    susceptible_fraction: float | None = None  # published share of cells that can flip, if the source gives one

    @property
    def aggressors(self) -> int:
        return 2 if self.double_sided else 1

    @property
    def standard_activation_cap(self) -> int:
        """ACT_max of the profile's standard refresh window at the default tRC."""
        return activations_per_window(self.refresh_window_ms, DEFAULT_ROW_CYCLE_NS)

    @property
    def default_threshold_decades(self) -> float:
        """d such that the vulnerable cells' thresholds end at the standard window's activation cap."""
        return math.log10(self.standard_activation_cap / self.first_flip_activations)


PROFILES: dict[str, DramProfile] = {
    "ddr3-park2014": DramProfile(
        "ddr3-park2014", "DDR3, 3x nm (Park et al., IIRW 2014)", 98_000, False, REFRESH_WINDOW_MS,
        "Park et al., IIRW 2014", "a cell failed after 98K accesses to one row", "Park 2014"),
    "ddr3-kim2014": DramProfile(
        "ddr3-kim2014", "DDR3 modules (Kim et al., ISCA 2014)", 139_000, False, REFRESH_WINDOW_MS,
        "Kim et al., ISCA 2014 (abstract)",
        "as few as 139K accesses to induce an error; up to one in every 1.7K cells susceptible", "Kim 2014",
        susceptible_fraction=1 / 1_700),
    "lpddr4-kim2020": DramProfile(
        "lpddr4-kim2020", "most vulnerable LPDDR4 chip (Kim et al., ISCA 2020)", 9_600, True,
        LPDDR4_REFRESH_WINDOW_MS, "Kim et al., ISCA 2020 (abstract)",
        "9.6K activations: 4.8K to each of two aggressor rows", "Kim 2020"),
}


@dataclass(frozen=True)
class BankSlice:
    """The simulated victim rows, the DRAM timing, and the assumptions about their cells."""

    victim_rows: int = 64
    words_per_row: int = 1024  # 8 KiB of data per row across a rank
    first_flip_activations: int = 98_000
    vulnerable_fraction: float = DEFAULT_VULNERABLE_FRACTION
    threshold_decades: float = 1.5  # vulnerable thresholds span [HC_first, HC_first * 10**decades]
    true_cell_fraction: float = 0.5
    refresh_window_ms: float = REFRESH_WINDOW_MS
    row_cycle_ns: float = DEFAULT_ROW_CYCLE_NS
    seed: int = 1

    def __post_init__(self) -> None:
        if self.victim_rows < 1 or self.words_per_row < 1:
            raise ConfigError("bank slice", (self.victim_rows, self.words_per_row), "needs at least one word")
        if not 0.0 < self.vulnerable_fraction <= 1.0:
            raise ConfigError("--vulnerable-fraction", self.vulnerable_fraction, "must be in (0, 1]")
        if self.first_flip_activations < 1:
            raise ConfigError("threshold", self.first_flip_activations, "must be positive")
        if self.threshold_decades < 0:
            raise ConfigError("--threshold-decades", self.threshold_decades, "must not be negative")
        if not 0.0 <= self.true_cell_fraction <= 1.0:
            raise ConfigError("--true-cell-fraction", self.true_cell_fraction, "must be in [0, 1]")
        if self.refresh_window_ms <= 0 or self.row_cycle_ns <= 0:
            raise ConfigError("timing", (self.refresh_window_ms, self.row_cycle_ns), "must be positive")
        if self.max_activations_per_window < 1:
            raise ConfigError("timing", (self.refresh_window_ms, self.row_cycle_ns),
                              "not one activation fits in a refresh window")

    @property
    def max_activations_per_window(self) -> int:
        return activations_per_window(self.refresh_window_ms, self.row_cycle_ns)

    @property
    def words(self) -> int:
        return self.victim_rows * self.words_per_row

    @property
    def mebibytes(self) -> float:
        """Data held by the victim rows, in MiB (8 bytes per ECC word)."""
        return self.words * 8 / BYTES_PER_MIB

    def reached_share(self, disturbance: int) -> float:
        """clamp(log10(D / HC_first) / d, 0, 1): the share of vulnerable cells whose threshold D reaches."""
        if disturbance < self.first_flip_activations:
            return 0.0
        if self.threshold_decades == 0:
            return 1.0
        return min(1.0, math.log10(disturbance / self.first_flip_activations) / self.threshold_decades)

    def flip_probability(self, disturbance: int, charged_share: float = 0.5) -> float:
        """p_flip(D) = v * clamp(log10(D / HC_first) / d, 0, 1) * c, for one cell in one refresh window."""
        return self.vulnerable_fraction * self.reached_share(disturbance) * charged_share


@dataclass(frozen=True)
class CodeOutcome:
    """What one SECDED code makes of the flips of one hammering experiment."""

    code: str
    flipped_bits: int
    words_by_flips: tuple[int, ...]  # index k: words with k flipped bits (last bucket: k or more)
    corrected: int
    detected: int
    silent: int
    flip_positions: tuple[tuple[int, tuple[int, ...]], ...] = field(repr=False, default=())  # codeword positions


@dataclass(frozen=True)
class HammerOutcome:
    """One hammering experiment on every victim row of a slice, read back through each code."""

    activations_per_aggressor: int
    disturbance: int  # activations of the adjacent rows seen by each victim within the window
    capped: bool
    time_ms: float  # time the activations take at tRC
    words: int
    by_code: tuple[CodeOutcome, ...]

    def code(self, key: str) -> CodeOutcome:
        for outcome in self.by_code:
            if outcome.code == key:
                return outcome
        raise KeyError(key)

    # The first code's figures, for callers that use one code.
    @property
    def flipped_bits(self) -> int:
        return self.by_code[0].flipped_bits

    @property
    def words_by_flips(self) -> tuple[int, ...]:
        return self.by_code[0].words_by_flips

    @property
    def corrected(self) -> int:
        return self.by_code[0].corrected

    @property
    def detected(self) -> int:
        return self.by_code[0].detected

    @property
    def silent(self) -> int:
        return self.by_code[0].silent

    @property
    def flip_positions(self) -> tuple[tuple[int, tuple[int, ...]], ...]:
        return self.by_code[0].flip_positions

    def data_flips(self, base: int = 0) -> list[BitFlip]:
        """The flipped *data* cells as byte/bit flips of a linear buffer holding the slice's words in order."""
        code = ecc.CODES[self.by_code[0].code]
        data_bit = {position: bit for bit, position in enumerate(code.data_positions)}
        flips = []
        for word, positions in self.flip_positions:
            for position in positions:
                bit = data_bit.get(position)
                if bit is not None:
                    flips.append(BitFlip(base + word * 8 + bit // 8, bit % 8))
        return flips


FLIP_BUCKETS = 4  # 0, 1, 2, 3+ flipped bits per word


class DramBank:
    """Victim rows of one bank: the vulnerable cells (threshold, true/anti), and the words stored in them.

    Cell i of a word holds data bit i for i < 64 and check bit i - 64 (in the code's check order) above."""

    def __init__(self, slice_: BankSlice, data: str = "random",
                 codes: Sequence[ecc.SecdedCode] = (ecc.HAMMING,)) -> None:
        if not codes:
            raise ConfigError("--code", (), "name at least one code")
        self.slice = slice_
        self.codes = tuple(codes)
        rng = np.random.default_rng(slice_.seed)
        words = slice_.words
        cells = np.flatnonzero(rng.random(words * ecc.CODEWORD_BITS) < slice_.vulnerable_fraction)
        spread = 10.0 ** (rng.random(len(cells)) * slice_.threshold_decades)
        thresholds = slice_.first_flip_activations * spread
        true_cells = rng.random(len(cells)) < slice_.true_cell_fraction
        self.data_bits = _data_bits(data, words, rng)
        # The weakest cell of the slice defines HC_first: pin the weakest vulnerable data cell exactly there
        # (a data cell holds the same bit under every code), oriented to flip. With none, make one.
        data_cells = np.flatnonzero(cells % ecc.CODEWORD_BITS < ecc.WORD_BITS)
        if len(data_cells):
            weakest = int(data_cells[np.argmin(thresholds[data_cells])])
        else:
            cells, thresholds, true_cells = (np.append(cells, 0), np.append(thresholds, np.inf),
                                             np.append(true_cells, False))
            weakest = len(cells) - 1
        thresholds[weakest] = float(slice_.first_flip_activations)
        word, cell = divmod(int(cells[weakest]), ecc.CODEWORD_BITS)
        true_cells[weakest] = bool(self.data_bits[word, cell] == 1)
        self.cells = cells  # flat index: word * 72 + cell
        self.thresholds = thresholds
        self.true_cells = true_cells
        self._word_of_cell = cells // ecc.CODEWORD_BITS
        self._cell_in_word = cells % ecc.CODEWORD_BITS
        self._charged = {code.key: self._stored(code) == true_cells.astype(np.uint8) for code in self.codes}

    def cell_positions(self, code: ecc.SecdedCode) -> np.ndarray:
        """The codeword position of each physical cell 0..71 of a word under `code`."""
        return np.array(code.data_positions + code.check_positions, dtype=np.int64)

    def codewords(self, code: ecc.SecdedCode) -> np.ndarray:
        """The (words, 72) codeword bits stored under `code`, indexed by codeword position."""
        return code.encode_bits(self.data_bits)

    def _stored(self, code: ecc.SecdedCode) -> np.ndarray:
        """The bit each vulnerable cell holds: its data bit, or (check cells) its word's check bit."""
        stored = np.zeros(len(self.cells), dtype=np.uint8)
        data = self._cell_in_word < ecc.WORD_BITS
        stored[data] = self.data_bits[self._word_of_cell[data], self._cell_in_word[data]]
        check = ~data
        if check.any():
            words, row = np.unique(self._word_of_cell[check], return_inverse=True)
            codewords = code.encode_bits(self.data_bits[words])
            positions = self.cell_positions(code)[self._cell_in_word[check]]
            stored[check] = codewords[row, positions]
        return stored

    def is_true_cell(self, word: int, cell: int) -> bool | None:
        """Whether a vulnerable cell is a true cell (charged as 1); None for a cell that cannot flip."""
        found = np.flatnonzero(self.cells == word * ecc.CODEWORD_BITS + cell)
        return bool(self.true_cells[found[0]]) if len(found) else None

    def hammer(self, activations_per_aggressor: int, double_sided: bool = True) -> HammerOutcome:
        """Hammer the neighbours of every victim row for one refresh window and read back every word."""
        if activations_per_aggressor < 0:
            raise ConfigError("hammer count", activations_per_aggressor, "must not be negative")
        aggressors = 2 if double_sided else 1
        budget = self.slice.max_activations_per_window // aggressors
        capped = activations_per_aggressor > budget
        per_aggressor = min(activations_per_aggressor, budget)
        disturbance = per_aggressor * aggressors
        reached = self.thresholds <= disturbance
        return HammerOutcome(
            activations_per_aggressor=per_aggressor,
            disturbance=disturbance,
            capped=capped,
            time_ms=disturbance * self.slice.row_cycle_ns / 1e6,
            words=self.slice.words,
            by_code=tuple(self._read_back(code, reached & self._charged[code.key]) for code in self.codes),
        )

    def _read_back(self, code: ecc.SecdedCode, flipped: np.ndarray) -> CodeOutcome:
        words = self._word_of_cell[flipped]
        positions = self.cell_positions(code)[self._cell_in_word[flipped]]
        hit_words, row = np.unique(words, return_inverse=True)
        errors = np.zeros((len(hit_words), ecc.CODEWORD_BITS), dtype=bool)
        errors[row, positions] = True
        outcomes = code.error_mask_outcomes(errors)
        flips_per_word = errors.sum(axis=1)
        buckets = np.bincount(np.minimum(flips_per_word, FLIP_BUCKETS - 1), minlength=FLIP_BUCKETS)
        buckets[0] += self.slice.words - len(hit_words)
        return CodeOutcome(
            code=code.key,
            flipped_bits=int(flips_per_word.sum()),
            words_by_flips=tuple(int(b) for b in buckets),
            corrected=int(np.count_nonzero(outcomes == ecc.CORRECTED)),
            detected=int(np.count_nonzero(outcomes == ecc.DETECTED)),
            silent=int(np.count_nonzero(outcomes == ecc.SILENT)),
            flip_positions=_positions_by_word(hit_words, errors),
        )


def _positions_by_word(words: np.ndarray, errors: np.ndarray) -> tuple[tuple[int, tuple[int, ...]], ...]:
    if len(words) == 0:
        return ()
    rows, positions = np.nonzero(errors)
    split = np.searchsorted(rows, np.arange(1, len(words)))
    return tuple((int(word), tuple(int(p) for p in group))
                 for word, group in zip(words, np.split(positions, split), strict=True))


def _data_bits(pattern: str, words: int, rng: np.random.Generator) -> np.ndarray:
    if pattern == "random":
        return rng.integers(0, 2, size=(words, ecc.WORD_BITS), dtype=np.uint8)
    if pattern == "ones":
        return np.ones((words, ecc.WORD_BITS), dtype=np.uint8)
    if pattern == "zeros":
        return np.zeros((words, ecc.WORD_BITS), dtype=np.uint8)
    if pattern == "checkerboard":
        row = np.arange(ecc.WORD_BITS, dtype=np.uint8) & 1
        return np.tile(row, (words, 1))
    raise ConfigError("--data", pattern, "choose random, ones, zeros or checkerboard")


def default_hammer_counts(first_flip_activations: int, cap: int, aggressors: int) -> list[int]:
    """Per-aggressor counts for disturbances from half the first-flip threshold up to the window's cap."""
    disturbances = [first_flip_activations * m for m in (0.5, 1, 2, 5, 10)] + [cap]
    return sorted({int(min(d, cap)) // aggressors for d in disturbances if d > 0})


def first_flip_per_aggressor(first_flip_activations: int, double_sided: bool) -> int:
    """The fewest activations per aggressor row that bring a victim to HC_first."""
    return -(-first_flip_activations // (2 if double_sided else 1))


# --- The experiment over several seeds ------------------------------------------------------------------------

@dataclass(frozen=True)
class HammerPoint:
    """One hammer count over all seeds: the deterministic part, and each code's counts as estimates."""

    activations_per_aggressor: int
    disturbance: int
    capped: bool
    time_ms: float
    flip_probability: float
    flipped_bits: dict[str, Estimate]
    corrected: dict[str, Estimate]
    detected: dict[str, Estimate]
    silent: dict[str, Estimate]


@dataclass(frozen=True)
class Experiment:
    profile: DramProfile
    slice: BankSlice
    double_sided: bool
    codes: tuple[ecc.SecdedCode, ...]
    seeds: tuple[int, ...]
    points: tuple[HammerPoint, ...]


def run_experiment(profile: DramProfile, slice_: BankSlice, double_sided: bool, counts: Sequence[int],
                   codes: Sequence[ecc.SecdedCode], seeds: Sequence[int], data: str = "random") -> Experiment:
    """Hammer a fresh bank (new cells, data and orientations) per seed at every count; estimates over seeds."""
    banks = (DramBank(replace(slice_, seed=seed), data, codes) for seed in seeds)
    runs = [[bank.hammer(count, double_sided) for count in counts] for bank in banks]
    points = []
    for outcomes in zip(*runs, strict=True):
        first = outcomes[0]
        points.append(HammerPoint(
            activations_per_aggressor=first.activations_per_aggressor,
            disturbance=first.disturbance, capped=first.capped, time_ms=first.time_ms,
            flip_probability=slice_.flip_probability(first.disturbance),
            flipped_bits=_over_seeds(outcomes, codes, "flipped_bits"),
            corrected=_over_seeds(outcomes, codes, "corrected"), detected=_over_seeds(outcomes, codes, "detected"),
            silent=_over_seeds(outcomes, codes, "silent")))
    return Experiment(profile, slice_, double_sided, tuple(codes), tuple(seeds), tuple(points))


def _over_seeds(outcomes: Sequence[HammerOutcome], codes: Sequence[ecc.SecdedCode],
                field_name: str) -> dict[str, Estimate]:
    """One count of every code's outcomes (flipped_bits, corrected, ...) as an estimate over the seeds' runs."""
    return {code.key: estimate([float(getattr(o.code(code.key), field_name)) for o in outcomes]) for code in codes}


# --- The command ----------------------------------------------------------------------------------------------

ECC_FLIP_COUNTS = (1, 2, 3, 4, 5, 6)


class RowhammerModel:
    name = "rowhammer"
    summary = "Rowhammer flips in a DRAM bank against SECDED (72,64) ECC: corrected, machine check, silent"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--profile", choices=sorted(PROFILES), default="ddr3-park2014",
                            help="published first-flip threshold to use (default: %(default)s)")
        parser.add_argument("--hammer-counts", default=None,
                            help="comma-separated activations per aggressor row (default: a sweep)")
        sides = parser.add_mutually_exclusive_group()
        sides.add_argument("--single-sided", dest="sides", action="store_const", const="single",
                           help="hammer one neighbour of each victim (default: as the profile's source did)")
        sides.add_argument("--double-sided", dest="sides", action="store_const", const="double",
                           help="hammer both neighbours of each victim (default: as the profile's source did)")
        parser.add_argument("--code", choices=("hamming", "hsiao", "both"), default="both",
                            help="SECDED code of the memory controller (default: %(default)s)")
        parser.add_argument("--rows", type=int, default=64, help="victim rows simulated (default: %(default)s)")
        parser.add_argument("--words-per-row", type=int, default=1024,
                            help="64-bit ECC words per row (default: %(default)s, 8 KiB)")
        parser.add_argument("--vulnerable-fraction", type=float, default=None,
                            help="share of vulnerable cells, thresholds within the spread above HC_first (default: "
                                 f"the profile's published share, else {DEFAULT_VULNERABLE_FRACTION:g}, assumed)")
        parser.add_argument("--threshold-decades", type=float, default=None,
                            help="spread of thresholds above HC_first, in decades (assumed; default: up to the "
                                 "activation cap of the profile's refresh window)")
        parser.add_argument("--true-cell-fraction", type=float, default=0.5,
                            help="share of true cells (charged as 1; assumed; default: %(default)s)")
        parser.add_argument("--refresh-window-ms", type=float, default=None,
                            help="refresh window tREFW in ms (default: the profile's, 64 for DDR3, 32 for LPDDR4)")
        parser.add_argument("--row-cycle-ns", type=float, default=DEFAULT_ROW_CYCLE_NS,
                            help="tRC, the time per activation; ACT_max = tREFW / tRC (default: %(default).4g, "
                                 "Park et al.'s 1,300K per 64 ms)")
        parser.add_argument("--data", default="random", choices=["random", "ones", "zeros", "checkerboard"],
                            help="data pattern written before hammering (default: %(default)s)")
        add_seed_arguments(parser, first=1)

    def run(self, args: argparse.Namespace) -> LabResult:
        profile = PROFILES[args.profile]
        double_sided = profile.double_sided if args.sides is None else args.sides == "double"
        codes = tuple(ecc.CODES.values()) if args.code == "both" else (ecc.CODES[args.code],)
        vulnerable = (args.vulnerable_fraction if args.vulnerable_fraction is not None
                      else profile.susceptible_fraction or DEFAULT_VULNERABLE_FRACTION)
        decades = (args.threshold_decades if args.threshold_decades is not None
                   else profile.default_threshold_decades)
        window = args.refresh_window_ms if args.refresh_window_ms is not None else profile.refresh_window_ms
        slice_ = BankSlice(victim_rows=args.rows, words_per_row=args.words_per_row,
                           first_flip_activations=profile.first_flip_activations, vulnerable_fraction=vulnerable,
                           threshold_decades=decades, true_cell_fraction=args.true_cell_fraction,
                           refresh_window_ms=window, row_cycle_ns=args.row_cycle_ns)
        if args.hammer_counts:
            try:
                counts = [int(c) for c in args.hammer_counts.split(",")]
            except ValueError as exc:
                raise ConfigError("--hammer-counts", args.hammer_counts, "give integers separated by commas") from exc
        else:
            counts = default_hammer_counts(profile.first_flip_activations, slice_.max_activations_per_window,
                                           2 if double_sided else 1)
        seeds = tuple(seeds_of(args))
        experiment = run_experiment(profile, slice_, double_sided, counts, codes, seeds, args.data)
        shares = [[code.exact_outcome_fractions(k) for k in ECC_FLIP_COUNTS] for code in codes]
        return LabResult(
            tables=(*(hammer_table(experiment, code) for code in codes),
                    *(ecc_table(code, rows) for code, rows in zip(codes, shares, strict=True))),
            plot=lambda figure: plot(figure, experiment, shares),
            summary=_summary(experiment, shares),
            headline=headline(experiment),
            assumptions=assumptions(experiment, args),
        )


def headline(experiment: Experiment) -> tuple[tuple[str, float | Estimate], ...]:
    """First flip per aggressor row, then flips and bad words per MiB of victim rows at the most hammering."""
    first = first_flip_per_aggressor(experiment.profile.first_flip_activations, experiment.double_sided)
    figures: list[tuple[str, float | Estimate]] = [("first flip ACTs/aggressor", float(first))]
    if not experiment.points:
        return tuple(figures)
    top = max(experiment.points, key=lambda p: p.disturbance)
    mib = experiment.slice.mebibytes
    codes = experiment.codes
    figures.append(("flips/MiB at max", top.flipped_bits[codes[0].key].divided_by(mib)))
    if len(codes) == 1:
        figures.append(("MCE words/MiB at max", top.detected[codes[0].key].divided_by(mib)))
        figures.append(("silent words/MiB at max", top.silent[codes[0].key].divided_by(mib)))
    else:
        figures.extend((f"silent words/MiB at max, {code.key}", top.silent[code.key].divided_by(mib))
                       for code in codes)
    return tuple(figures)


def assumptions(experiment: Experiment, args: argparse.Namespace) -> tuple[Assumption, ...]:
    profile, slice_ = experiment.profile, experiment.slice
    lpddr = profile.refresh_window_ms == LPDDR4_REFRESH_WINDOW_MS
    window_basis = ("LPDDR tREFW up to 85 C (Micron LPDDR2 datasheet; JESD209-4 itself not read)" if lpddr
                    else "JEDEC DDR3, via Drepper 2007")
    published_density = profile.susceptible_fraction is not None and args.vulnerable_fraction is None
    return (
        Assumption("HC_first (adjacent-row activations at the first flip)", profile.first_flip_activations,
                   profile.source),
        Assumption("hammering", "double-sided" if experiment.double_sided else "single-sided",
                   "the profile's source" if args.sides is None else "option"),
        Assumption("disturbance adds over both neighbours", True,
                   "assumed; Kim et al., ISCA 2020 count 9.6K as 4.8K to each of two rows"),
        Assumption("refresh window ms", slice_.refresh_window_ms,
                   window_basis if args.refresh_window_ms is None else "option"),
        Assumption("tRC ns", slice_.row_cycle_ns,
                   "Park et al., IIRW 2014 (1,300K per 64 ms)" if args.row_cycle_ns == DEFAULT_ROW_CYCLE_NS
                   and not lpddr else "assumed"),
        Assumption("activations per window (cap)", slice_.max_activations_per_window, "tREFW / tRC"),
        Assumption("vulnerable fraction", slice_.vulnerable_fraction,
                   profile.source if published_density else "assumed"),
        Assumption("threshold spread decades", slice_.threshold_decades,
                   "assumed (up to the standard window's cap)" if args.threshold_decades is None else "assumed"),
        Assumption("true-cell fraction", slice_.true_cell_fraction, "assumed"),
        *(Assumption(f"code {code.key}", code.name, code.source) for code in experiment.codes),
    )


def hammer_table(experiment: Experiment, code: ecc.SecdedCode) -> Table:
    slice_, profile = experiment.slice, experiment.profile
    rows = []
    for p in experiment.points:
        rows.append((f"{p.activations_per_aggressor:,}" + (" cap" if p.capped else ""), f"{p.disturbance:,}",
                     round(p.time_ms, 2), f"{p.flip_probability:.1e}", p.flipped_bits[code.key],
                     p.corrected[code.key], p.detected[code.key], p.silent[code.key]))
    sides = "double-sided" if experiment.double_sided else "single-sided"
    return Table(
        title=f"Hammering, {code.name}: {slice_.victim_rows} victim rows x {slice_.words_per_row} ECC words, "
              f"{sides}, {profile.description}",
        columns=("ACTs/aggressor", "ACTs/victim", "ms", "p_flip", "flips", "corrected", "MCE", "silent"),
        rows=tuple(rows),
        notes=("ACTs/victim: activations of the adjacent rows in one window; ms: time they take; p_flip: "
               "chance a cell flips (random data); corrected / MCE (machine check) / silent: words by ECC outcome; "
               f"counts are means over {len(experiment.seeds)} seeds [95 % interval].",
               f"HC_first = {profile.first_flip_activations:,} adjacent-row activations per "
               f"{slice_.refresh_window_ms:g} ms refresh window ({profile.source}: {profile.quote}); at most "
               f"{slice_.max_activations_per_window:,} activations fit in a window (tRC {slice_.row_cycle_ns:.4g} ns).",
               f"{slice_.vulnerable_fraction:.3g} of cells vulnerable, thresholds spread over "
               f"{slice_.threshold_decades:.3g} decades above HC_first, {slice_.true_cell_fraction:.0%} true cells."),
    )


def ecc_table(code: ecc.SecdedCode, shares: list[ecc.OutcomeFractions]) -> Table:
    return Table(
        title=f"SECDED outcome, {code.name}: k flipped bits in one word (uniform over positions)",
        columns=("flips/word", "patterns", "corrected", "MCE", "silent"),
        rows=tuple((s.flips, f"{s.patterns:,}", round(s.corrected, 4), round(s.detected, 4), round(s.silent, 4))
                   for s in shares),
        notes=("Exact shares of all C(72, k) placements, counted by syndrome (no sampling): k = 1 and 2 follow from "
               "SEC-DED; from k = 3 on they depend on the code's columns.",),
    )


def _summary(experiment: Experiment, shares: list[list[ecc.OutcomeFractions]]) -> tuple[str, ...]:
    profile = experiment.profile
    first = first_flip_per_aggressor(profile.first_flip_activations, experiment.double_sided)
    sides = "both neighbours" if experiment.double_sided else "one neighbour"
    lines = [f"first flips at {profile.first_flip_activations:,} adjacent activations: {first:,} per aggressor "
             f"row hammering {sides} "
             f"({profile.first_flip_activations * experiment.slice.row_cycle_ns / 1e6:.2f} ms of hammering)"]
    if experiment.points:
        top = max(experiment.points, key=lambda p: p.disturbance)
        for code in experiment.codes:
            lines.append(f"at {top.disturbance:,} activations, {code.name}: {top.detected[code.key]:.3g} machine "
                         f"checks and {top.silent[code.key]:.3g} silently corrupted words out of "
                         f"{experiment.slice.words:,}")
    three = ", ".join(f"{code.name} {rows[2].silent:.1%}"
                      for code, rows in zip(experiment.codes, shares, strict=True))
    lines.append(f"3 flips in one word end silent: {three}")
    return tuple(lines)


# --- The plot -------------------------------------------------------------------------------------------------

_CODE_STYLE = {"hamming": {"linestyle": "-", "fillstyle": "full", "markersize": 5},
               "hsiao": {"linestyle": "--", "fillstyle": "none", "markersize": 9}}


def _error_bars(values: list[Estimate]) -> tuple[list[float], list[list[float]]]:
    means = [v.mean for v in values]
    return means, [[max(v.mean - max(v.low, 0.0), 0.0) for v in values], [v.high - v.mean for v in values]]


def plot(figure: Figure, experiment: Experiment, shares: list[list[ecc.OutcomeFractions]]) -> None:
    axes = figure.subplot_mosaic([["flips", "shares"], ["words", "shares"]], sharex=False)
    flips_axes, words_axes, shares_axes = axes["flips"], axes["words"], axes["shares"]
    x = [max(p.disturbance, 1) for p in experiment.points]
    first_code = experiment.codes[0].key
    means, bars = _error_bars([p.flipped_bits[first_code] for p in experiment.points])
    flips_axes.errorbar(x, means, yerr=bars, fmt="o-", color="black", capsize=3, label="flipped bits (model)")
    flips_axes.set_xscale("log")
    flips_axes.set_yscale("symlog", linthresh=1)
    flips_axes.set_ylim(bottom=0, top=max([1.0, *means]) * 4)
    _published_points(flips_axes, experiment)
    flips_axes.set_ylabel("flipped bits")
    flips_axes.set_title(f"Hammering ({experiment.profile.key}, {len(experiment.seeds)} seeds)", fontsize="medium")
    flips_axes.legend(fontsize="xx-small", loc="best")
    words_axes.sharex(flips_axes)

    colours = {"corrected": "tab:green", "MCE": "tab:orange", "silent": "tab:red"}
    markers = {"corrected": "o", "MCE": "^", "silent": "s"}
    for code in experiment.codes:
        style = _CODE_STYLE[code.key]
        for label, values in (("corrected", [p.corrected[code.key] for p in experiment.points]),
                              ("MCE", [p.detected[code.key] for p in experiment.points]),
                              ("silent", [p.silent[code.key] for p in experiment.points])):
            means, bars = _error_bars(values)
            words_axes.errorbar(x, means, yerr=bars, color=colours[label], marker=markers[label], capsize=2,
                                linestyle=style["linestyle"], fillstyle=style["fillstyle"],
                                markersize=style["markersize"], zorder=3 if code.key == "hamming" else 2,
                                label=f"{label}, {code.key}")
    words_axes.set_xscale("log")
    words_axes.set_yscale("symlog", linthresh=1)
    most = max([1.0, *(p.corrected[code.key].high for p in experiment.points for code in experiment.codes)])
    words_axes.set_ylim(bottom=0, top=most * 40)  # room for the legend above the curves
    words_axes.set_xlabel(f"activations of adjacent rows in one {experiment.slice.refresh_window_ms:g} ms window")
    words_axes.set_ylabel("ECC words")
    words_axes.legend(fontsize="xx-small", ncol=2, loc="upper left", title="ECC words", title_fontsize="xx-small")
    _share_bars(shares_axes, experiment.codes, shares)


def _published_points(axes: Axes, experiment: Experiment) -> None:
    """Each source's first flip: one flipped bit at its HC_first (the one point each abstract justifies).

    With the Kim et al. 2014 profile, also its density: 1 in 1.7K cells susceptible, as a count of cells of
    this slice. That is a bound for data that charges every cell; random data charges half of them."""
    current = experiment.profile
    for profile, marker in zip(PROFILES.values(), ("P", "*", "D"), strict=True):
        highlight = profile.key == current.key
        axes.plot([profile.first_flip_activations], [1], linestyle="none", marker=marker,
                  markersize=12 if highlight else 8, color="tab:blue" if highlight else "grey", zorder=4,
                  label=f"{profile.label}: first flip, {profile.first_flip_activations / 1000:g}K")
    if current.susceptible_fraction is not None:
        cells = experiment.slice.words * ecc.CODEWORD_BITS
        axes.axhline(cells * current.susceptible_fraction, color="tab:blue", linestyle=":", linewidth=1,
                     label=f"{current.label}: 1 in {1 / current.susceptible_fraction:,.0f} cells susceptible")
        axes.set_ylim(top=cells * current.susceptible_fraction * 4)


def _share_bars(axes: Axes, codes: tuple[ecc.SecdedCode, ...], shares: list[list[ecc.OutcomeFractions]]) -> None:
    width = 0.8 / len(codes)
    colours = {"corrected": "tab:green", "detected (MCE)": "tab:orange", "silent": "tab:red"}
    for index, (code, rows) in enumerate(zip(codes, shares, strict=True)):
        ks = np.array([s.flips for s in rows], dtype=float) + (index - (len(codes) - 1) / 2) * width
        bottom = np.zeros(len(rows))
        for label, values in (("corrected", [s.corrected for s in rows]),
                              ("detected (MCE)", [s.detected for s in rows]),
                              ("silent", [s.silent for s in rows])):
            heights = np.array(values)
            axes.bar(ks, heights, width=width * 0.95, bottom=bottom, color=colours[label],
                     hatch="//" if code.key == "hsiao" else None, edgecolor="white" if code.key == "hamming"
                     else "black", linewidth=0.5, label=f"{code.key}: {label}")
            bottom += heights
    three = ECC_FLIP_COUNTS.index(3)
    for index, rows in enumerate(shares):
        value = rows[three].silent
        axes.text(3 + (index - (len(codes) - 1) / 2) * width, 1 - value / 2, f"{value:.0%}", rotation=90,
                  ha="center", va="center", fontsize="x-small", color="white", fontweight="bold")
    axes.set_xticks(list(ECC_FLIP_COUNTS))
    axes.set_xlabel("flipped bits in one 72-bit word")
    axes.set_ylabel("share of error patterns")
    axes.set_title("SECDED (72,64) outcome" + (" (hatched: Hsiao)" if len(codes) > 1 else f", {codes[0].key}"),
                   fontsize="medium")
    axes.set_ylim(0, 1.08)
    axes.legend(fontsize="xx-small", loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)


MODEL = RowhammerModel()
