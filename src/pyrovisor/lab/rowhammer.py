"""Rowhammer against SECDED ECC: a DRAM bank slice whose hammered rows flip bits in 72-bit ECC words.

Model. A victim row sits between aggressor rows. Within one refresh window (64 ms, the JEDEC DDR3/DDR4
retention period after which every row has been refreshed) the victim accumulates a disturbance

    D = sum of the activations of its adjacent rows in the window   (2 N when both are hammered N times)

and a cell flips when D reaches its own threshold and it holds its charged value (a disturbance only
drains charge, so a "true" cell can flip 1 -> 0 and an "anti" cell 0 -> 1). Refresh restores the charge,
so the count starts again in every window. The weakest cell of the slice has the chip's published
first-flip threshold HC_first; other vulnerable cells (a share v of all cells) have thresholds spread
log-uniformly over d decades above it, so the probability that a given cell flips in one window is

    p_flip(D) = v * clamp(log10(D / HC_first) / d, 0, 1) * c

with c the share of cells that hold their charged value (1/2 for random data).
The activation count within one window is capped by the DRAM timing: at most tREFW / tRC activations,
1,300K for DDR3 in Park et al. (so a double-sided attack gets at most 650K per aggressor row).

Every victim row stores data words as SECDED (72,64) codewords (see `ecc.py`); after hammering, each
word's error pattern decides the outcome: 1 flip corrected; 2 flips detected (a machine check); 3 or
more flips mostly miscorrected (silent corruption) or detected, depending on the syndrome.

Sources
- Y. Kim, R. Daly, J. Kim, C. Fallin, J. H. Lee, D. Lee, C. Wilkerson, K. Lai, O. Mutlu, "Flipping Bits
  in Memory Without Accessing Them: An Experimental Study of DRAM Disturbance Errors", ISCA 2014:
  disturbance errors in 110 of 129 DDR3 modules (abstract). Used for the mechanism (activating a row
  disturbs its neighbours; refresh resets it).
- K. Park, S. Baeg, S.-J. Wen, R. Wong, "Active-Precharge Hammering on a Row Induced Failure in DDR3
  SDRAMs under 3x nm Technology", IEEE IIRW 2014: a cell failed after only 98K accesses to a row,
  7.54 % of the 1,300K accesses the specification permits (profile `ddr3-park2014`, activation cap).
- J. S. Kim, M. Patel, A. G. Yaglikci, H. Hassan, R. Azizi, L. Orosa, O. Mutlu, "Revisiting RowHammer:
  An Experimental Analysis of Modern DRAM Devices and Mitigation Techniques", ISCA 2020: as few as 9.6K
  activations (4.8K to each of two rows) in the most vulnerable chip (profile `lpddr4-kim2020`).
- U. Drepper, "What Every Programmer Should Know About Memory", 2007, section 2.2.3: each DRAM cell
  must be refreshed every 64 ms according to JEDEC.
The density of vulnerable cells, the spread of their thresholds and the share of true/anti cells are
assumptions of this model (options), not published figures.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pyrovisor.errors import ConfigError
from pyrovisor.lab import ecc
from pyrovisor.lab.bitflips import BitFlip
from pyrovisor.lab.model import LabResult, Table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REFRESH_WINDOW_MS = 64.0
DDR3_ACTIVATIONS_PER_WINDOW = 1_300_000  # Park et al. 2014: accesses the specification permits per 64 ms


@dataclass(frozen=True)
class DramProfile:
    """A published first-flip threshold: total activations of the adjacent rows within one refresh window."""

    key: str
    description: str
    first_flip_activations: int
    double_sided: bool
    source: str


PROFILES: dict[str, DramProfile] = {
    "ddr3-park2014": DramProfile(
        "ddr3-park2014", "DDR3, 3x nm (Park et al., IIRW 2014)", 98_000, False,
        "a cell failed after 98K accesses to one row"),
    "lpddr4-kim2020": DramProfile(
        "lpddr4-kim2020", "most vulnerable LPDDR4 chip (Kim et al., ISCA 2020)", 9_600, True,
        "9.6K activations: 4.8K to each of two aggressor rows"),
}


@dataclass(frozen=True)
class BankSlice:
    """The simulated victim rows and the assumptions about their cells."""

    victim_rows: int = 64
    words_per_row: int = 1024  # 8 KiB of data per row across a rank
    first_flip_activations: int = 98_000
    vulnerable_fraction: float = 1e-3  # assumed
    threshold_decades: float = 1.5  # assumed: vulnerable thresholds span [HC_first, HC_first * 10**decades]
    true_cell_fraction: float = 0.5  # assumed
    max_activations_per_window: int = DDR3_ACTIVATIONS_PER_WINDOW
    seed: int = 1

    def flip_probability(self, disturbance: int, charged_share: float = 0.5) -> float:
        """p_flip(D) = v * clamp(log10(D / HC_first) / d, 0, 1) * c, for one cell in one refresh window."""
        if disturbance < self.first_flip_activations:
            return 0.0
        if self.threshold_decades == 0:
            reached = 1.0
        else:
            reached = min(1.0, np.log10(disturbance / self.first_flip_activations) / self.threshold_decades)
        return self.vulnerable_fraction * float(reached) * charged_share

    def __post_init__(self) -> None:
        if self.victim_rows < 1 or self.words_per_row < 1:
            raise ConfigError("bank slice", (self.victim_rows, self.words_per_row), "needs at least one word")
        if not 0.0 < self.vulnerable_fraction <= 1.0:
            raise ConfigError("--vulnerable-fraction", self.vulnerable_fraction, "must be in (0, 1]")
        if self.first_flip_activations < 1 or self.threshold_decades < 0:
            raise ConfigError("threshold", self.first_flip_activations, "must be positive")


@dataclass(frozen=True)
class HammerOutcome:
    """One hammering experiment on every victim row of a slice."""

    activations_per_aggressor: int
    disturbance: int  # activations of the adjacent rows seen by each victim within the window
    capped: bool
    flipped_bits: int
    words: int
    words_by_flips: tuple[int, ...]  # index k: words with k flipped bits (last bucket: k or more)
    corrected: int
    detected: int
    silent: int
    flip_positions: tuple[tuple[int, tuple[int, ...]], ...] = field(repr=False, default=())

    @property
    def time_ms(self) -> float:
        """Time the activations take at the tRC implied by the activation cap (tREFW / max activations)."""
        return self.disturbance * REFRESH_WINDOW_MS / DDR3_ACTIVATIONS_PER_WINDOW

    def data_flips(self, base: int = 0) -> list[BitFlip]:
        """The flipped *data* cells as byte/bit flips of a linear buffer holding the slice's words in order."""
        flips = []
        for word, positions in self.flip_positions:
            for position in positions:
                bit = _DATA_BIT.get(position)
                if bit is not None:
                    flips.append(BitFlip(base + word * 8 + bit // 8, bit % 8))
        return flips


_DATA_BIT = {position: bit for bit, position in enumerate(ecc.DATA_POSITIONS)}
FLIP_BUCKETS = 4  # 0, 1, 2, 3+ flipped bits per word


class DramBank:
    """Victim rows of one bank: per-cell thresholds and orientations, and the codewords stored in them."""

    def __init__(self, slice_: BankSlice, data: str = "random") -> None:
        self.slice = slice_
        rng = np.random.default_rng(slice_.seed)
        words = slice_.victim_rows * slice_.words_per_row
        shape = (words, ecc.CODEWORD_BITS)
        vulnerable = rng.random(shape) < slice_.vulnerable_fraction
        spread = 10.0 ** (rng.random(shape) * slice_.threshold_decades)
        self.thresholds = np.where(vulnerable, slice_.first_flip_activations * spread, np.inf)
        self.true_cells = rng.random(shape) < slice_.true_cell_fraction
        self.codewords = ecc.encode_bits(_data_bits(data, words, rng))
        # The weakest cell of the slice defines HC_first: pin one cell exactly there, oriented to flip.
        weakest = np.unravel_index(int(np.argmin(self.thresholds)), shape)
        self.thresholds[weakest] = float(slice_.first_flip_activations)
        self.true_cells[weakest] = bool(self.codewords[weakest] == 1)

    def hammer(self, activations_per_aggressor: int, double_sided: bool = True) -> HammerOutcome:
        """Hammer the neighbours of every victim row for one refresh window and read back every word."""
        if activations_per_aggressor < 0:
            raise ConfigError("hammer count", activations_per_aggressor, "must not be negative")
        aggressors = 2 if double_sided else 1
        budget = self.slice.max_activations_per_window // aggressors
        capped = activations_per_aggressor > budget
        per_aggressor = min(activations_per_aggressor, budget)
        disturbance = per_aggressor * aggressors
        charged = self.codewords == self.true_cells.astype(np.uint8)
        errors = charged & (self.thresholds <= disturbance)
        codes = ecc.error_mask_outcomes(errors)
        flips_per_word = errors.sum(axis=1)
        buckets = np.bincount(np.minimum(flips_per_word, FLIP_BUCKETS - 1), minlength=FLIP_BUCKETS)
        flipped_words = np.flatnonzero(flips_per_word)
        positions = tuple(
            (int(w), tuple(int(p) for p in np.flatnonzero(errors[w]))) for w in flipped_words
        )
        return HammerOutcome(
            activations_per_aggressor=per_aggressor,
            disturbance=disturbance,
            capped=capped,
            flipped_bits=int(flips_per_word.sum()),
            words=len(codes),
            words_by_flips=tuple(int(b) for b in buckets),
            corrected=int(np.count_nonzero(codes == 1)),
            detected=int(np.count_nonzero(codes == 2)),
            silent=int(np.count_nonzero(codes == 3)),
            flip_positions=positions,
        )


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


class RowhammerModel:
    name = "rowhammer"
    summary = "Rowhammer flips in a DRAM bank against SECDED (72,64) ECC: corrected, machine check, silent"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--profile", choices=sorted(PROFILES), default="ddr3-park2014",
                            help="published first-flip threshold to use (default: %(default)s)")
        parser.add_argument("--hammer-counts", default=None,
                            help="comma-separated activations per aggressor row (default: a sweep)")
        parser.add_argument("--single-sided", action="store_true", help="hammer one neighbour, not both")
        parser.add_argument("--rows", type=int, default=64, help="victim rows simulated (default: %(default)s)")
        parser.add_argument("--words-per-row", type=int, default=1024,
                            help="64-bit ECC words per row (default: %(default)s, 8 KiB)")
        parser.add_argument("--vulnerable-fraction", type=float, default=1e-3,
                            help="share of cells that can flip at all (assumed; default: %(default)s)")
        parser.add_argument("--threshold-decades", type=float, default=1.5,
                            help="spread of thresholds above HC_first, in decades (assumed; default: %(default)s)")
        parser.add_argument("--data", default="random", choices=["random", "ones", "zeros", "checkerboard"],
                            help="data pattern written before hammering (default: %(default)s)")
        parser.add_argument("--seed", type=int, default=1)

    def run(self, args: argparse.Namespace) -> LabResult:
        profile = PROFILES[args.profile]
        slice_ = BankSlice(victim_rows=args.rows, words_per_row=args.words_per_row,
                           first_flip_activations=profile.first_flip_activations,
                           vulnerable_fraction=args.vulnerable_fraction,
                           threshold_decades=args.threshold_decades, seed=args.seed)
        double_sided = not args.single_sided
        if args.hammer_counts:
            try:
                counts = [int(c) for c in args.hammer_counts.split(",")]
            except ValueError as exc:
                raise ConfigError("--hammer-counts", args.hammer_counts, "give integers separated by commas") from exc
        else:
            counts = default_hammer_counts(profile.first_flip_activations, slice_.max_activations_per_window,
                                           1 if args.single_sided else 2)
        bank = DramBank(slice_, args.data)
        outcomes = [bank.hammer(count, double_sided) for count in counts]
        fractions = [ecc.outcome_fractions(k) for k in range(1, 7)]
        return LabResult(
            tables=(sweep_table(profile, slice_, outcomes), ecc_table(fractions)),
            plot=lambda figure: plot(figure, profile, outcomes, fractions),
            summary=_summary(profile, outcomes),
        )


def sweep_table(profile: DramProfile, slice_: BankSlice, outcomes: list[HammerOutcome]) -> Table:
    rows = []
    for o in outcomes:
        rows.append((f"{o.activations_per_aggressor:,}" + (" cap" if o.capped else ""),
                     f"{o.disturbance:,}", round(o.time_ms, 2), f"{slice_.flip_probability(o.disturbance):.1e}",
                     o.flipped_bits, o.corrected, o.detected, o.silent))
    return Table(
        title=f"Hammering {slice_.victim_rows} victim rows x {slice_.words_per_row} ECC words, "
              f"{profile.description}",
        columns=("ACTs/aggressor", "ACTs/victim", "ms", "p_flip", "flips", "corrected", "MCE", "silent"),
        rows=tuple(rows),
        notes=("ACTs/victim: activations of the adjacent rows in one window; ms: time they take; p_flip: "
               "chance a cell flips (random data); corrected / MCE (machine check) / silent: words by ECC outcome.",
               f"HC_first = {profile.first_flip_activations:,} adjacent-row activations per {REFRESH_WINDOW_MS:g} ms "
               f"refresh window ({profile.source}); at most {slice_.max_activations_per_window:,} "
               "activations fit in a window (Park et al. 2014).",
               f"assumed: {slice_.vulnerable_fraction:g} of cells vulnerable, thresholds spread over "
               f"{slice_.threshold_decades:g} decades above HC_first, {slice_.true_cell_fraction:.0%} true cells."),
    )


def ecc_table(fractions: list[ecc.OutcomeFractions]) -> Table:
    return Table(
        title="SECDED (72,64) outcome for k flipped bits in one word (uniform over positions)",
        columns=("flips/word", "patterns", "corrected", "MCE", "silent"),
        rows=tuple((f.flips, f"{f.patterns:,}" + ("" if f.exhaustive else " sampled"),
                    round(f.corrected, 4), round(f.detected, 4), round(f.silent, 4)) for f in fractions),
        notes=("k = 1 and 2 are exact properties of the code; k = 3, 4 enumerate every pattern; k >= 5 are sampled.",),
    )


def _summary(profile: DramProfile, outcomes: list[HammerOutcome]) -> tuple[str, ...]:
    first = next((o for o in outcomes if o.flipped_bits), None)
    worst = outcomes[-1] if outcomes else None
    lines = []
    if first is not None:
        lines.append(f"first flips at {first.disturbance:,} adjacent activations "
                     f"({first.time_ms:.2f} ms of hammering)")
    if worst is not None and worst.words:
        lines.append(f"at {worst.disturbance:,} activations: {worst.detected} machine checks and "
                     f"{worst.silent} silently corrupted words out of {worst.words:,}")
    return tuple(lines)


def plot(figure: Figure, profile: DramProfile, outcomes: list[HammerOutcome],
         fractions: list[ecc.OutcomeFractions]) -> None:
    left, right = figure.subplots(1, 2)
    x = [max(o.disturbance, 1) for o in outcomes]
    left.plot(x, [o.flipped_bits for o in outcomes], "o--", label="flipped bits", markersize=8)
    left.plot(x, [o.corrected for o in outcomes], "s-", label="words corrected")
    left.plot(x, [o.detected for o in outcomes], "^-", label="machine checks")
    left.plot(x, [o.silent for o in outcomes], "x-", label="silent corruption")
    left.axvline(profile.first_flip_activations, color="grey", linestyle=":", label="HC_first")
    left.set_xscale("log")
    left.set_yscale("symlog")
    left.set_ylim(bottom=0)
    left.set_xlabel("activations of adjacent rows in one 64 ms window")
    left.set_ylabel("count")
    left.set_title(f"Hammering ({profile.key})")
    left.legend(fontsize="small")
    ks = [f.flips for f in fractions]
    corrected = np.array([f.corrected for f in fractions])
    detected = np.array([f.detected for f in fractions])
    silent = np.array([f.silent for f in fractions])
    right.bar(ks, corrected, label="corrected")
    right.bar(ks, detected, bottom=corrected, label="detected (MCE)")
    right.bar(ks, silent, bottom=corrected + detected, label="silent")
    right.set_xlabel("flipped bits in one 72-bit word")
    right.set_ylabel("share of error patterns")
    right.set_title("SECDED (72,64) outcome")
    right.set_ylim(0, 1)
    right.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)


MODEL = RowhammerModel()
