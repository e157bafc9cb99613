"""The "Selection" subsection: how q_k follows activity, the expected cohort, and the calibration of c."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from report.blocks import Block, fmt
from report.context import Context
from report.sections.base import Doc, Section


@dataclass(frozen=True)
class Selection:
    """How devices were selected: ``mode`` (uniform | activity), q_k = min(1, c a_k^alpha) with
    ``activity_exponent`` alpha and ``selection_constant`` c (from the ledger, else config.toml),
    the ``calibration_note`` of c, and the ``expected_cohort_size``."""

    mode: str | None
    activity_exponent: float | None
    selection_constant: float | None
    calibration_note: str | None
    expected_cohort_size: float | None
    dp_on: bool
    bands: int = 1  # cyclic selection's groups (--bands; 1: every device may join every round)
    secure: bool = False  # --noise-at secure: one event per round joined, charged before the round's messages

    def to_json(self) -> dict[str, Any]:
        """``{"selection": {"mode", "activity_exponent", "selection_constant", "calibration_note", "expected_cohort_size"}}``."""
        return {"selection": {"mode": self.mode, "activity_exponent": self.activity_exponent,
                              "selection_constant": self.selection_constant,
                              "calibration_note": self.calibration_note,
                              "expected_cohort_size": self.expected_cohort_size}}


def compute(ctx: Context) -> Selection:
    """The selection of the run."""
    cfg, run = ctx.cfg, ctx.run
    return Selection(mode=cfg.get("selection"), activity_exponent=cfg.get("activity_exponent"),
                     selection_constant=run.get("selection_constant", cfg.get("selection_constant")),
                     calibration_note=run.get("calibration_note"), expected_cohort_size=cfg.get("cohort_size"),
                     dp_on=ctx.facts.dp_on, bands=int(cfg.get("bands") or 1), secure=ctx.facts.secure)


def render(s: Selection, doc: Doc) -> list[Block]:
    """The selection rule and cohort; under example-level DP, that the accounting is conditioned on participation."""
    sel_text = [
        f"Selection: {fmt(s.mode)}; q_k = min(1, c * a_k^alpha) with alpha = {fmt(s.activity_exponent)} "
        f"and c = {fmt(s.selection_constant)}; expected cohort size {fmt(s.expected_cohort_size)}.",
        "Selection used activity counts (the number of examples each device holds), which the server sees.",
    ]
    if s.bands > 1:
        sel_text.insert(1, f"Cyclic selection (--bands {s.bands}): the devices were ranked by their example counts and "
                           f"dealt to {s.bands} groups in snake order (each group about the same data); round t could "
                           f"select only group (t - 1) mod {s.bands} (q_k = 0 for the others), and c was calibrated so "
                           f"that sum_k q_k = {s.bands} x the expected cohort size over all devices: each round's group "
                           "holds the expected cohort size on average.")
    if s.secure:
        sel_text.append(
            "Example-level accounting is conditioned on participation: each device composes one event for each "
            "round it was selected for, charged before the round's first message (so also when it dropped out or "
            "the round was abandoned), so the example-level guarantee does not cover the fact of being selected.")
    elif s.dp_on:
        sel_text.append(
            "Example-level accounting is conditioned on participation: each device composes the steps of the "
            "rounds it actually joined, so the example-level guarantee does not cover the fact of being selected.")
    if s.calibration_note:
        sel_text.append(f"Calibration: {s.calibration_note}")
    return [("h", 3, "Selection"), ("ul", sel_text)]


SECTION = Section("selection", Selection, compute, render, keys=("selection",))
