"""Small statistics over a window of logged values: trend, co-movement, oscillation.

Plain Python on a few dozen floats per log: the detectors run on the host at logging
time, so numpy or torch would add nothing but an import.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def slope(values: Sequence[float]) -> float:
    """Least-squares slope per logged step (0 for fewer than two values)."""
    count = len(values)
    if count < 2:
        return 0.0
    centre = (count - 1) / 2
    spread = sum((index - centre) ** 2 for index in range(count))
    return sum((index - centre) * value for index, value in enumerate(values)) / spread


def detrended(values: Sequence[float]) -> list[float]:
    """The values minus their least-squares line, so a steady trend does not read as a swing."""
    rate = slope(values)
    centre, level = (len(values) - 1) / 2, mean(values)
    return [value - (level + rate * (index - centre)) for index, value in enumerate(values)]


def correlation(first: Sequence[float], second: Sequence[float]) -> float | None:
    """Pearson correlation; None when either series is constant (no movement to compare)."""
    if len(first) != len(second) or len(first) < 2:
        return None
    first_mean, second_mean = mean(first), mean(second)
    covariance = sum((a - first_mean) * (b - second_mean) for a, b in zip(first, second))
    first_spread = math.sqrt(sum((a - first_mean) ** 2 for a in first))
    second_spread = math.sqrt(sum((b - second_mean) ** 2 for b in second))
    if first_spread == 0 or second_spread == 0:
        return None
    return covariance / (first_spread * second_spread)


def differences(values: Sequence[float]) -> list[float]:
    return [after - before for before, after in zip(values, values[1:])]


def sign_changes(values: Sequence[float]) -> int:
    signs = [value > 0 for value in values if value != 0]
    return sum(1 for before, after in zip(signs, signs[1:]) if before != after)


def all_finite(values: Sequence[float]) -> bool:
    return all(math.isfinite(value) for value in values)
