"""The numbers behind a sampled working-set estimate: a binomial confidence interval and moving averages."""

from __future__ import annotations

import math
from dataclasses import dataclass


def wilson_interval(touched: int, sampled: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for the fraction touched/sampled (95 % for z = 1.96); (0, 1) with no sample."""
    if sampled <= 0:
        return 0.0, 1.0
    fraction = touched / sampled
    denominator = 1 + z * z / sampled
    centre = (fraction + z * z / (2 * sampled)) / denominator
    spread = z * math.sqrt(fraction * (1 - fraction) / sampled + z * z / (4 * sampled * sampled)) / denominator
    return max(0.0, centre - spread), min(1.0, centre + spread)


@dataclass
class MovingAverage:
    """An exponentially weighted moving average; `weight` is how much each new value counts."""

    weight: float
    value: float | None = None

    def update(self, sample: float) -> float:
        self.value = sample if self.value is None else self.value + self.weight * (sample - self.value)
        return self.value
