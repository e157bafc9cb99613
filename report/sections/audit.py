"""The "Measured leakage" section, from RUN_DIR/audit/audit.json (written by ``dpfl audit``).

Without an audit it says how to run one. With one: what an audit can and cannot show, the table of
measures, the verdict beside the accounted epsilon, the method notes, the audit's warnings and the
ROC figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from report.blocks import Block, fmt
from report.context import Context
from report.sections.base import Doc, Section

#: The parts of audit.json (besides its summary) that summary.json's ``audit.details`` keeps.
DETAIL_KEYS = ("membership", "epsilon_lower_bound", "theoretical", "exposure", "extraction", "canaries",
               "checkpoint_round", "warnings")


def _d(x: Any) -> dict[str, Any]:
    """``x`` when it is a non-empty mapping of audit.json, else ``{}`` (a part the audit left out)."""
    return x if isinstance(x, dict) and x else {}


@dataclass(frozen=True)
class Membership:
    """One membership-inference attack: its AUC, TPR at 1% and 0.1% FPR, and the sizes of the two groups."""

    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_0_1pct_fpr: float
    n_members: int
    n_nonmembers: int


@dataclass(frozen=True)
class OneRun:
    """The one-run lower bound (Steinke, Nasr & Jagielski 2023): ``v`` of ``r`` guesses right on ``m``
    canaries, at most ``ceiling`` even if every guess were right."""

    epsilon_lower_bound: float
    v: int
    r: int
    m: int
    ceiling: float | None


@dataclass(frozen=True)
class ClopperPearson:
    """The Clopper-Pearson lower bound (Jagielski, Ullman & Oprea 2020) from the attack's true and false positives."""

    epsilon_lower_bound: float
    true_positives: int
    n_positives: int
    false_positives: int
    n_negatives: int


@dataclass(frozen=True)
class Bounds:
    """The empirical epsilon lower bounds (None: not computed) and the confidence of each
    (``per_method_confidence``, so that the larger holds at the audit's confidence by a union bound)."""

    one_run: OneRun | None
    clopper_pearson: ClopperPearson | None
    per_method_confidence: float | None


@dataclass(frozen=True)
class Exposure:
    """Canary exposure (Carlini et al. 2019), bits: included canaries' mean and max, excluded ones' mean,
    chance and the maximum possible, by ``method`` over ``samples`` sampled candidates (None: all
    ``n_candidates``)."""

    mean_included: float | None
    max_included: float | None
    mean_excluded: float | None
    chance: float | None
    max_possible: float | None
    method: str | None
    samples: int | None
    n_candidates: int | None


@dataclass(frozen=True)
class Recovered:
    """Secrets recovered exactly (``n_exact`` of ``n``) by model inversion, and the digit accuracy."""

    n_exact: int
    n: int
    digit_accuracy: float


@dataclass(frozen=True)
class Extraction:
    """Extraction by model inversion (Parikh et al. 2022) of included and excluded canaries (None: none
    attacked), the chance rate per secret, and the attack's ``steps`` and ``restarts``."""

    included: Recovered | None
    excluded: Recovered | None
    chance_rate: float | None
    steps: int | None
    restarts: int | None


@dataclass(frozen=True)
class Theoretical:
    """The accounted epsilons the audit compares with (nats, at the audit's delta; ``"inf"`` as in audit.json):
    ``epsilon_example_max``, ``epsilon_device_max``, and for canaries of several copies ``epsilon_group``
    at ``delta_group``."""

    epsilon_example_max: Any
    epsilon_device_max: Any
    epsilon_group: Any
    delta_group: Any


@dataclass(frozen=True)
class AuditResult:
    """What audit.json states: the lower bound ``epsilon_lower_bound`` at ``delta`` with ``confidence``,
    the audited checkpoint round, the canaries (``canaries_m``, ``canaries_included``, ``repeats``,
    ``n_digits``), the membership attacks (``"canaries"``, ``"real"``), the bounds, the accounted
    epsilons, exposure and extraction (audit.json's objects; empty when not measured) and its warnings.

    ``record`` is summary.json's ``audit`` object (audit.json's summary plus ``details`` and ``file``).
    """

    epsilon_lower_bound: Any
    confidence: Any
    delta: Any
    checkpoint_round: int | None
    canaries_m: int | None
    canaries_included: int | None
    repeats: int
    n_digits: int | None
    membership: dict[str, Membership]
    bounds: Bounds
    theoretical: Theoretical
    exposure: Exposure | None
    extraction: Extraction | None
    warnings: tuple[str, ...]
    record: dict[str, Any]

    @classmethod
    def of(cls, audit: dict[str, Any]) -> "AuditResult":
        """The result of audit.json's object ``audit``."""
        record = dict(audit["summary"])
        record["details"] = {k: audit.get(k) for k in DETAIL_KEYS}
        record["file"] = "audit/audit.json"
        can, mem, lb, theo, ex, xt = (_d(audit.get(k)) for k in ("canaries", "membership", "epsilon_lower_bound",
                                                                  "theoretical", "exposure", "extraction"))
        one, cp = lb.get("one_run"), lb.get("clopper_pearson")

        def recovered(g: Any) -> Recovered | None:
            return Recovered(g["n_exact"], g["n"], g["digit_accuracy"]) if g else None

        return cls(
            epsilon_lower_bound=record.get("epsilon_lower_bound"), confidence=record.get("confidence"),
            delta=record.get("delta"), checkpoint_round=audit.get("checkpoint_round"),
            canaries_m=can.get("m"), canaries_included=can.get("included"), repeats=can.get("repeats") or 1,
            n_digits=can.get("n_digits"),
            membership={k: Membership(m["auc"], m["tpr_at_1pct_fpr"], m["tpr_at_0_1pct_fpr"], m["n_members"],
                                      m["n_nonmembers"]) for k in ("canaries", "real") if (m := mem.get(k))},
            bounds=Bounds(
                one_run=OneRun(one["epsilon_lower_bound"], one["v"], one["r"], one["m"], one.get("ceiling")) if one else None,
                clopper_pearson=ClopperPearson(cp["epsilon_lower_bound"], cp["true_positives"], cp["n_positives"],
                                               cp["false_positives"], cp["n_negatives"]) if cp else None,
                per_method_confidence=lb.get("per_method_confidence")),
            theoretical=Theoretical(theo.get("epsilon_example_max"), theo.get("epsilon_device_max"),
                                    theo.get("epsilon_group"), theo.get("delta_group")),
            exposure=Exposure(ex.get("mean_included"), ex.get("max_included"), ex.get("mean_excluded"), ex.get("chance"),
                              ex.get("max_possible"), ex.get("method"), ex.get("samples"),
                              ex.get("n_candidates")) if ex else None,
            extraction=Extraction(recovered(xt.get("included")), recovered(xt.get("excluded")), xt.get("chance_rate"),
                                  xt.get("steps"), xt.get("restarts")) if xt else None,
            warnings=tuple(audit.get("warnings") or ()), record=record)


@dataclass(frozen=True)
class Audit:
    """The audit of the run (``result``; None when none was run) and how many canaries the run
    inserted (``canaries_inserted``, from config.toml; 0 or None: none)."""

    result: AuditResult | None
    canaries_inserted: int | None

    def to_json(self) -> dict[str, Any]:
        """``{"audit": summary.json's audit object | null}``."""
        return {"audit": self.result.record if self.result is not None else None}


def compute(ctx: Context) -> Audit:
    """The audit read with the run (:func:`report.rundata.read_audit`)."""
    return Audit(result=AuditResult.of(ctx.data.audit) if ctx.data.audit else None,
                 canaries_inserted=ctx.cfg.get("canaries"))


def render(audit: Audit, doc: Doc) -> list[Block]:
    """The section: how to run an audit, or the audit's table, verdict, notes, warnings and ROC figure."""
    out: list[Block] = [("h", 2, "Measured leakage: privacy audit")]
    a = audit.result
    if a is None:
        if audit.canaries_inserted:
            return out + [("p", f"This run inserted {audit.canaries_inserted} canaries, but no audit has been run "
                                "yet: run `dpfl audit RUN_DIR`, then this section shows the measured leakage.")]
        return out + [("p", "No privacy audit was run. Insert canaries with `--canaries M` when training and "
                            "run `dpfl audit RUN_DIR` to measure leakage beside the guarantee.")]
    out.append(("p", "An audit attacks the released model and measures what leaks. The empirical epsilon it implies "
                     "is a LOWER bound: with the stated confidence the run is not (epsilon, delta)-DP for any "
                     "smaller epsilon. It can show that a run is less private than claimed, never that it is "
                     "private; the accounted epsilon above is the guarantee (an upper bound). A correct "
                     "implementation keeps the lower bound below the accounted epsilon."))
    out.append(("table", ["measure", "value"], _rows(a)))
    out += _verdict(a, doc)
    out.append(("p", _method_notes(a)))
    for w in a.warnings:
        out.append(("p", f"Note: {w}"))
    if "audit_roc" in doc.images:
        out.append(("img", "audit_roc", "ROC curves of the loss-based membership attacks (left linear, right "
                                        "log-log to show the low-FPR region); the dotted line is chance."))
    return out


def _eps_text(x: Any) -> str:
    """An accounted epsilon as text, infinity (or audit.json's "inf") as no guarantee."""
    return "∞ (no guarantee)" if x == "inf" or (isinstance(x, float) and math.isinf(x)) else fmt(x)


def _rows(a: AuditResult) -> list[list[str]]:
    """The table: model and canaries, membership inference, the epsilon lower bounds, the accounted epsilon, exposure and extraction."""
    rep = a.repeats
    rows = [
        ["model audited", f"final global model (round {fmt(a.checkpoint_round)})"],
        ["canaries", f"{fmt(a.canaries_m)} ({fmt(a.canaries_included)} included, each with probability 1/2), "
                     f"{rep} cop{'y' if rep == 1 else 'ies'} each on one device, {fmt(a.n_digits)}-digit secrets"],
    ]
    for key, name in (("canaries", "membership inference, canaries (included vs excluded)"),
                      ("real", "membership inference, real examples (training vs held-out)")):
        m = a.membership.get(key)
        if m:
            rows.append([name, f"AUC {fmt(m.auc)}; TPR {fmt(m.tpr_at_1pct_fpr)} at 1% FPR, "
                               f"{fmt(m.tpr_at_0_1pct_fpr)} at 0.1% FPR ({m.n_members} members, "
                               f"{m.n_nonmembers} non-members; chance: AUC 0.5, TPR = FPR)"])
    rows += _lower_bound_rows(a)
    rows += _accounted_rows(a)
    rows += _exposure_rows(a.exposure)
    rows += _extraction_rows(a.extraction)
    return rows


def _lower_bound_rows(a: AuditResult) -> list[list[str]]:
    """The empirical epsilon lower bound, then the one-run and Clopper-Pearson bounds it is the larger of."""
    rows = [["empirical epsilon lower bound (larger of the two below)",
             f"{fmt(a.epsilon_lower_bound)} at delta = {fmt(a.delta)}, confidence {fmt(a.confidence)}"]]
    one = a.bounds.one_run
    if one:
        rows.append(["  one-run lower bound (Steinke, Nasr & Jagielski 2023)",
                     f"{fmt(one.epsilon_lower_bound)} ({one.v} of {one.r} guesses right; at most "
                     f"{fmt(one.ceiling)} with {one.m} canaries even if every guess were right)"])
    cp = a.bounds.clopper_pearson
    if cp:
        rows.append(["  Clopper-Pearson lower bound (Jagielski, Ullman & Oprea 2020)",
                     f"{fmt(cp.epsilon_lower_bound)} (TP {cp.true_positives}/{cp.n_positives}, "
                     f"FP {cp.false_positives}/{cp.n_negatives})"])
    return rows


def _accounted_rows(a: AuditResult) -> list[list[str]]:
    """The accounted example-level epsilon, and for canaries of several copies the group (or device-level) epsilon."""
    theo, rep = a.theoretical, a.repeats
    rows = [["accounted (theoretical) epsilon, example level", _eps_text(theo.epsilon_example_max)
             + f" at delta = {fmt(a.delta)} (maximum over devices)"]]
    if rep > 1 and theo.epsilon_group not in (None, "inf"):
        dg = theo.delta_group
        rows.append([f"accounted epsilon for a group of {rep} copies on one device",
                     f"{fmt(theo.epsilon_group)} (group privacy{' or device level' if theo.epsilon_device_max is not None else ''}; "
                     + (f"delta {fmt(dg)})" if isinstance(dg, (int, float)) and dg < 1 else
                        "its delta R e^((R-1) epsilon) delta reaches 1, so group privacy gives no meaningful bound here)")])
    return rows


def _exposure_rows(ex: Exposure | None) -> list[list[str]]:
    """The exposure row (Carlini et al. 2019): included against excluded canaries, chance and the maximum; none without exposure."""
    if ex is None:
        return []
    return [["exposure (Carlini et al. 2019), bits",
             f"included canaries mean {fmt(ex.mean_included)} (max {fmt(ex.max_included)}); "
             f"excluded {fmt(ex.mean_excluded)}; chance {fmt(ex.chance)}; maximum "
             f"{fmt(ex.max_possible)} ({ex.method}"
             + (f", {ex.samples} sampled candidates per canary" if ex.samples else
                f", all {ex.n_candidates} candidates") + ")"]]


def _extraction_rows(xt: Extraction | None) -> list[list[str]]:
    """The model-inversion row (Parikh et al. 2022): secrets recovered among included and excluded canaries; none without extraction."""
    if xt is None:
        return []
    parts = []
    for key, g in (("included", xt.included), ("excluded", xt.excluded)):
        if g:
            parts.append(f"{key}: {g.n_exact} of {g.n} secrets recovered exactly (digit accuracy "
                         f"{fmt(g.digit_accuracy)})")
    return [["extraction by model inversion (Parikh et al. 2022)",
             "; ".join(parts) + f"; chance {fmt(xt.chance_rate)} per secret, 0.1 per digit "
             f"({xt.steps} steps, {xt.restarts} restarts)"]]


def _verdict(a: AuditResult, doc: Doc) -> list[Block]:
    """The lower bound set beside the guarantee: consistent, consistent with the canaries' group bound, or a WARNING.

    A run without a guarantee only states what the audit certified; a device-level-only run compares
    with the example-level bound that device level implies.
    """
    theo, rep = a.theoretical, a.repeats
    lbv = a.epsilon_lower_bound
    theo_ex = theo.epsilon_example_max
    example = doc.get("epsilon").example
    if doc.facts.not_private:
        return [("p", f"This run has no privacy guarantee ({doc.facts.not_private}); the empirical lower "
                      f"bound {fmt(lbv)} shows the leakage the audit could certify without one.")]
    if example.implied_by == "device":
        if not isinstance(lbv, (int, float)):
            return []
        return [("p", f"No example-level noise: the empirical lower bound {fmt(lbv)} is to be set beside "
                      f"the example-level bound implied by device level, {fmt(example.max)} at delta "
                      f"{fmt(example.delta)}"
                      + (" (consistent)." if lbv <= example.max else
                         ". WARNING: it exceeds that bound; if the audit's assumptions hold, the accounting "
                         "or the DP implementation is wrong for this run."))]
    if not (isinstance(lbv, (int, float)) and isinstance(theo_ex, (int, float))):
        return []
    group = theo.epsilon_group if rep > 1 else theo_ex
    if lbv <= theo_ex:
        return [("p", f"The empirical lower bound {fmt(lbv)} is below the accounted epsilon {fmt(theo_ex)}: "
                      "consistent with the guarantee (the audit is a lower bound, the accounting an upper one).")]
    if isinstance(group, (int, float)) and lbv <= group:
        return [("p", f"The empirical lower bound {fmt(lbv)} exceeds the per-example epsilon {fmt(theo_ex)} "
                      f"but not the guarantee for the {rep} copies of a canary ({fmt(group)}), which is what "
                      "the canaries test: consistent.")]
    return [("p", f"WARNING: the empirical lower bound {fmt(lbv)} exceeds the accounted epsilon "
                  f"{fmt(theo_ex)}. If the audit's assumptions hold, the accounting or the DP "
                  "implementation is wrong for this run.")]


def _method_notes(a: AuditResult) -> str:
    """How the audit's numbers are made: loss-based membership scores, the union bound over the two bounds, exposure."""
    return ("Method notes: membership scores are the model's loss on the canary's (or example's) "
            "label (Yeom et al. 2018), lower loss = member; TPR at low FPR as in Carlini et al. 2022. "
            "Each bound is computed at confidence " + fmt(a.bounds.per_method_confidence)
            + " so that the larger of the two holds at " + fmt(a.confidence) + " (union bound). The "
            "Clopper-Pearson bound treats the canaries of one run as independent trials (Jagielski et "
            "al. train one model per trial); the one-run bound is the one whose assumptions hold for "
            "many canaries in one run. Exposure: log2(candidates) - log2(rank of the true secret). "
            "Real-data membership compares training examples of devices that trained with held-out "
            "test examples.")


SECTION = Section("audit", Audit, compute, render, keys=("audit",))
