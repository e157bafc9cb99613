"""The "Utility beside privacy" section: the final metrics, against a non-private baseline run when given."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from report.blocks import Block, fmt
from report.context import Context
from report.rundata import RunData
from report.sections.base import Doc, Section
from report.stats import final, number


@dataclass(frozen=True)
class Finals:
    """The last evaluated value of each test metric (None: never evaluated; slot metrics only for slots/joint)."""

    final_accuracy: float | None
    final_macro_f1: float | None
    final_slot_f1: float | None
    final_sentence_accuracy: float | None

    @classmethod
    def of(cls, metrics: list[dict[str, Any]]) -> "Finals":
        """The final metrics of metrics.jsonl's lines."""
        return cls(final(metrics, "accuracy"), final(metrics, "macro_f1"), final(metrics, "slot_f1"),
                   final(metrics, "sentence_accuracy"))

    def to_json(self) -> dict[str, float | None]:
        """``{"final_accuracy", "final_macro_f1", "final_slot_f1", "final_sentence_accuracy"}``."""
        return {"final_accuracy": self.final_accuracy, "final_macro_f1": self.final_macro_f1,
                "final_slot_f1": self.final_slot_f1, "final_sentence_accuracy": self.final_sentence_accuracy}

    def text(self) -> str:
        """Accuracy and macro-F1, plus slot F1 and sentence accuracy when evaluated."""
        text = f"accuracy {fmt(self.final_accuracy)}, macro-F1 {fmt(self.final_macro_f1)}"
        if self.final_slot_f1 is not None:
            text += f", slot F1 {fmt(self.final_slot_f1)}, sentence accuracy {fmt(self.final_sentence_accuracy)}"
        return text


@dataclass(frozen=True)
class Baseline:
    """The non-private baseline run (``run_dir``; ``dp`` as its config says), its finals and metrics lines."""

    run_dir: str
    dp: bool
    finals: Finals
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, data: RunData) -> "Baseline":
        """The baseline of a run read with :func:`report.rundata.read_run`."""
        return cls(run_dir=str(data.run_dir), dp=bool(data.config.get("dp", False)), finals=Finals.of(data.metrics),
                   metrics=data.metrics)

    def to_json(self) -> dict[str, Any]:
        """``{"run_dir", "dp", finals..., "metrics"}`` (summary.json leaves ``metrics`` out)."""
        return {"run_dir": self.run_dir, "dp": self.dp, **self.finals.to_json(), "metrics": self.metrics}


@dataclass(frozen=True)
class Utility:
    """The run's final test metrics, whether its devices reported a training loss (only a run
    without DP sends one), and the baseline (None without one)."""

    finals: Finals
    train_loss_reported: bool
    baseline: Baseline | None

    def to_json(self) -> dict[str, Any]:
        """``train_loss_reported``, the finals and ``baseline`` (null without one)."""
        return {"train_loss_reported": self.train_loss_reported, **self.finals.to_json(),
                "baseline": self.baseline.to_json() if self.baseline is not None else None}

    def headline(self) -> str:
        """The summary's utility sentence: the finals, and the baseline's."""
        base = self.baseline
        return ("Final " + self.finals.text()
                + (f" (non-private baseline: {base.finals.text()})" if base else "") + ".")


def compute(ctx: Context) -> Utility:
    """The finals of the run and of its baseline; warns when the baseline is itself private."""
    metrics = ctx.data.metrics
    baseline = Baseline.of(ctx.baseline) if ctx.baseline is not None else None
    if baseline is not None and baseline.dp:
        ctx.warnings.append("the baseline run directory has dp = true; it is not a non-private baseline")
    return Utility(finals=Finals.of(metrics), train_loss_reported=any(number(m.get("train_loss")) is not None
                                                                        for m in metrics),
                   baseline=baseline)


def render(u: Utility, doc: Doc) -> list[Block]:
    """The heading, the comparison with the baseline (:func:`_baseline_paragraph`) and the accuracy figure."""
    out: list[Block] = [("h", 2, "Utility beside privacy")]
    if u.baseline is not None:
        out.append(("p", _baseline_paragraph(u.finals, u.baseline)))
    if "accuracy_vs_round" in doc.images:
        out.append(("img", "accuracy_vs_round", "Accuracy and macro-F1 against round."))
    return out


def _baseline_paragraph(mine: Finals, base: Baseline) -> str:
    """Final accuracy and macro-F1 (and slot F1 and sentence accuracy for slot tasks) against the non-private baseline's."""
    b = base.finals
    da = (mine.final_accuracy - b.final_accuracy
          if mine.final_accuracy is not None and b.final_accuracy is not None else None)
    return (f"Final accuracy {fmt(mine.final_accuracy)} against {fmt(b.final_accuracy)} "
            f"for the non-private baseline ({base.run_dir}); difference {fmt(da)}. "
            f"Final macro-F1 {fmt(mine.final_macro_f1)} against {fmt(b.final_macro_f1)}."
            + (f" Final slot F1 {fmt(mine.final_slot_f1)} against {fmt(b.final_slot_f1)}; "
               f"sentence accuracy {fmt(mine.final_sentence_accuracy)} against "
               f"{fmt(b.final_sentence_accuracy)}." if mine.final_slot_f1 is not None else ""))


SECTION = Section("utility", Utility, compute, render,
                  keys=("train_loss_reported", "final_accuracy", "final_macro_f1", "final_slot_f1",
                        "final_sentence_accuracy", "baseline"))
