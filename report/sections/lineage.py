"""A retrained run's origin (``dpfl retrain``): what it removed, and its epsilon if the parent's models stay released."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dp.accounting import SubsampledGaussianEvent, compute_epsilons
from report.blocks import Block, fmt
from report.context import Context
from report.events import device_events
from report.rundata import UNITS
from report.sections.base import Doc, Section


@dataclass(frozen=True)
class Lineage:
    """The ledger's lineage row: this run retrains ``parent_run_id`` (in ``parent_dir``) from round
    ``from_round`` on without ``removed_devices``.

    ``replaced_events`` counts the parent's privacy events of the rounds this run replaced;
    ``epsilon_if_parent_kept`` maps each unit with such events to the max over devices of this
    run's events composed with them (nats, at delta; empty without delta): the guarantee if the
    parent's models of those rounds stay released.
    """

    parent_run_id: str
    parent_dir: str
    from_round: int
    removed_devices: tuple
    epsilon_if_parent_kept: dict[str, float]
    replaced_events: int
    record: dict[str, Any]  # the ledger row as read, in its field order (summary.json keeps it)

    def to_json(self) -> dict[str, Any]:
        """``{"lineage": {the row's fields..., "epsilon_if_parent_kept", "replaced_events"}}``."""
        return {"lineage": {**self.record, "epsilon_if_parent_kept": self.epsilon_if_parent_kept,
                            "replaced_events": self.replaced_events}}


def compute(ctx: Context) -> Lineage | None:
    """The lineage of a retrained run; None for a run trained from scratch."""
    data = ctx.data
    if not data.lineage:
        return None
    kept: dict[str, float] = {}
    delta = ctx.facts.delta
    if delta is not None:
        for unit in UNITS:
            mine = {d: device_events(data, unit, d) for d in data.events[unit]}
            theirs = data.replaced.get(unit, {})
            if not theirs:
                continue
            both = {d: mine.get(d, []) + [SubsampledGaussianEvent(s, q, n) for s, q, n in theirs.get(d, [])]
                    for d in set(mine) | set(theirs)}
            eps = compute_epsilons(both, delta, ctx.facts.accountant)
            kept[unit] = max(eps.values()) if eps else 0.0
    lin = data.lineage
    return Lineage(parent_run_id=lin["parent_run_id"], parent_dir=lin["parent_dir"], from_round=lin["from_round"],
                   removed_devices=tuple(lin["removed_devices"]), epsilon_if_parent_kept=kept,
                   replaced_events=sum(len(v) for per in data.replaced.values() for v in per.values()),
                   record=dict(lin))


def render(lin: Lineage, doc: Doc) -> list[Block]:
    """What the retraining removed (no model of this run read the removed devices' data), and what
    each unit's epsilon becomes if the parent's replaced models stay released."""
    removed = ", ".join(map(str, lin.removed_devices))
    after = ("whose deletion requests that run recorded. The ledger showed no privacy event of these devices "
             f"before round {lin.from_round}, so rounds 1-{lin.from_round - 1} (kept from that run, "
             "with their privacy events) never read their data, and from round "
             f"{lin.from_round} on they were never selected: no model of this run was trained on their data")
    text = (f"Retrained for exact removal (dpfl retrain): this run continues run {lin.parent_run_id} "
            f"({lin.parent_dir}) from round {lin.from_round} without device(s) {removed}, {after}"
            if lin.from_round > 1 else
            f"Retrained for exact removal (dpfl retrain): this run retrains run {lin.parent_run_id} "
            f"({lin.parent_dir}) from scratch without device(s) {removed}, whose deletion requests "
            "that run recorded; they were never selected, so no model of this run was trained on their data")
    out: list[Block] = [("p", text + " (their example counts still entered what the server computes from all "
                              "devices' sizes before round 1: delta and, where calibrated, the selection constant "
                              "and the noise).")]
    kept = lin.epsilon_if_parent_kept
    withdrawn = ("This run's epsilons assume that the models of that run from round "
                 f"{lin.from_round} on, which this run replaces, are withdrawn")
    out.append(("p", withdrawn + ". If they stay released, each unit's guarantee composes both runs: "
                + "; ".join(f"{u}-level epsilon {fmt(e)} at delta {fmt(doc.facts.delta)} (max over devices)"
                            for u, e in kept.items())
                + " (the parent's events of those rounds are kept in this ledger, table replaced_events; "
                  "that run's holdout evaluation, if it had one, is not included)."
                if kept else withdrawn + ("; that run recorded no privacy event in those rounds."
                                          if lin.replaced_events == 0 else ".")))
    return out


SECTION = Section("lineage", Lineage, compute, render, keys=("lineage",))
