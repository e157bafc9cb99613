"""The server's per-device privacy bookkeeping: histories, epsilons, budgets.

Two privacy units (DESIGN.md): ``example`` (DP-SGD on the device; composed over the rounds the
device trained) and ``device`` (DP-FedAvg on the server; composed over every round in which the
device could have been selected, with its own q_k(t): individual accounting). The ledger is the
durable copy; this object is the in-memory view the round loop consults. Which events a round
charges, and how the noise is calibrated, is the run's mechanism's (mechanisms/).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from dp.accounting import SubsampledGaussianEvent, compute_epsilons, dp_event_from_json, simplify_event


class PrivacyBook:
    """In-memory histories of both units, with budget checks.

    An event is whatever the run's mechanism accounts: a
    :class:`dp.accounting.SubsampledGaussianEvent` or any dp-accounting ``DpEvent``
    (:func:`dp.accounting.compute_epsilons` composes either).

    Parameters
    ----------
    delta : float
        The run's delta.
    accountant : str
        "pld" or "rdp".
    max_epsilon : float, optional
        Example-level budget per device.
    max_epsilon_device : float, optional
        Device-level budget per device.
    """

    def __init__(self, delta: float, accountant: str, max_epsilon: float | None = None, max_epsilon_device: float | None = None):
        self.delta = delta
        self.accountant = accountant
        self.budget = {"example": max_epsilon, "device": max_epsilon_device}
        self.history: dict[str, dict[int, list]] = {"example": {}, "device": {}}  # events as the mechanism accounts them
        self.epsilon: dict[str, dict[int, float]] = {"example": {}, "device": {}}
        self.exhausted: dict[int, tuple[str, float]] = {}

    def load(self, unit: str, events: dict[int, list]) -> None:
        """Restore histories (e.g. from the ledger on resume, :meth:`rundir.Ledger.events`): each
        event a serialised dp-accounting event (JSON) or a ``(sigma, q, steps)`` tuple."""
        # a run has few distinct events; subsampled-Gaussian ones are read back as such (the fast path)
        parse = lru_cache(maxsize=None)(lambda text: simplify_event(dp_event_from_json(text)))
        for d, evs in events.items():
            self.history[unit][d] = [parse(e) if isinstance(e, str) else SubsampledGaussianEvent(*e) for e in evs]
        self.epsilon[unit].update(compute_epsilons(self.history[unit], self.delta, self.accountant))

    def add(self, unit: str, events: dict[int, SubsampledGaussianEvent]) -> dict[tuple[int, str], float]:
        """Compose one round's events; return {(device, unit): epsilon so far} for those devices."""
        for d, ev in events.items():
            self.history[unit].setdefault(d, []).append(ev)
        eps = compute_epsilons({d: self.history[unit][d] for d in events}, self.delta, self.accountant)
        self.epsilon[unit].update(eps)
        return {(d, unit): e for d, e in eps.items()}

    def max_epsilon(self, unit: str) -> float:
        return max(self.epsilon[unit].values(), default=0.0)

    def over_budget(
        self, unit: str, next_events: dict[int, SubsampledGaussianEvent]
    ) -> list[tuple[int, str, float]]:
        """Devices whose epsilon would exceed the unit's budget after ``next_events`` (device -> event).

        Returns (device, unit, epsilon it would reach) for each, and marks them exhausted
        (:meth:`over_budget_grouped` with one event per device).
        """
        devices = np.fromiter(next_events, dtype=np.int64, count=len(next_events))
        return self.over_budget_grouped(unit, devices, list(next_events.values()), np.arange(len(devices)))

    def over_budget_grouped(self, unit: str, devices: np.ndarray, events: list, which: np.ndarray) -> list[tuple[int, str, float]]:
        """As :meth:`over_budget`, for ``devices`` [n] (int64) whose next events are ``events[which[i]]``.

        The cost grows with the devices that hold a history and the distinct events, not with the
        population: every device with no history yet (most of a large population) has the
        projected history ``[event]``, computed once per distinct event.

        Returns
        -------
        list of (device, unit, epsilon it would reach)
            Those over the budget (or with a NaN epsilon), in ``devices`` order; they are marked exhausted.
        """
        budget = self.budget[unit]
        if budget is None or len(devices) == 0:
            return []
        devices = np.asarray(devices, dtype=np.int64)
        which = np.asarray(which, dtype=np.int64)
        if self.exhausted:
            keep = ~np.isin(devices, np.fromiter(self.exhausted, dtype=np.int64, count=len(self.exhausted)))
            devices, which = devices[keep], which[keep]
        hist = self.history[unit]
        known = np.isin(devices, np.fromiter(hist, dtype=np.int64, count=len(hist))) if hist else np.zeros(len(devices), bool)
        first = compute_epsilons({j: [ev] for j, ev in enumerate(events)}, self.delta, self.accountant)
        projected = np.array([first[j] for j in range(len(events))], dtype=float)[which]
        if known.any():
            again = compute_epsilons({int(d): [*hist[int(d)], events[int(j)]] for d, j in zip(devices[known], which[known])},
                                     self.delta, self.accountant)
            projected[known] = [again[int(d)] for d in devices[known]]
        over = (projected > budget) | np.isnan(projected)
        hits = [(int(d), unit, float(e)) for d, e in zip(devices[over], projected[over])]
        for d, _, e in hits:
            self.exhausted[d] = (unit, e)
        return hits


def largest_selection_probability(selector, planned: np.ndarray) -> float:
    """max_k q_k over the planned activities (``[K]``, or ``[T, K]`` in the continual setting)."""
    return float(selector.probabilities(np.asarray(planned)).max())  # element-wise: [K] and [T, K] alike
