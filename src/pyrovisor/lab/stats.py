"""Figures from several seeds: the mean and a Student-t confidence interval, and the seed options."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

# Two-sided 95 % quantiles of Student's t by degrees of freedom (the standard table); above 30, the normal's.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_Z95 = 1.960
DEFAULT_SEEDS = 5


def t_quantile_95(degrees_of_freedom: int) -> float:
    if degrees_of_freedom < 1:
        raise ValueError("a t quantile needs at least one degree of freedom")
    return _T95[degrees_of_freedom - 1] if degrees_of_freedom <= len(_T95) else _Z95


@dataclass(frozen=True)
class Estimate:
    """A simulated figure over n seeds: the mean and its 95 % confidence interval [low, high]."""

    mean: float
    low: float
    high: float
    n: int

    def divided_by(self, unit: float) -> Estimate:
        """The same figure counted in units of `unit` (ticks to ms, flips per MiB): the interval scales too."""
        return Estimate(self.mean / unit, self.low / unit, self.high / unit, self.n)

    def rounded(self, digits: int) -> Estimate:
        return Estimate(round(self.mean, digits), round(self.low, digits), round(self.high, digits), self.n)

    def __format__(self, spec: str) -> str:
        spec = spec or ".4g"
        if self.n < 2 or self.low == self.high:
            return format(self.mean, spec)
        return f"{format(self.mean, spec)} [{format(self.low, spec)}, {format(self.high, spec)}]"

    def as_json(self) -> dict[str, float | int]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}


def estimate(values: Sequence[float]) -> Estimate:
    """Mean and 95 % Student-t interval of independent runs (one value: an interval of zero width)."""
    if not values:
        raise ValueError("an estimate needs at least one value")
    n = len(values)
    if max(values) == min(values):  # all alike (or one): no interval, and no rounding sliver of one
        return Estimate(values[0], values[0], values[0], n)
    mean = math.fsum(values) / n
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    half = t_quantile_95(n - 1) * math.sqrt(variance / n)
    return Estimate(mean, mean - half, mean + half, n)


def seeds_of(args: argparse.Namespace) -> range:
    """The seeds a run uses: --seed, --seed + 1, ... (--seeds of them)."""
    return range(args.seed, args.seed + args.seeds)


def add_seed_arguments(parser: argparse.ArgumentParser, first: int = 0, count: int = DEFAULT_SEEDS) -> None:
    """--seed (the first) and --seeds (how many): every simulated figure is given over these seeds."""
    parser.add_argument("--seed", type=int, default=first, help="first random seed (default: %(default)s)")
    parser.add_argument("--seeds", type=_seed_count, default=count,
                        help="runs with seeds --seed, --seed+1, ...; figures are means with 95%% confidence "
                             "intervals (default: %(default)s)")


def _seed_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: give a whole number of seeds") from None
    if not 1 <= count <= 1000:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: between 1 and 1000 seeds")
    return count

