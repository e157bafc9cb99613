"""The server's per-device privacy bookkeeping: histories, epsilons, budgets, calibration.

Two privacy units (DESIGN.md): ``example`` (DP-SGD on the device; composed over the rounds the
device trained) and ``device`` (DP-FedAvg on the server; composed over every round in which the
device could have been selected, with its own q_k(t): individual accounting). The ledger is the
durable copy; this object is the in-memory view the round loop consults.
"""

from __future__ import annotations

import math

import numpy as np

from dp.accounting import SubsampledGaussianEvent, calibrate_noise_multiplier, compute_epsilon, compute_epsilons
from dp.sampling import sample_rate_for, steps_for


def local_mechanism(num_examples: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """(sample_rate, steps) of one round of DP-SGD on a device holding ``num_examples``."""
    return sample_rate_for(num_examples, batch_size), steps_for(num_examples, batch_size, local_epochs)


def example_event(cfg, num_examples: int) -> SubsampledGaussianEvent:
    """The example-level mechanism one round applies to an example of a device holding ``num_examples``.

    * noise on the device (``cfg.noise_at == "device"``): ``steps = ceil(E n / B)`` DP-SGD steps,
      each a Poisson-subsampled Gaussian at rate q = min(1, B / n) with noise multiplier sigma
      (Abadi et al. 2016, Algorithm 1).
    * noise on the aggregate (``"aggregate"``): ONE Poisson-subsampled Gaussian at the example
      sampling rate p (``cfg.sample_rate``): the device includes each example with probability
      p, clips its gradient to C, and the server adds N(0, (sigma C)^2) once to the cohort's sum.
      The example's presence changes that sum by at most C (add/remove one example), so the
      round is the subsampled Gaussian mechanism with rate p whatever the rest of the cohort
      holds. Device selection is NOT counted as amplification: an example's inclusion is
      correlated with its device's other examples, which can reveal that the device took part.

    Parameters
    ----------
    cfg : dpfl.config.RunConfig
    num_examples : int
        n_k, the device's example count this round (public metadata).
    """
    if cfg.noise_at == "aggregate":
        return SubsampledGaussianEvent(cfg.noise_multiplier, float(cfg.sample_rate), 1)
    q, steps = local_mechanism(num_examples, cfg.batch_size, cfg.local_epochs)
    return SubsampledGaussianEvent(cfg.noise_multiplier, q, steps)


def calibrate_example_noise(cfg, activity: np.ndarray, delta: float) -> float:
    """The smallest noise multiplier that keeps every device's example-level epsilon <= target.

    Worst case per device: it trains in every one of ``cfg.rounds`` rounds (a device that joins
    fewer rounds spends less). Either placement (:func:`example_event`). The server also uses
    the target as every device's budget, so resumed and re-run rounds never pass it. ``activity`` holds every activity a device can have (in the
    continual setting, the activities of all rounds); each distinct local mechanism (q, steps)
    is repeated ``cfg.rounds`` times and the answer is the largest sigma any of them needs. In
    the continual setting this assumes the round mechanisms are ordered by privacy loss (a
    device's rounds are no worse than its worst round repeated); pair it with
    ``--max-epsilon``, which enforces the composed value from the ledger.

    Raises
    ------
    ValueError
        If the target cannot be met (the message names the settings to change).
    """
    if cfg.noise_at == "aggregate":  # one event per round joined, the same for every device
        profiles = {(float(cfg.sample_rate), 1)}
    else:
        profiles = {local_mechanism(int(a), cfg.batch_size, cfg.local_epochs) for a in activity if a > 0}
    sigma = 0.0
    for q, steps in sorted(profiles):
        if steps == 0:
            continue
        try:
            s = calibrate_noise_multiplier(
                cfg.target_epsilon, delta, schedule=[(q, steps * cfg.rounds)], accountant=cfg.accountant
            )
        except ValueError as exc:
            raise ValueError(
                f"--target-epsilon {cfg.target_epsilon:g} is unreachable for a device with sample rate {q:.3g} "
                f"and {steps} local steps over {cfg.rounds} rounds at delta {delta:g}: raise --target-epsilon, "
                f"lower --rounds"
                + (" or --sample-rate" if cfg.noise_at == "aggregate" else " or --local-epochs, or raise --batch-size")
                + f" ({exc})"
            ) from exc
        sigma = max(sigma, s)
    return sigma


class PrivacyBook:
    """In-memory histories of both units, with budget checks.

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
        self.history: dict[str, dict[int, list[SubsampledGaussianEvent]]] = {"example": {}, "device": {}}
        self.epsilon: dict[str, dict[int, float]] = {"example": {}, "device": {}}
        self.exhausted: dict[int, tuple[str, float]] = {}

    def load(self, unit: str, events: dict[int, list[tuple[float, float, int]]]) -> None:
        """Restore histories (e.g. from the ledger on resume)."""
        for d, evs in events.items():
            self.history[unit][d] = [SubsampledGaussianEvent(*e) for e in evs]
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
        """Devices whose epsilon would exceed the unit's budget after ``next_events``.

        Returns (device, unit, epsilon it would reach) for each, and marks them exhausted.
        """
        budget = self.budget[unit]
        if budget is None:
            return []
        hits = []
        cands = {d: ev for d, ev in next_events.items() if d not in self.exhausted}
        projected = compute_epsilons(
            {d: [*self.history[unit].get(d, []), ev] for d, ev in cands.items()}, self.delta, self.accountant
        )
        for d, e in projected.items():
            if e > budget or math.isnan(e):
                self.exhausted[d] = (unit, e)
                hits.append((d, unit, e))
        return hits


#: sigma_u when device-level DP is on and neither --device-noise-multiplier nor --target-epsilon-device is given.
DEFAULT_DEVICE_NOISE_MULTIPLIER = 1.0


def calibrate_device_noise(cfg, q_max: float, delta: float) -> float:
    """sigma_u for device-level DP: the smallest that keeps a device selected with probability
    ``q_max`` (the largest q_k of the run) in each of ``cfg.rounds`` rounds at or below
    ``cfg.target_epsilon_device`` (one Poisson-subsampled Gaussian per round; DP-FedAvg,
    McMahan et al. 2018). Every other device has q_k <= q_max and spends less.
    Without a target: :data:`DEFAULT_DEVICE_NOISE_MULTIPLIER`.

    Raises
    ------
    ValueError
        If the target cannot be met (the message names the settings to change).
    """
    if cfg.target_epsilon_device is None:
        return DEFAULT_DEVICE_NOISE_MULTIPLIER
    try:
        return calibrate_noise_multiplier(cfg.target_epsilon_device, delta, schedule=[(float(q_max), cfg.rounds)],
                                          accountant=cfg.accountant)
    except ValueError as exc:
        raise ValueError(
            f"--target-epsilon-device {cfg.target_epsilon_device:g} is unreachable for a device selected with "
            f"probability {q_max:.3g} in each of {cfg.rounds} rounds at delta {delta:g}: raise "
            f"--target-epsilon-device, lower --rounds or --cohort-size ({exc})"
        ) from exc


def largest_selection_probability(selector, planned: np.ndarray) -> float:
    """max_k q_k over the planned activities (``[K]``, or ``[T, K]`` in the continual setting)."""
    return float(selector.probabilities(np.asarray(planned)).max())  # element-wise: [K] and [T, K] alike
