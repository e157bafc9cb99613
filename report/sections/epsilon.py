"""The "Epsilon per privacy unit" section: each unit's epsilon over devices, over examples, by
activity quartile and against round, recomputed from the ledger's privacy events."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from dp.accounting import DEFAULT_VALUE_DISCRETIZATION_INTERVAL, privacy_tier
from report.blocks import TIER_WORDS, Block, fmt
from report.context import Context
from report.events import LedgerRanges, QuartileEpsilon, by_activity_quartile, unit_epsilons
from report.over_examples import OverExamples, over_examples
from report.rundata import UNITS, RunData
from report.sections.base import Doc, Section
from report.stats import median, quantile

# Intermediate curve points use a 4x coarser PLD grid (still a pessimistic upper bound);
# the final point is the exact summary value.
CURVE_INTERVAL_FACTOR = 4.0


@dataclass(frozen=True)
class UnitStats:
    """One accounted unit's per-device epsilon (nats, at delta) and its statistics over devices.

    ``median`` / ``p90`` / ``min`` / ``mean`` are over the ``devices_accounted`` devices with at
    least one event of the unit; ``median_all_devices`` counts the others at 0. ``tier`` is the
    strength of ``max`` (:func:`dp.accounting.privacy_tier`), ``max_device`` the device that has it,
    ``ledger_max`` the ledger's cached maximum (None without cache). ``over_examples`` only at example level.

    ``withheld`` (:attr:`report.context.Facts.withheld`): the unit's per-device figures depend on device
    participation, which is secret under device-level DP, so ``per_device`` and ``max_device`` stay
    inside the report (the distribution figure uses the values, without device ids) and are left out
    of summary.json; every statistic over devices is still given.
    """

    max: float
    median: float
    median_all_devices: float
    p90: float
    min: float
    mean: float
    devices_accounted: int
    tier: str
    max_device: int | None
    ledger_max: float | None
    per_device: dict[int, float]
    by_activity_quartile: tuple[QuartileEpsilon, ...]
    mechanism: LedgerRanges
    over_examples: OverExamples | None = None
    withheld: bool = False
    implied_by: ClassVar[str | None] = None  # accounted from the ledger, not implied by another unit

    def to_json(self) -> dict[str, Any]:
        """The unit's object in summary.json (``over_examples`` only at example level; no ``max_device``
        and no ``per_device`` when ``withheld``)."""
        out = {"max": self.max, "median": self.median, "median_all_devices": self.median_all_devices,
               "p90": self.p90, "min": self.min, "mean": self.mean, "devices_accounted": self.devices_accounted,
               "tier": self.tier, "max_device": self.max_device, "ledger_max": self.ledger_max,
               "per_device": self.per_device, "by_activity_quartile": [q.to_json() for q in self.by_activity_quartile],
               "mechanism": self.mechanism.to_json()}
        if self.withheld:
            del out["max_device"], out["per_device"]
        if self.over_examples is not None:
            out["over_examples"] = self.over_examples.to_json()
        return out


@dataclass(frozen=True)
class Implied:
    """The example-level bound implied by device-level DP when no example-level noise was added.

    One example is part of one device's data: changing it is at most removing the device and adding
    it back with the changed data (example counts public, so q_k is the same), so group privacy over
    those two steps gives, for a device with device-level (eps_k, delta), (2 eps_k, (1 + e^eps_k)
    delta) at example level. ``max`` / ``median`` are 2 x the device level's; ``delta`` is
    (1 + e^eps) delta at the maximum device epsilon (capped at 1, where the bound says nothing).
    """

    max: float
    median: float
    tier: str
    delta: float
    device_epsilon_max: float
    devices_accounted: int
    implied_by: ClassVar[str | None] = "device"

    @classmethod
    def of(cls, device: UnitStats, delta: float) -> "Implied":
        """The bound implied by ``device``'s statistics at ``delta``."""
        emax = float(device.max or 0.0)
        med = float(device.median or 0.0)
        d = min(1.0, (1.0 + math.exp(min(emax, 700.0))) * delta) if math.isfinite(emax) else 1.0
        return cls(max=2.0 * emax, median=2.0 * med, tier=privacy_tier(2.0 * emax), delta=d,
                   device_epsilon_max=emax, devices_accounted=device.devices_accounted)

    def to_json(self) -> dict[str, Any]:
        """``{"max", "median", "tier", "delta", "implied_by": "device", "device_epsilon_max", "devices_accounted"}``."""
        return {"max": self.max, "median": self.median, "tier": self.tier, "delta": self.delta,
                "implied_by": "device", "device_epsilon_max": self.device_epsilon_max,
                "devices_accounted": self.devices_accounted}


@dataclass(frozen=True)
class Unprotected:
    """A unit without any guarantee: epsilon is infinite."""

    max: float = math.inf
    median: float = math.inf
    tier: str = "none"
    implied_by: ClassVar[str | None] = None

    def to_json(self) -> dict[str, Any]:
        """``{"max": inf, "median": inf, "tier": "none"}``."""
        return {"max": self.max, "median": self.median, "tier": self.tier}


@dataclass(frozen=True)
class CurvePoint:
    """Max and median epsilon (over devices with events so far) after ``round``."""

    round: int
    max: float
    median: float

    def to_json(self) -> dict[str, Any]:
        """``{"round", "max", "median"}``."""
        return {"round": self.round, "max": self.max, "median": self.median}


@dataclass(frozen=True)
class Epsilon:
    """Each unit's epsilon: ``example`` is accounted (:class:`UnitStats`), implied by device level
    (:class:`Implied`) or :class:`Unprotected`; ``device`` is accounted or None (no device-level DP).
    ``curves`` maps each unit to its epsilon after selected rounds (empty when not accounted);
    ``withheld`` the units whose per-device figures are withheld (:func:`report.context.withheld_units`)."""

    example: UnitStats | Implied | Unprotected
    device: UnitStats | None
    curves: dict[str, tuple[CurvePoint, ...]]
    delta: float | None
    reproducible: bool
    withheld: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """``{"epsilon": {"example", "device"}, "curves": {"example": [...], "device": [...]}}``, and
        ``"per_device_withheld": {"units": [...], "reason": str}`` when some unit's per-device figures are withheld."""
        out = {"epsilon": {"example": self.example.to_json(),
                           "device": self.device.to_json() if self.device is not None else None},
               "curves": {u: [p.to_json() for p in self.curves[u]] for u in UNITS}}
        if self.withheld:
            out["per_device_withheld"] = {"units": list(self.withheld), "reason": withheld_sentence(self.withheld)}
        return out

    @property
    def accounted(self) -> dict[str, UnitStats]:
        """The units with per-device epsilons (accounted from the ledger, not an implied bound)."""
        return {u: s for u, s in (("example", self.example), ("device", self.device)) if isinstance(s, UnitStats)}


def unit_stats(data: RunData, unit: str, eps: dict[int, float]) -> UnitStats:
    """The statistics of ``unit``'s per-device epsilons ``eps``."""
    values = list(eps.values())
    all_devices = set(data.devices) | set(eps)
    with_zeros = values + [0.0] * (len(all_devices) - len(values))
    ledger = data.ledger_epsilon[unit]
    return UnitStats(
        max=max(values) if values else 0.0,
        median=median(values) if values else 0.0,
        median_all_devices=median(with_zeros) if with_zeros else 0.0,
        p90=quantile(values, 0.9) if values else 0.0,
        min=min(values) if values else 0.0,
        mean=(sum(values) / len(values)) if values else 0.0,
        devices_accounted=len(values),
        tier=privacy_tier(max(values) if values else 0.0),
        max_device=max(eps, key=lambda d: eps[d]) if eps else None,
        ledger_max=max(ledger.values()) if ledger else None,
        per_device=dict(sorted(eps.items())),
        by_activity_quartile=by_activity_quartile(data, unit, eps),
        mechanism=LedgerRanges.of(data, unit),
    )


def _curve_rounds(rounds: list[int], max_points: int) -> list[int]:
    if len(rounds) <= max_points:
        return list(rounds)
    idx = {round(i * (len(rounds) - 1) / (max_points - 1)) for i in range(max_points)}
    return [rounds[i] for i in sorted(idx)]


def epsilon_curve(data: RunData, unit: str, delta: float, accountant: str, max_points: int) -> tuple[CurvePoint, ...]:
    """Max and median (over devices with events so far) epsilon after at most ``max_points`` rounds."""
    rounds = sorted({t for rows in data.events[unit].values() for t, *_ in rows}
                    | {r["round"] for r in data.rounds})
    out = []
    points = _curve_rounds(rounds, max_points)
    for t in points:
        interval = DEFAULT_VALUE_DISCRETIZATION_INTERVAL * (1.0 if t == points[-1] else CURVE_INTERVAL_FACTOR)
        eps = [e for d, e in unit_epsilons(data, unit, delta, accountant, t, interval).items()
               if any(r[0] <= t for r in data.events[unit][d])]
        out.append(CurvePoint(round=t, max=max(eps) if eps else 0.0, median=median(eps) or 0.0))
    return tuple(out)


def compute(ctx: Context) -> Epsilon:
    """Each unit's statistics and curve; warns when the ledger's cached epsilon exceeds the recomputed one."""
    data, delta, acc = ctx.data, ctx.facts.delta, ctx.facts.accountant
    stats: dict[str, UnitStats] = {}
    curves: dict[str, tuple[CurvePoint, ...]] = {u: () for u in UNITS}
    for unit in UNITS:
        if not ctx.accounted(unit):
            continue
        eps = ctx.epsilons[unit]
        st = unit_stats(data, unit, eps)
        if st.ledger_max is not None and st.max < st.ledger_max * (1 - 1e-2):
            ctx.warnings.append(
                f"{unit}-level: the ledger's cached epsilon ({st.ledger_max:.4g}) exceeds the value "
                f"recomputed from its events ({st.max:.4g}); the larger is the safe one."
            )
        if unit == "example":
            st = dataclasses.replace(st, over_examples=over_examples(data, delta, acc, eps))
        if unit in ctx.facts.withheld:
            st = dataclasses.replace(st, withheld=True)
        stats[unit] = st
        curves[unit] = epsilon_curve(data, unit, delta, acc, ctx.max_curve_points)
    device = stats.get("device")
    if ctx.facts.dp_on:
        example: UnitStats | Implied | Unprotected = stats["example"]
    else:
        example = Implied.of(device, delta) if device is not None else Unprotected()
    return Epsilon(example=example, device=device, curves=curves, delta=delta, reproducible=ctx.facts.reproducible,
                   withheld=tuple(u for u in ctx.facts.withheld if u in stats))


def withheld_sentence(withheld: tuple[str, ...]) -> str:
    """The report's one sentence on the per-device figures it withholds under device-level DP (and, when
    the device level's are given, why they may be)."""
    text = ("Per-device figures are withheld because device participation is secret under device-level DP "
            "(its guarantee is amplified by the secret Poisson selection of devices): a device's example-level "
            "epsilon grows only in the rounds it joined, so this report and summary.json name no device's "
            "example-level epsilon, no device with the largest, no device that reached an example-level budget, "
            "and draw no example-level epsilon against activity; they give aggregates over devices (counts, "
            "max, median, quantiles, activity quartiles, the distribution).")
    if "device" in withheld:
        text += (" The device level's per-device figures are withheld too: a device whose example-level budget "
                 "runs out is not selected again and stops accruing device-level events, so its device-level "
                 "epsilon would reveal how often it joined.")
    else:
        text += (" Per-device device-level epsilons are given: every device with q_k > 0 accrues a device-level "
                 "event in each round it has q_k > 0 (every round, or its group's rounds under cyclic selection), "
                 "selected or not, so they do not depend on participation.")
    return text


def render(e: Epsilon, doc: Doc) -> list[Block]:
    """The section of a private run (nothing without DP): the table, how to read it, epsilon over
    examples, by activity quartile, and the figures drawn."""
    if not doc.facts.any_dp:
        return []
    out: list[Block] = [("h", 2, "Epsilon per privacy unit")]
    out.append(_table(e))
    out.append(("p", _note(e)))
    if e.withheld:
        out.append(("p", withheld_sentence(e.withheld)))
    out += _over_examples_blocks(e)
    out += _quartile_blocks(e)
    out += _figures(doc)
    return out


def _table(e: Epsilon) -> Block:
    """One row per unit: max, median, p90, min over devices, devices accounted, strength and the ledger's cached max.

    An example level implied by device level shows its bound (<=); an unprotected unit shows infinity.
    """
    header = ["unit", "max", "median", "p90", "min", "devices accounted", "strength", "ledger's cached max"]
    trows = []
    for unit, st in (("example", e.example), ("device", e.device)):
        if isinstance(st, Implied):
            trows.append([unit, f"<= {fmt(st.max)} (2 x device level, at delta {fmt(st.delta)})",
                          f"<= {fmt(st.median)}", "", "", str(st.devices_accounted),
                          TIER_WORDS[st.tier], ""])
        elif isinstance(st, UnitStats):
            trows.append([unit, fmt(st.max), fmt(st.median), fmt(st.p90), fmt(st.min),
                          str(st.devices_accounted), TIER_WORDS[st.tier], fmt(st.ledger_max)])
        else:
            trows.append([unit, "∞ (not protected)", "", "", "", "", "none", ""])
    return ("table", header, trows)


def _note(e: Epsilon) -> str:
    """How to read the epsilon table: the delta, what the medians are over, the strength tiers."""
    return (f"All epsilons are at delta = {fmt(e.delta)} unless stated. The median is over devices with "
            "at least one event of that unit; devices that never trained have epsilon 0 (median over all "
            "devices: " + ", ".join(f"{u} {fmt(s.median_all_devices)}" for u, s in e.accounted.items())
            + "). Strength tiers: <= 1 strong, <= 10 reasonable, > 10 weak."
            + (" These epsilons do NOT hold for this run (--reproducible-noise)." if e.reproducible else ""))


def _over_examples_blocks(e: Epsilon) -> list[Block]:
    """Example-level epsilon over examples instead of devices (from the ledger's holdings, or static data)."""
    oe = e.example.over_examples if isinstance(e.example, UnitStats) else None
    if not (oe and oe.examples):
        return []
    how = ("the rounds in which its device trained while holding it (the ledger's example holdings: "
           "examples that arrived late or were deleted early compose fewer rounds)"
           if oe.source == "holdings" else "every round its device trained (static data: an example "
           "inherits its device's epsilon)")
    return [("p", f"Over examples instead of devices: each example's epsilon composes {how}. Over "
                  f"{oe.examples} examples ({oe.examples_trained} touched by training): max "
                  f"{fmt(oe.max)}, median {fmt(oe.median)}, p90 {fmt(oe.p90)}, mean "
                  f"{fmt(oe.mean)}, at delta = {fmt(e.delta)}.")]


def _quartile_blocks(e: Epsilon) -> list[Block]:
    """Per-device epsilon by activity quartile (who spends the privacy), per accounted unit."""
    out: list[Block] = []
    for unit, st in e.accounted.items():
        rows = st.by_activity_quartile
        if not rows:
            continue
        # device level: every device with q_k > 0 takes part in each round's mechanism, picked or not
        joined = ("devices that joined", "rounds joined (mean)") if unit == "example" else \
            ("devices accounted", "rounds accounted (mean; every round with q_k > 0)")
        out.append(("p", f"{unit.capitalize()}-level epsilon by activity quartile: the devices holding data, "
                         "sorted by their starting activity (training examples) and split into four groups of "
                         "equal size, Q1 the lightest; a device that never joined a round counts with epsilon 0."))
        out.append(("table", ["quartile", "activity", "devices", *joined,
                              "median epsilon", "max epsilon"],
                    [[f"Q{r.quartile}", f"{r.activity_min}-{r.activity_max}", str(r.devices),
                      str(r.devices_joined), f"{r.rounds_joined_mean:.2f}", fmt(r.epsilon_median),
                      fmt(r.epsilon_max)] for r in rows]))
    return out


def _figures(doc: Doc) -> list[Block]:
    """The epsilon figures that were drawn: against round, against activity, and the distribution over devices."""
    out: list[Block] = []
    if "epsilon_vs_round" in doc.images:
        out.append(("img", "epsilon_vs_round", "Epsilon against round (max and median over devices), "
                    "recomputed from the ledger by composing each device's events up to that round."))
    if "epsilon_vs_activity" in doc.images:
        shown = [u for u in UNITS if u not in doc.facts.withheld]
        out.append(("img", "epsilon_vs_activity", "Each device's epsilon against its starting activity."
                    if not doc.facts.withheld else
                    f"Each device's {' and '.join(shown)}-level epsilon against its starting activity."))
    if "epsilon_distribution" in doc.images:
        out.append(("img", "epsilon_distribution", "Distribution of per-device epsilon."))
    return out


SECTION = Section("epsilon", Epsilon, compute, render, keys=("epsilon", "curves", "per_device_withheld"))
