"""The report's sections, one module each, in reading order.

Each module defines a frozen dataclass of what its section states, ``compute(ctx)`` returning one
(or None: nothing to state), ``render(obj, doc)`` returning its blocks, and ``SECTION``
(:class:`~report.sections.base.Section`) naming them and the top-level summary.json keys its
object's ``to_json()`` gives. :data:`SECTIONS` lists them in the order the report is read; a new
section is a new module added there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from report.blocks import Block
from report.context import Context, Facts
from report.sections import (
    accountant, audit, budgets, deletions, epsilon, headline, holdout, lineage, mechanism, out_of_scope, references,
    releases, rounds, selection, setting, title, units, utility,
)
from report.sections.base import Doc, Section

#: Every section, in reading order.
SECTIONS: tuple[Section, ...] = (
    title.SECTION,       # NOT PRIVATE alert, title, how far the run got
    lineage.SECTION,     # a retrained run's origin
    headline.SECTION,    # "Summary": epsilon per unit, trust, budgets, utility; warnings
    setting.SECTION,     # "Setting and threat model"
    units.SECTION,       # "Privacy units and adjacency"
    accountant.SECTION,  # "Accountant and delta"
    mechanism.SECTION,   # "Mechanism parameters"
    selection.SECTION,   # "Selection"
    epsilon.SECTION,     # "Epsilon per privacy unit" (+ over examples, quartiles, figures)
    audit.SECTION,       # "Measured leakage: privacy audit"
    budgets.SECTION,     # "Budgets"
    utility.SECTION,     # "Utility beside privacy"
    rounds.SECTION,      # its per-round table
    references.SECTION,  # its sources
    releases.SECTION,    # "Releases"
    holdout.SECTION,     # "Who the model serves"
    out_of_scope.SECTION,  # "Out-of-scope detection"
    deletions.SECTION,   # "Deletion requests"
)

__all__ = ["SECTIONS", "Section", "Doc", "compute_all", "render_all", "summary_of"]


def compute_all(ctx: Context) -> dict[str, Any]:
    """Every section's object by name (None: nothing to state), computed in reading order except
    those marked ``compute_last`` (they read what the others added to ``ctx.warnings``).

    Raises
    ------
    ReportError
        Whatever a section's ``compute`` raises for an unreadable run.
    """
    out: dict[str, Any] = {}
    for s in sorted(SECTIONS, key=lambda s: s.compute_last):
        obj = s.compute(ctx)
        if obj is not None and not isinstance(obj, s.cls):
            raise TypeError(f"section {s.name!r} computed a {type(obj).__name__}, not a {s.cls.__name__}")
        out[s.name] = obj
    return {s.name: out[s.name] for s in SECTIONS}


def summary_of(objects: Mapping[str, Any], key_order: tuple[str, ...]) -> dict[str, Any]:
    """The sections' summary contributions merged, in ``key_order`` (summary.json's schema order).

    Raises
    ------
    ValueError
        If a section gives an undeclared key, two sections give the same key, or a key is missing from ``key_order``.
    """
    merged: dict[str, Any] = {}
    for s in SECTIONS:
        part = s.to_json(objects[s.name])
        twice = set(part) & set(merged)
        if twice:
            raise ValueError(f"summary key(s) {sorted(twice)} given by more than one section")
        merged.update(part)
    unordered = set(merged) - set(key_order)
    if unordered:
        raise ValueError(f"summary key(s) {sorted(unordered)} have no place in the summary's key order")
    return {k: merged[k] for k in key_order if k in merged}


def render_all(objects: Mapping[str, Any], facts: Facts, images: Mapping[str, Path]) -> list[Block]:
    """The report's blocks: each section with something to state, in reading order.

    A run without a guarantee starts with an ``("alert", text)`` block saying so, which the writers
    put on the file's first line.
    """
    doc = Doc(facts=facts, sections=objects, images=images)
    out: list[Block] = []
    for s in SECTIONS:
        obj = objects[s.name]
        if obj is not None:
            out += s.render(obj, doc)
    return out
