"""The "Releases" section: accuracy, NFR and PFR of each released model, and their plot."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from report.blocks import Block, fmt
from report.context import Context, Facts
from report.sections.base import Doc, Section
from report.stats import number


@dataclass(frozen=True)
class Release:
    """One release (a round whose model was released, ``"release": true`` in metrics.jsonl): its test
    ``accuracy`` and its negative / positive flip rates on the test split against the previous release
    (``nfr`` / ``pfr``, None at the first) and against ``--baseline-model`` (None without one)."""

    round: int
    accuracy: float | None
    nfr: float | None
    pfr: float | None
    nfr_baseline: float | None
    pfr_baseline: float | None

    def to_json(self) -> dict[str, Any]:
        """``{"round", "accuracy", "nfr", "pfr", "nfr_baseline", "pfr_baseline"}``."""
        return {"round": self.round, "accuracy": self.accuracy, "nfr": self.nfr, "pfr": self.pfr,
                "nfr_baseline": self.nfr_baseline, "pfr_baseline": self.pfr_baseline}


@dataclass(frozen=True)
class Releases:
    """The releases in round order (empty for a run without releases) and ``pc_weight``, the weight
    of positive-congruent training (0: off)."""

    facts: Facts
    rows: tuple[Release, ...]
    pc_weight: float
    #: every round of the rounds table is a release: its accuracy is there already (one table, one figure)
    every_round: bool = False
    #: the rounds abandoned by secure aggregation (``secure_abandoned`` in metrics.jsonl): no new noisy sum
    abandoned: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """``releases`` (only when there are some) and ``pc_weight``."""
        out: dict[str, Any] = {"releases": [r.to_json() for r in self.rows]} if self.rows else {}
        return {**out, "pc_weight": self.pc_weight}


def compute(ctx: Context) -> Releases:
    """The release rounds of metrics.jsonl (older runs have none)."""
    rows = sorted((m for m in ctx.data.metrics if m.get("release") is True), key=lambda m: m["round"])
    every = bool(rows) and {m["round"] for m in rows} == {m["round"] for m in ctx.data.metrics}
    abandoned = tuple(int(m["round"]) for m in rows if m.get("secure_abandoned")) if ctx.facts.secure else ()
    return Releases(facts=ctx.facts, pc_weight=float(ctx.cfg.get("pc_weight") or 0.0), every_round=every,
                    abandoned=abandoned,
                    rows=tuple(Release(m["round"], number(m.get("accuracy")), number(m.get("nfr")),
                                       number(m.get("pfr")), number(m.get("nfr_baseline")),
                                       number(m.get("pfr_baseline"))) for m in rows))


def render(r: Releases, doc: Doc) -> list[Block]:
    """What each release measured, its table and plot; nothing for a run without releases.

    The baseline columns appear only when some release was compared with a ``--baseline-model``;
    the plot (accuracy and NFR per release) only with two releases or more.
    """
    rel = r.rows
    if not rel:
        return []
    pc = r.pc_weight
    with_baseline = any(x.nfr_baseline is not None or x.pfr_baseline is not None for x in rel)
    rounds = ", ".join(str(x.round) for x in rel)
    out: list[Block] = [("h", 2, "Releases")]
    out.append(("p", f"{len(rel)} release{'' if len(rel) == 1 else 's'}: the model{'' if len(rel) == 1 else 's'} "
                     f"of round{'' if len(rel) == 1 else 's'} {rounds}. For each release the server measured on the "
                     "test split its accuracy, the negative flip rate NFR, the share of test examples the previous release "
                     "classified correctly and this release classifies wrongly, and the positive flip rate PFR, "
                     "the share the previous release got wrong and this one gets right (Yan et al. 2021, "
                     "\"Positive-congruent training: towards regression-free model updates\", CVPR)."
                     + (" The first release has no previous release, so its flip rates against it are n/a."
                        if rel[0].nfr is None else "")
                     + (f" Positive-congruent training was on (--pc-weight {fmt(pc)}): after the first release each "
                        "device's per-example loss added the focal distillation term towards the previous release "
                        "on the examples that release classified correctly (Yan et al. 2021)"
                        + (", inside the loss whose per-example gradients are clipped and noised, so it added no "
                           "privacy cost" if r.facts.dp_on and not r.facts.not_private else "")
                        + "; the previous release, a released model, was sent to the cohort." if pc > 0 else "")))
    if r.abandoned:
        many = len(r.abandoned) > 1
        out.append(("p", f"Round{'s' if many else ''} {', '.join(map(str, r.abandoned))} {'were' if many else 'was'} "
                         "abandoned (secure aggregation): no new noisy sum went into "
                         f"{'their releases' if many else 'its release'}; the model was kept from the round before."))
    if r.every_round:  # the rounds table gives each round's accuracy: this one the flips alone
        header, keys = ["release round", "NFR vs previous", "PFR vs previous"], ["nfr", "pfr"]
        out.append(("p", "Every round's model was released; each one's accuracy is in the per-round table."))
    else:
        header, keys = ["release round", "accuracy", "NFR vs previous", "PFR vs previous"], ["accuracy", "nfr", "pfr"]
    if with_baseline:
        header += ["NFR vs baseline", "PFR vs baseline"]
        keys += ["nfr_baseline", "pfr_baseline"]
    out.append(("table", header, [[str(x.round)] + [fmt(getattr(x, k)) for k in keys] for x in rel]))
    if with_baseline:
        out.append(("p", "The baseline columns measure the same flips, on the same test split, against the model "
                         "given with --baseline-model instead of the previous release"
                         + (" (not the non-private baseline run of the utility section)." if r.facts.has_baseline
                            else ".")))
    if "accuracy_nfr_per_release" in doc.images:
        out.append(("img", "accuracy_nfr_per_release", "Accuracy and NFR per release (test split; x = release "
                                                       "round; NFR against the previous release)."))
    return out


SECTION = Section("releases", Releases, compute, render, keys=("releases", "pc_weight"))
