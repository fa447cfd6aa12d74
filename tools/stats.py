"""Statistics and number formatting for the tools: one copy (nearest-rank percentiles, medians
that skip NaN, "median (min–max)" spans)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

NAN = float("nan")


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank ``p``-th percentile (0 < p ≤ 100); NaN for no values."""
    if not values:
        return NAN
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100.0 * len(s)) - 1))]


def finite(values: Sequence[float]) -> list[float]:
    """``values`` without NaN."""
    return [v for v in values if v == v]


def med(values: Sequence[float]) -> float:
    """Median of the values that are not NaN; NaN when none are."""
    vals = finite(values)
    return statistics.median(vals) if vals else NAN


def fmt(v: float, digits: int = 0) -> str:
    """``1,234`` / ``1,234.57``; ``-`` for NaN."""
    if v != v:
        return "-"
    return f"{v:,.{digits}f}"


def span(values: Sequence[float], digits: int = 0) -> str:
    """``median (min–max)`` of the values that are not NaN; one value alone; ``-`` for none."""
    vals = finite(values)
    if not vals:
        return "-"
    if len(vals) == 1:
        return fmt(vals[0], digits)
    return f"{fmt(med(vals), digits)} ({fmt(min(vals), digits)}–{fmt(max(vals), digits)})"
