"""What the ledger's privacy events say, shared by several report sections: each device's epsilon
(recomputed with :mod:`dp.accounting`), the ranges of the mechanism's parameters, and epsilon by
activity quartile."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

from dp.accounting import (DEFAULT_VALUE_DISCRETIZATION_INTERVAL, SubsampledGaussianEvent, compute_epsilons,
                           dp_event_from_json, simplify_event)
from partitions.activity import activity_quartiles
from report.rundata import RunData
from report.stats import median


@lru_cache(maxsize=None)
def _other_event(text: str) -> Any:
    """The dp-accounting event serialised as ``text`` when it is not a subsampled Gaussian, else None."""
    event = simplify_event(dp_event_from_json(text))
    return None if isinstance(event, SubsampledGaussianEvent) else event


def events_upto(rows, last_round: int | None = None, texts=None) -> list[Any]:
    """The accountant's events of ledger rows ``(round, sigma, q, steps, C)`` up to ``last_round`` (all if None).

    ``texts`` (aligned with ``rows``; :attr:`report.rundata.RunData.dp_events`) are the rows' serialised
    dp-accounting events: a row whose event is not a subsampled Gaussian (secure aggregation's Skellam
    zCDP bound, whose columns hold only the nominal (sigma, 1, 1)) is composed as that event, as the
    server composed it; every other row as its (sigma, q, steps) columns."""
    texts = texts if texts is not None and len(texts) == len(rows) else [None] * len(rows)
    out = []
    for (t, s, q, n, _), text in zip(rows, texts):
        if last_round is not None and t > last_round:
            continue
        other = _other_event(text) if text is not None else None
        out.append(other if other is not None else SubsampledGaussianEvent(s, q, n))
    return out


def device_events(data: RunData, unit: str, device: int, keep: Callable[[int], bool] | None = None) -> list[Any]:
    """The accountant's events of ``device``'s ``unit``-level rows whose round passes ``keep`` (all if None)."""
    rows = data.events[unit].get(device, [])
    texts = data.dp_events.get(unit, {}).get(device)
    texts = texts if texts is not None and len(texts) == len(rows) else [None] * len(rows)
    pairs = [(r, x) for r, x in zip(rows, texts) if keep is None or keep(r[0])]
    return events_upto([r for r, _ in pairs], None, [x for _, x in pairs])


def unit_epsilons(data: RunData, unit: str, delta: float, accountant: str,
                  last_round: int | None = None,
                  interval: float = DEFAULT_VALUE_DISCRETIZATION_INTERVAL) -> dict[int, float]:
    """Each device's epsilon for ``unit`` (nats, at ``delta``) composed over its events up to ``last_round``."""
    histories = {d: events_upto(rows, last_round, data.dp_events.get(unit, {}).get(d))
                 for d, rows in data.events[unit].items()}
    return compute_epsilons(histories, delta, accountant, value_discretization_interval=interval)


def zcdp_events(data: RunData, unit: str) -> tuple[Any, ...]:
    """The distinct dp-accounting ``ZCDpEvent`` s among ``unit``'s events (secure aggregation's Skellam bound)."""
    found = {}
    for texts in data.dp_events.get(unit, {}).values():
        for text in texts:
            ev = _other_event(text) if text is not None else None
            if ev is not None and type(ev).__name__ == "ZCDpEvent":
                found[text] = ev
    return tuple(found.values())


@dataclass(frozen=True)
class Range:
    """A parameter's range over the ledger's events."""

    min: float
    median: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> "Range | None":
        """The range of ``values``; None when there are none."""
        if not values:
            return None
        return cls(min(values), median(values), max(values))

    def to_json(self) -> dict[str, float]:
        """``{"min", "median", "max"}``."""
        return {"min": self.min, "median": self.median, "max": self.max}


@dataclass(frozen=True)
class LedgerRanges:
    """The mechanism's parameters as the ledger's events of one unit record them.

    ``noise_multiplier`` sigma, ``sample_rate`` q, ``steps_per_event`` (local steps, or noisy sums),
    ``max_grad_norm`` the clip norm (None: no event); ``events`` counts the events and
    ``total_steps_max_device`` is the most steps one device composed.
    """

    noise_multiplier: Range | None
    sample_rate: Range | None
    steps_per_event: Range | None
    max_grad_norm: Range | None
    events: int
    total_steps_max_device: int

    @classmethod
    def of(cls, data: RunData, unit: str) -> "LedgerRanges":
        """The ranges of ``unit``'s events in ``data``."""
        rows = [r for rs in data.events[unit].values() for r in rs]
        return cls(
            noise_multiplier=Range.of([r[1] for r in rows]),
            sample_rate=Range.of([r[2] for r in rows]),
            steps_per_event=Range.of([float(r[3]) for r in rows]),
            max_grad_norm=Range.of([float(r[4]) for r in rows if r[4] is not None]),
            events=len(rows),
            total_steps_max_device=max((sum(r[3] for r in rs) for rs in data.events[unit].values()), default=0),
        )

    def to_json(self) -> dict[str, Any]:
        """The ``mechanism`` object of a unit in summary.json (a range is ``{"min", "median", "max"}`` or null)."""
        def rng(r: Range | None) -> dict[str, float] | None:
            return r.to_json() if r is not None else None

        return {"noise_multiplier": rng(self.noise_multiplier), "sample_rate": rng(self.sample_rate),
                "steps_per_event": rng(self.steps_per_event), "max_grad_norm": rng(self.max_grad_norm),
                "events": self.events, "total_steps_max_device": self.total_steps_max_device}


@dataclass(frozen=True)
class QuartileEpsilon:
    """One activity quartile's devices and their epsilon of one unit (nats; 0 for a device that never joined).

    ``quartile`` 1-4 (Q1 the lightest), ``activity_min`` / ``activity_max`` (training examples at the
    start), ``devices``, ``devices_joined`` (with at least one privacy event), ``rounds_joined_mean``
    (devices that never joined counted as 0), ``epsilon_median`` / ``epsilon_max``.
    """

    quartile: int
    activity_min: int
    activity_max: int
    devices: int
    devices_joined: int
    rounds_joined_mean: float
    epsilon_median: float
    epsilon_max: float

    def to_json(self) -> dict[str, Any]:
        """The quartile's object in summary.json (the fields, in order)."""
        return {"quartile": self.quartile, "activity_min": self.activity_min, "activity_max": self.activity_max,
                "devices": self.devices, "devices_joined": self.devices_joined,
                "rounds_joined_mean": self.rounds_joined_mean, "epsilon_median": self.epsilon_median,
                "epsilon_max": self.epsilon_max}


def by_activity_quartile(data: RunData, unit: str, eps: dict[int, float]) -> tuple[QuartileEpsilon, ...]:
    """Per-device epsilon by activity quartile: who spends the privacy.

    The devices holding data are sorted by starting activity a_k (training examples; ties by
    device id) and split into four groups of (nearly) equal size, Q1 the lightest. Empty with
    fewer than 4 such devices.
    """
    activity = {d: int(info.get("activity") or 0) for d, info in data.devices.items()}
    out = []
    for q, group in enumerate(activity_quartiles(activity)):
        values = [float(eps.get(d, 0.0)) for d in group]
        joined = [len({r[0] for r in data.events[unit].get(d, [])}) for d in group]
        out.append(QuartileEpsilon(
            quartile=q + 1, activity_min=activity[group[0]], activity_max=activity[group[-1]],
            devices=len(group), devices_joined=sum(1 for j in joined if j > 0),
            rounds_joined_mean=sum(joined) / len(group), epsilon_median=median(values), epsilon_max=max(values)))
    return tuple(out)
