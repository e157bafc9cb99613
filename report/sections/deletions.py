"""The "Deletion requests" section: each request (``--deletions``), what the run did, and what its
guarantee says about the deleted data."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from report.blocks import Block, fmt
from report.context import Context, Facts
from report.rundata import UNITS
from report.sections.base import Doc, Section


@dataclass(frozen=True)
class GroupBound:
    """Example-level DP extended to all n_k examples of a device by group privacy:
    (n_k eps, n_k e^((n_k - 1) eps) delta) (Dwork & Roth 2014, Theorem 2.2 and its approximate-DP
    form); ``delta`` None when that exceeds 1, where the bound says nothing."""

    epsilon: float
    delta: float | None

    def to_json(self) -> dict[str, Any]:
        """``{"epsilon", "delta"}``."""
        return {"epsilon": self.epsilon, "delta": self.delta}


@dataclass(frozen=True)
class DeletionRow:
    """Device ``device_id`` deleted from round ``round``: its ``first_joined`` round (ledger),
    ``rounds_joined`` (its rounds with an example- or device-level event, all before ``round``) and
    the last, ``examples`` (its starting activity n_k), ``epsilon_example`` (per example, nats at
    delta; 0 when it never joined), ``epsilon_device`` (when the run has device level) and ``group``.

    ``withheld`` names the fields left out of summary.json and the table (:func:`withheld_fields`).
    """

    device_id: int
    round: int
    first_joined: int | None
    rounds_joined: int
    last_joined: int | None
    examples: int
    epsilon_example: float | None
    epsilon_device: float | None
    group: GroupBound | None
    withheld: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The row's object in summary.json's ``deletions`` (without the ``withheld`` fields)."""
        out = {"device_id": self.device_id, "round": self.round, "first_joined": self.first_joined,
               "rounds_joined": self.rounds_joined, "last_joined": self.last_joined, "examples": self.examples,
               "epsilon_example": self.epsilon_example, "epsilon_device": self.epsilon_device,
               "group": self.group.to_json() if self.group is not None else None}
        return {k: v for k, v in out.items() if k not in self.withheld}


#: The fields of a deletion row that depend on (or, under device-level DP, would be mistaken for) the
#: rounds the device joined.
PARTICIPATION_FIELDS = ("first_joined", "rounds_joined", "last_joined")


def withheld_fields(facts: Facts) -> tuple[str, ...]:
    """The fields of a deletion row the report leaves out (none without device-level DP).

    Under device-level DP which devices joined a round is secret (:attr:`Facts.participation_secret`).
    The request itself (device, round, example count) is not participation and is given.
    ``first_joined`` / ``rounds_joined`` / ``last_joined`` come from the device's events of either
    unit: their example-level part exists only for rounds the device joined; their device-level part
    (one event per round with q_k > 0, selected or not) would make them count the rounds in which
    the device could have been selected, not those it joined, and stops early when an example-level
    budget ran out (:func:`report.context.withheld_units`). Either way they are not figures the
    report may state of a named device, so all three are withheld. ``epsilon_example`` and ``group``
    (built from it) are withheld too: with example-level DP on they are the example level's
    per-device figures (withheld, :func:`report.context.withheld_units`); without it the example
    level is only the bound device level implies, and the row would show "0" or "n/a" depending on
    ``rounds_joined``. ``epsilon_device`` is withheld with the device level's per-device figures.
    """
    if not facts.participation_secret:
        return ()
    out = [*PARTICIPATION_FIELDS, "epsilon_example", "group"]
    if "device" in facts.withheld:
        out.append("epsilon_device")
    return tuple(out)


@dataclass(frozen=True)
class Deletions:
    """The run's deletion requests (empty without ``--deletions``), and the delta its epsilons are at."""

    rows: tuple[DeletionRow, ...]
    delta: float | None
    withheld: tuple[str, ...] = ()  # the rows' fields left out (:func:`withheld_fields`)

    def to_json(self) -> dict[str, Any]:
        """``{"deletions": [row]}``."""
        return {"deletions": [r.to_json() for r in self.rows]}


def compute(ctx: Context) -> Deletions:
    """Each deletion request with the deleted device's rounds and epsilons."""
    data, delta = ctx.data, ctx.facts.delta
    withheld = withheld_fields(ctx.facts)
    ex, dv = ctx.epsilons.get("example", {}), ctx.epsilons.get("device", {})
    out = []
    for d in data.deletions:
        k = int(d["device_id"])
        joined = sorted({r[0] for u in UNITS for r in data.events[u].get(k, [])})
        n = int((data.devices.get(k) or {}).get("activity") or 0)
        e = ex.get(k)
        group = None
        if e is not None and n > 0 and delta is not None and math.isfinite(e):
            g_delta = n * math.exp(min((n - 1) * e, 700.0)) * delta
            group = GroupBound(epsilon=n * e, delta=g_delta if g_delta <= 1 else None)
        out.append(DeletionRow(device_id=k, round=int(d["round"]), first_joined=d.get("first_joined"),
                               rounds_joined=len(joined), last_joined=joined[-1] if joined else None, examples=n,
                               epsilon_example=e if k in ex else (0.0 if not joined else None),
                               epsilon_device=dv.get(k), group=group, withheld=withheld))
    return Deletions(rows=tuple(out), delta=delta, withheld=withheld)


def render(dels: Deletions, doc: Doc) -> list[Block]:
    """The requests, their table, and what example- and device-level DP say about the deleted data;
    nothing for a run without requests."""
    if not dels.rows:
        return []
    out: list[Block] = [("h", 2, "Deletion requests")]
    out.append(("p", f"{len(dels.rows)} device(s) asked to be forgotten (--deletions). From its request's round on a "
                     "device is never selected again and is not asked for a holdout evaluation; the ledger records "
                     "each request (table deletions). Models released before that round were trained while the "
                     "device took part, and they stay released: removal from them is not exact."))
    hidden = set(dels.withheld)
    dp_on = doc.facts.dp_on
    if hidden:
        what = ["the rounds each device joined"] + [
            name for key, name in (("epsilon_example", "its example-level epsilon"),
                                   ("epsilon_device", "its device-level epsilon"))
            if key in hidden and (key != "epsilon_example" or dp_on)]
        out.append(("p", "Device participation is secret under device-level DP, so the table withholds "
                         + (", ".join(what[:-1]) + " and " + what[-1] if len(what) > 1 else what[0])
                         + ("; each epsilon withheld is at most its level's maximum over devices (Epsilon per "
                            "privacy unit)." if len(what) > 1 else ".")))
    columns = [  # (field, header, cell)
        (None, "device", lambda d: str(d.device_id)),
        (None, "from round", lambda d: str(d.round)),
        ("first_joined", "first joined", lambda d: fmt(d.first_joined)),
        ("rounds_joined", "rounds joined", lambda d: str(d.rounds_joined)),
        (None, "examples (round 1)", lambda d: str(d.examples)),
        ("epsilon_example", "example-level epsilon", lambda d: fmt(d.epsilon_example)),
        ("group", "all its examples (group privacy)", _group_cell),
        ("epsilon_device", "device-level epsilon", lambda d: fmt(d.epsilon_device)),
    ]
    columns = [c for c in columns if c[0] not in hidden]
    out.append(("table", [h for _, h, _ in columns], [[cell(d) for _, _, cell in columns] for d in dels.rows]))
    example_eps = (f"the example-level epsilon above, at delta {fmt(dels.delta)}" if "epsilon_example" not in hidden
                   else f"its example-level epsilon, at most the maximum over devices, at delta {fmt(dels.delta)}"
                   if dp_on else "here the bound device level implies, at most the example level's maximum in "
                                 "Epsilon per privacy unit")
    device_eps = ("device-level epsilon column, when the run has it" if "epsilon_device" not in hidden
                  else "at most the device level's maximum over devices")
    joined = ("joined" if not dels.withheld else
              "had a privacy event (under device-level DP, every round in which it could have been selected)")
    out.append(("p", "What the guarantee says about the deleted data. Example-level DP bounds what every release "
                     f"reveals about any ONE example of the device ({example_eps}). It does not cover the device's "
                     "data as a whole: group privacy extends it to all "
                     "n_k examples only as (n_k epsilon, n_k e^((n_k - 1) epsilon) delta) (Dwork & Roth 2014, Theorem "
                     "2.2), which for more than a few examples says little. Device-level DP (--device-dp) covers "
                     f"the whole device directly ({device_eps}). For exact "
                     "removal, `dpfl retrain RUN_DIR --from-round T` retrains from the kept checkpoint before the "
                     f"first round T in which any deleted device {joined}; a device that never joined trained no "
                     "model. Its example count still entered what the server computes from all devices' sizes "
                     "before round 1: delta and, where calibrated, the selection constant and the noise."))
    return out


def _group_cell(d: DeletionRow) -> str:
    """The group-privacy bound of a row, or n/a."""
    g = d.group
    return ("n/a" if g is None else
            f"{fmt(g.epsilon)} at delta {fmt(g.delta)}" if g.delta is not None else
            f"{fmt(g.epsilon)} (delta > 1: no bound)")


SECTION = Section("deletions", Deletions, compute, render, keys=("deletions",))
