"""The "Budgets" section: every per-device epsilon budget the server enforced, how many devices
reached it, any device above it, and the devices removed from selection for their budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from report.blocks import Block, fmt, n_devices
from report.context import Context, Facts
from report.rundata import UNITS
from report.sections.base import Doc, Section

# A recomputed epsilon counts as over its budget only above budget * (1 + this) (float noise).
OVER_BUDGET_TOLERANCE = 1e-9
# Budget events listed in the report (summary.json has them all).
MAX_EVENT_ROWS = 200


@dataclass(frozen=True)
class BudgetEvent:
    """A device removed from selection: its ``unit``'s budget would have been passed in ``round``,
    at ``epsilon`` (nats, at delta)."""

    device_id: int
    unit: str
    round: int
    epsilon: float | None

    def to_json(self) -> dict[str, Any]:
        """``{"device_id", "unit", "round", "epsilon"}``."""
        return {"device_id": self.device_id, "unit": self.unit, "round": self.round, "epsilon": self.epsilon}


@dataclass(frozen=True)
class UnitBudget:
    """One unit's budget: ``epsilon`` per device (nats, at delta; None when budget events exist but
    config.toml records no budget), the settings it came ``from_``, the devices that ``reached`` it
    (a budget event: their next round would have passed it) and those ``over`` it (recomputed
    epsilon above it, which the server should never allow; ``worst``: the largest such epsilon).

    ``withheld``: the unit's per-device figures are withheld (:func:`report.context.withheld_units`):
    which devices reached the budget, and which are over it, depend on participation under
    device-level DP; summary.json then gives only how many (``devices_reached``, ``devices_over_count``).
    """

    epsilon: float | None
    from_: tuple[str, ...]
    reached: tuple[int, ...]
    over: tuple[int, ...]
    worst: float = 0.0
    withheld: bool = False

    def to_json(self) -> dict[str, Any]:
        """``{"epsilon", "from", "devices_reached", "devices_reached_ids", "devices_over"}``; when ``withheld``
        ``{"epsilon", "from", "devices_reached", "devices_over_count"}`` (no device ids)."""
        if self.withheld:
            return {"epsilon": self.epsilon, "from": list(self.from_), "devices_reached": len(self.reached),
                    "devices_over_count": len(self.over)}
        return {"epsilon": self.epsilon, "from": list(self.from_), "devices_reached": len(self.reached),
                "devices_reached_ids": list(self.reached), "devices_over": list(self.over)}


@dataclass(frozen=True)
class Budgets:
    """The budgets of the run.

    The server's example-level budget is min(``max_epsilon``, ``target_epsilon``) (both per-device
    example-level budgets; ``target_epsilon`` also calibrates sigma), its device-level budget
    ``target_epsilon_device``; ``example`` / ``device`` are None when that unit has neither a budget
    nor a budget event. ``events`` are the ledger's budget events; ``withheld`` the units whose
    per-device figures are withheld (:attr:`report.context.Facts.withheld`): their events name a
    device whose budget ran out because of the rounds it joined, so summary.json's ``budget_events``
    and the report's table leave them out (``devices_over_budget`` and ``devices_reached`` count them).
    """

    facts: Facts
    max_epsilon: float | None
    target_epsilon: float | None
    target_epsilon_device: float | None
    example: UnitBudget | None
    device: UnitBudget | None
    events: tuple[BudgetEvent, ...] = ()
    withheld: tuple[str, ...] = ()

    @property
    def released_events(self) -> tuple[BudgetEvent, ...]:
        """The budget events of the units whose per-device figures are released."""
        return tuple(e for e in self.events if e.unit not in self.withheld)

    @property
    def devices_removed(self) -> int:
        """How many devices were removed from selection for a budget."""
        return len({b.device_id for b in self.events})

    def unit(self, unit: str) -> UnitBudget | None:
        """The budget of ``unit`` ("example" or "device")."""
        return self.example if unit == "example" else self.device

    def to_json(self) -> dict[str, Any]:
        """``devices_over_budget``, ``budget_events`` and ``budget`` (the settings, the budget per unit)."""
        ex, dv = self.example, self.device
        return {
            "devices_over_budget": self.devices_removed,
            "budget_events": [e.to_json() for e in self.released_events],
            "budget": {"max_epsilon": self.max_epsilon, "target_epsilon": self.target_epsilon,
                       "target_epsilon_device": self.target_epsilon_device,
                       "epsilon_budget": ex.epsilon if ex else None, "device_epsilon_budget": dv.epsilon if dv else None,
                       "example": ex.to_json() if ex else None, "device": dv.to_json() if dv else None},
        }

    def headline(self) -> str:
        """The summary's budget sentence: each unit's budget, how many devices reached or passed it, and how many were removed."""
        parts = []
        for unit in UNITS:
            u = self.unit(unit)
            if u and u.epsilon is not None:
                over = len(u.over)
                parts.append(f"{unit} level epsilon <= {fmt(u.epsilon)} per device ({n_devices(len(u.reached))} "
                             "reached it" + (f"; {over} ABOVE it" if over else "") + ")")
        text = "Budgets: " + ("; ".join(parts) if parts else "none set") + "."
        return text + f" Devices removed from selection because of their budget: {self.devices_removed}."


def compute(ctx: Context) -> Budgets:
    """Each unit's budget, the devices that reached it and those over it; warns for a device over its budget.

    A device *reached* a budget when the ledger has a budget event of that unit for it; it is
    *over* a budget when its recomputed epsilon exceeds it.
    """
    cfg, facts, events = ctx.cfg, ctx.facts, ctx.data.budget_events
    max_eps, target, tdev = cfg.get("max_epsilon"), cfg.get("target_epsilon"), cfg.get("target_epsilon_device")
    settings = {
        "example": [(k, v) for k, v in (("max_epsilon", max_eps), ("target_epsilon", target))
                    if v is not None] if facts.dp_on else [],
        "device": [("target_epsilon_device", tdev)] if facts.device_dp and tdev is not None else [],
    }
    units: dict[str, UnitBudget | None] = {}
    for unit in UNITS:
        reached = sorted({int(b["device_id"]) for b in events if b.get("unit") == unit})
        if not settings[unit] and not reached:
            units[unit] = None
            continue
        budget = min(float(v) for _, v in settings[unit]) if settings[unit] else None
        per = ctx.epsilons.get(unit, {})
        over = sorted(int(d) for d, e in per.items()
                      if budget is not None and e > budget * (1 + OVER_BUDGET_TOLERANCE))
        units[unit] = UnitBudget(epsilon=budget, from_=tuple(k for k, _ in settings[unit]), reached=tuple(reached),
                                 over=tuple(over), worst=max((per.get(d, 0.0) for d in over), default=0.0),
                                 withheld=unit in facts.withheld)
    for unit in UNITS:
        u = units[unit]
        if u is not None and u.over:
            ctx.warnings.append(
                f"{unit}-level: {len(u.over)} device(s) have an epsilon ABOVE their budget of {u.epsilon:g}"
                + ("" if u.withheld else
                   f" (devices {', '.join(map(str, u.over[:20]))}{', ...' if len(u.over) > 20 else ''})")
                + "; the server should never let this happen."
            )
    return Budgets(facts=facts, max_epsilon=max_eps, target_epsilon=target, target_epsilon_device=tdev,
                   example=units["example"], device=units["device"],
                   events=tuple(BudgetEvent(b["device_id"], b["unit"], b["round"], b["epsilon"]) for b in events),
                   withheld=facts.withheld)


def render(b: Budgets, doc: Doc) -> list[Block]:
    """The bullets (:func:`_items`), the BUDGET EXCEEDED alerts (:func:`_exceeded_alerts`), and the
    devices removed from selection (:func:`_event_blocks`)."""
    out: list[Block] = [("h", 2, "Budgets")]
    if not b.facts.any_dp:
        out.append(("p", "No privacy budget applies: the run is not private."))
        return out
    items, any_budget = _items(b)
    out.append(("ul", items))
    exceeded = _exceeded_alerts(b)
    out += exceeded
    out += _event_blocks(b, any_budget, bool(exceeded))
    return out


def _example_source(u: UnitBudget, b: Budgets) -> str:
    """Which settings set the example-level budget, e.g. ``--max-epsilon 6`` or the min of two."""
    values = {"max_epsilon": ("--max-epsilon", b.max_epsilon), "target_epsilon": ("--target-epsilon", b.target_epsilon)}
    parts = [f"{values[k][0]} {fmt(values[k][1])}" for k in u.from_ if k in values]
    if len(parts) == 2:
        return f"from {parts[0]} and {parts[1]}: the server uses the smaller, min(--max-epsilon, --target-epsilon)"
    return f"from {parts[0]}" if parts else "source not recorded"


def _items(b: Budgets) -> tuple[list[str], bool]:
    """One bullet per unit that applies (its budget, where it came from, how many devices reached it), and whether any budget is set.

    A unit without a budget says that devices were selected whatever their epsilon.
    """
    delta = b.facts.delta
    items = []
    any_budget = False
    for unit, label, applies in (("example", "Example level", b.facts.dp_on), ("device", "Device level", b.facts.device_dp)):
        u = b.unit(unit)
        if u is None:
            if applies:
                items.append(f"{label}: no budget set ("
                             + ("neither --max-epsilon nor --target-epsilon" if unit == "example"
                                else "no --target-epsilon-device") + "); devices were selected whatever their epsilon.")
            continue
        if u.epsilon is None:
            items.append(f"{label}: {n_devices(len(u.reached), 'have')} budget events in the ledger, but "
                         "config.toml records no budget of this unit.")
            continue
        any_budget = True
        src = (_example_source(u, b) if unit == "example"
               else f"from --target-epsilon-device {fmt(b.target_epsilon_device)}")
        text = (f"{label}: epsilon <= {fmt(u.epsilon)} per device at delta = {fmt(delta)} ({src}). "
                f"{n_devices(len(u.reached))} reached it (the next round would have passed the budget, "
                "so the device was not selected again).")
        if unit == "example" and "target_epsilon" in u.from_:
            text += (" --target-epsilon also calibrated the noise multiplier for the planned schedule; it is "
                     "enforced as a budget as well, so crashed and re-run rounds cannot push a device past it.")
        items.append(text)
    return items, any_budget


def _exceeded_alerts(b: Budgets) -> list[Block]:
    """A loud BUDGET EXCEEDED alert for each unit with a device above its budget (which the server should prevent)."""
    out: list[Block] = []
    for unit in UNITS:
        u = b.unit(unit)
        if u is None or not u.over:
            continue
        which = "" if u.withheld else f"; devices {', '.join(map(str, u.over[:20]))}{', ...' if len(u.over) > 20 else ''}"
        out.append(("alert", f"BUDGET EXCEEDED at {unit} level: {n_devices(len(u.over), 'have')} an "
                             f"epsilon above the budget {fmt(u.epsilon)} (largest {fmt(u.worst)}{which}). "
                             "This should not happen: the server removes a device from selection before its "
                             "next round would pass its budget."))
    return out


def _event_blocks(b: Budgets, any_budget: bool, exceeded: bool) -> list[Block]:
    """The devices removed from selection for their budget (a table of the first 200), or that none was.

    Nothing is said here when no device was removed but some device exceeded its budget (the alert says it).
    The events of a unit whose per-device figures are withheld are counted, not listed.
    """
    out: list[Block] = []
    if b.events:
        shown = b.released_events
        hidden = sorted({e.unit for e in b.events if e.unit in b.withheld}, key=UNITS.index)
        text = (f"{n_devices(b.devices_removed, 'were')} removed from selection because their "
                "next round would have exceeded their budget")
        if hidden:
            levels = "example- and device-level budgets" if len(hidden) == 2 else f"{hidden[0]}-level budget"
            text += (f"; which devices reached the {levels}, and in which round, is "
                     "withheld (device participation is secret under device-level DP)")
        out.append(("p", text + (":" if shown else ".")))
        if shown:
            out.append(("table", ["device", "unit", "round", "epsilon its next round would have reached"],
                        [[str(e.device_id), e.unit, str(e.round), fmt(e.epsilon)]
                         for e in shown[:MAX_EVENT_ROWS]]))
        if len(shown) > MAX_EVENT_ROWS:
            out.append(("p", f"... and {len(shown) - MAX_EVENT_ROWS} more (see summary.json)."))
    elif not exceeded:
        out.append(("p", "No device reached its budget." if any_budget
                         else "No device was removed from selection for a budget."))
    return out


SECTION = Section("budgets", Budgets, compute, render, keys=("devices_over_budget", "budget_events", "budget"))
