"""Small number helpers of the report: quantiles that tolerate infinity, metric lookups."""

from __future__ import annotations

import math
import statistics
from typing import Any


def finite_or_str(x: float | None) -> float | str | None:
    """``x``, with an infinite float as the string ``"inf"`` (JSON has no infinity)."""
    if x is None:
        return None
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return x


def quantile(values: list[float], p: float) -> float | None:
    """The ``p`` quantile of ``values`` (linear interpolation; nearest rank when one is infinite); None if empty."""
    if not values:
        return None
    xs = sorted(values)
    if any(math.isinf(x) for x in xs):
        # Nearest rank (interpolation with inf is undefined).
        return xs[min(len(xs) - 1, max(0, math.ceil(p * len(xs)) - 1))]
    pos = p * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: list[float]) -> float | None:
    """The median of ``values`` (see :func:`quantile` with an infinite value); None if empty."""
    if not values:
        return None
    if any(math.isinf(x) for x in values):
        return quantile(values, 0.5)
    return float(statistics.median(values))


def number(x: Any) -> float | None:
    """``x`` as a float when it is a number (not a bool), else None."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def final(metrics: list[dict[str, Any]], key: str) -> float | None:
    """The last number under ``key`` in the metrics lines (None if no line has one)."""
    for row in reversed(metrics):
        v = row.get(key)
        if number(v) is not None:
            return float(v)
    return None


def has_number(metrics: list[dict[str, Any]], key: str) -> bool:
    """Whether some line of ``metrics`` has a number (not a flag or null) under ``key``."""
    return any(isinstance(m.get(key), (int, float)) and not isinstance(m.get(key), bool) for m in metrics)
