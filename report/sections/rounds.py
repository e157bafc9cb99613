"""The per-round table of the utility section (metrics.jsonl, one row per round) and where its figures come from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from report.blocks import Block, fmt
from report.context import Context, Facts
from report.sections.base import Doc, Section
from report.stats import has_number


@dataclass(frozen=True)
class Rounds:
    """metrics.jsonl's lines in order (``metrics``; free-form, one per round) and the rounds the
    server skipped (``skipped_rounds``)."""

    facts: Facts
    metrics: list[dict[str, Any]]
    skipped_rounds: list[int]

    def to_json(self) -> dict[str, Any]:
        """``metrics`` (left out of summary.json) and ``skipped_rounds``."""
        return {"metrics": self.metrics, "skipped_rounds": self.skipped_rounds}

    def has(self, key: str) -> bool:
        """Whether some round has a number (not a flag or null) under ``key``."""
        return has_number(self.metrics, key)

    @property
    def secure(self) -> bool:
        """Whether the rounds ran secure aggregation (``secure_abandoned`` in metrics.jsonl)."""
        return self.facts.secure and any("secure_abandoned" in m for m in self.metrics)

    @property
    def slots(self) -> bool:
        """Whether the rounds were evaluated on slot filling (slot F1 and sentence accuracy)."""
        return any("slot_f1" in m for m in self.metrics)


def compute(ctx: Context) -> Rounds:
    """The rounds of metrics.jsonl."""
    metrics = ctx.data.metrics
    return Rounds(facts=ctx.facts, metrics=metrics, skipped_rounds=[m["round"] for m in metrics if m.get("skipped")])


def render(r: Rounds, doc: Doc) -> list[Block]:
    """The table (round, skipped, then :func:`_columns`) and the paragraph on its sources, or "No metrics recorded yet."."""
    cols = _columns(r)
    secure = r.secure
    mrows = [[str(m["round"])] + ["yes" if m.get("skipped") else ""]
             + (["yes" if m.get("secure_abandoned") else ""] if secure else []) + [fmt(m.get(k)) for _, k in cols]
             for m in r.metrics]
    if not mrows:
        return [("p", "No metrics recorded yet.")]
    return [("table", ["round", "skipped"] + (["abandoned"] if secure else []) + [h for h, _ in cols], mrows),
            ("p", _sources(r))]


def _columns(r: Rounds) -> list[tuple[str, str]]:
    """The optional columns as (header, metrics key), each only when some round has a value.

    The realised cohort size is left out under device-level DP, whose accounting treats the cohort as secret.
    """
    cols = [("cohort", "cohort_size")] if not r.facts.device_dp else []
    cols += [("train loss", "train_loss")] if r.has("train_loss") else []
    cols += [("accuracy", "accuracy"), ("macro-F1", "macro_f1")]
    cols += [("test loss", "test_loss")] if r.has("test_loss") else []
    cols += [("slot F1", "slot_f1"), ("sentence accuracy", "sentence_accuracy")] if r.slots else []
    cols += [("example eps (server, max)", "epsilon_example_max")] if r.has("epsilon_example_max") else []
    cols += [("device eps (server, max)", "epsilon_device_max")] if r.has("epsilon_device_max") else []
    return cols


def _sources(r: Rounds) -> str:
    """Where the per-round figures come from (test split, the server's accountant), and why a column is absent.

    A private run's devices send no training loss; under device-level DP the realised cohort is secret.
    """
    src = ("Per-round figures: accuracy, macro-F1" + (", test loss" if r.has("test_loss") else "")
           + (", slot F1 and sentence accuracy" if r.slots else "") + " are computed on the test split"
           + ("; the epsilon columns are the server's accountant's running maxima (privacy quantities from "
              "public counts and the rounds joined, not from device data)."
              if r.has("epsilon_example_max") or r.has("epsilon_device_max") else "."))
    if r.has("train_loss"):
        src += (" The train loss is the example-weighted mean of the losses the devices reported, which only a "
                "run without DP sends" + (": this run's config says DP was on, so check it." if r.facts.any_dp else "."))
    elif r.facts.any_dp:
        src += (" No training loss is shown: a private run's devices send no loss or other un-noised "
                "statistic of their data.")
    if r.secure:
        src += (" An abandoned round (secure aggregation: fewer masked inputs than the noise is sized for, or too "
                "few shares to unmask the sum) released no new noisy sum: the model was kept from the round before, and "
                "the round's privacy events stay in the ledger.")
    if r.facts.device_dp:
        src += (" The realised cohort size is not shown (the device-level accounting treats the cohort as "
                "secret); the expected cohort size is in the mechanism table.")
    return src


SECTION = Section("rounds", Rounds, compute, render, keys=("metrics", "skipped_rounds"))
