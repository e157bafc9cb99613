"""The "Deletion requests" section: each request (``--deletions``), what the run did, and what its
guarantee says about the deleted data."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from report.blocks import Block, fmt
from report.context import Context
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
    delta; 0 when it never joined), ``epsilon_device`` (when the run has device level) and ``group``."""

    device_id: int
    round: int
    first_joined: int | None
    rounds_joined: int
    last_joined: int | None
    examples: int
    epsilon_example: float | None
    epsilon_device: float | None
    group: GroupBound | None

    def to_json(self) -> dict[str, Any]:
        """The row's object in summary.json's ``deletions``."""
        return {"device_id": self.device_id, "round": self.round, "first_joined": self.first_joined,
                "rounds_joined": self.rounds_joined, "last_joined": self.last_joined, "examples": self.examples,
                "epsilon_example": self.epsilon_example, "epsilon_device": self.epsilon_device,
                "group": self.group.to_json() if self.group is not None else None}


@dataclass(frozen=True)
class Deletions:
    """The run's deletion requests (empty without ``--deletions``), and the delta its epsilons are at."""

    rows: tuple[DeletionRow, ...]
    delta: float | None

    def to_json(self) -> dict[str, Any]:
        """``{"deletions": [row]}``."""
        return {"deletions": [r.to_json() for r in self.rows]}


def compute(ctx: Context) -> Deletions:
    """Each deletion request with the deleted device's rounds and epsilons."""
    data, delta = ctx.data, ctx.facts.delta
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
                               epsilon_device=dv.get(k), group=group))
    return Deletions(rows=tuple(out), delta=delta)


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
    rows = []
    for d in dels.rows:
        g = d.group
        group = ("n/a" if g is None else
                 f"{fmt(g.epsilon)} at delta {fmt(g.delta)}" if g.delta is not None else
                 f"{fmt(g.epsilon)} (delta > 1: no bound)")
        rows.append([str(d.device_id), str(d.round), fmt(d.first_joined), str(d.rounds_joined),
                     str(d.examples), fmt(d.epsilon_example), group, fmt(d.epsilon_device)])
    out.append(("table", ["device", "from round", "first joined", "rounds joined", "examples (round 1)",
                          "example-level epsilon", "all its examples (group privacy)", "device-level epsilon"], rows))
    out.append(("p", "What the guarantee says about the deleted data. Example-level DP bounds what every release "
                     "reveals about any ONE example of the device (the example-level epsilon above, at delta "
                     f"{fmt(dels.delta)}). It does not cover the device's data as a whole: group privacy extends it to all "
                     "n_k examples only as (n_k epsilon, n_k e^((n_k - 1) epsilon) delta) (Dwork & Roth 2014, Theorem "
                     "2.2), which for more than a few examples says little. Device-level DP (--device-dp) covers "
                     "the whole device directly (device-level epsilon column, when the run has it). For exact "
                     "removal, `dpfl retrain RUN_DIR --from-round T` retrains from the kept checkpoint before the "
                     "first round T in which any deleted device joined; a device that never joined trained no "
                     "model. Its example count still entered what the server computes from all devices' sizes "
                     "before round 1: delta and, where calibrated, the selection constant and the noise."))
    return out


SECTION = Section("deletions", Deletions, compute, render, keys=("deletions",))
