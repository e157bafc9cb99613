"""The report's text as format-independent blocks, and the number formatting every section shares.

A block is one of ``("h", level, text)``, ``("p", text)``, ``("alert", text)``, ``("ul", [text])``,
``("table", header, rows)`` or ``("img", name, caption)``; :mod:`report.render` writes them as
Markdown and HTML.
"""

from __future__ import annotations

import math
from typing import Any

Block = tuple  # ("h", level, text) | ("p", text) | ("ul", [text]) | ("table", header, rows) | ("img", name, caption)

TIER_WORDS = {
    "strong": "strong (epsilon <= 1)",
    "reasonable": "reasonable (1 < epsilon <= 10)",
    "weak": "weak (epsilon > 10)",
    "none": "no guarantee",
}


def fmt(x: Any, digits: int = 4) -> str:
    """Human number: inf as the infinity sign, None as n/a."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if math.isinf(x):
            return "∞ (infinity)"
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
            return f"{x:.3g}"
        return f"{x:.{digits}g}"
    return str(x)


def fmt_range(r: Any) -> str:
    """A ledger range (:class:`report.events.Range`) as text: one value when min == max, else
    "min to max (median m)"; n/a when absent."""
    if r is None:
        return "n/a"
    if r.min == r.max:
        return fmt(r.min)
    return f"{fmt(r.min)} to {fmt(r.max)} (median {fmt(r.median)})"


def param(cfg: dict, key: str) -> str:
    """A config.toml setting as text, or "not recorded" when the run's config lacks it."""
    return fmt(cfg.get(key)) if key in cfg else "not recorded"


def n_devices(n: int, verb: str | None = None) -> str:
    """``"1 device"`` / ``"3 devices"``, with ``verb`` ("have" or "were") agreeing when given."""
    text = f"{n} device{'' if n == 1 else 's'}"
    if verb:
        text += " " + {"have": "has", "were": "was"}[verb] if n == 1 else " " + verb
    return text
