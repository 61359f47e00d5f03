"""Percentiles and medians kept dependency-free so load clients start fast."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile: no interpolation, so p99 is a latency someone really saw."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def median(values: Sequence[float]) -> float:
    """Median that ignores NaN, because a run that measured nothing must not poison the rest."""
    clean = sorted(v for v in values if not math.isnan(v))
    if not clean:
        return math.nan
    mid = len(clean) // 2
    if len(clean) % 2:
        return clean[mid]
    return (clean[mid - 1] + clean[mid]) / 2


def us_text(x: float) -> str:
    """CPU per unit: a decimal where it is small (an element of a batch takes a few us)."""
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"
