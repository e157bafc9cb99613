"""Activity-weighted Poisson selection of the cohort.

Device k is included in round t independently with probability
``q_k = min(1, c * a_k ** alpha)`` where a_k is its activity (training examples held) and
alpha the activity exponent (alpha = 0: uniform). The constant c is fixed once, before the
first round, either given or calibrated so that the expected cohort size
``sum_k q_k`` equals the requested cohort size (in the continual setting: on average over the
planned rounds, from the arrival schedule; that single calibration reads the activity
totals; afterwards q_k depends only on device k's own activity, so removing one device
changes no other device's selection, which keeps per-device accounting exact).
"""

from __future__ import annotations

import numpy as np


def inclusion_probabilities(activity: np.ndarray, alpha: float, c: float) -> np.ndarray:
    """q_k = min(1, c * a_k^alpha) for a_k > 0, and 0 for devices with no examples.

    Parameters
    ----------
    activity : numpy.ndarray, shape [K]
        Non-negative activities a_k.
    alpha : float
        Activity exponent (>= 0).
    c : float
        Selection constant (> 0).

    Returns
    -------
    numpy.ndarray, shape [K], float64
    """
    a = np.asarray(activity, dtype=np.float64)
    q = np.zeros_like(a)
    pos = a > 0
    q[pos] = np.minimum(1.0, c * np.power(a[pos], alpha))
    return q


def calibrate_constant(activity: np.ndarray, alpha: float, expected_cohort: float) -> float:
    """The c with ``sum_k min(1, c a_k^alpha) = expected_cohort`` (bisection on log c).

    ``activity`` of shape [K] calibrates on one round's activities. Shape [T, K] (the
    continual setting: row t is a_k(t), known in advance from the arrival schedule) calibrates
    on the average over the T rounds, ``(1/T) sum_t sum_k min(1, c a_k(t)^alpha) =
    expected_cohort``, so that the run's expected number of device-rounds is ``T *
    expected_cohort`` as in the static setting, while c stays one constant.

    Raises
    ------
    ValueError
        If fewer devices have examples (on average over rounds) than ``expected_cohort`` (then
        no c reaches it; lower --cohort-size).
    """
    a = np.asarray(activity, dtype=np.float64)
    rounds = a.shape[0] if a.ndim == 2 else 1
    a = a.ravel()
    if expected_cohort <= 0:
        raise ValueError("--cohort-size must be > 0")
    active = int((a > 0).sum())
    target = expected_cohort * rounds
    if target > active:
        per_round = active / rounds
        raise ValueError(
            f"--cohort-size {expected_cohort:g} exceeds the {per_round:g} devices that hold examples"
            + (" (on average over the rounds)" if rounds > 1 else "")
            + "; lower --cohort-size or raise --num-devices"
        )
    w = np.power(a[a > 0], alpha)
    if target == active:
        return float(1.0 / w.min())
    lo, hi = np.log(1e-300 + target / w.sum() / 2), np.log(1.0 / w.min())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        s = np.minimum(1.0, np.exp(mid) * w).sum()
        if s < target:
            lo = mid
        else:
            hi = mid
    return float(np.exp(hi))


def poisson_cohort(q: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Include each device k independently with probability q_k; return the selected ids (sorted, int64)."""
    return np.flatnonzero(rng.random(len(q)) < q).astype(np.int64)


def balanced_groups(activity: np.ndarray, bands: int) -> np.ndarray:
    """Each device's group of cyclic selection (int32 [K]): the devices ranked by activity (most examples
    first; ties by device id; shape [T, K]: the mean over the planned rounds), dealt to the ``bands`` groups
    in snake order (0, 1, .., b-1, b-1, .., 1, 0, 0, 1, ..), so that the groups hold about the same
    number of examples and of devices. A function of the public example counts only (the counts
    the selection already reads; DESIGN.md, "Privacy model").

    Raises
    ------
    ValueError
        If ``bands`` < 1.
    """
    if bands < 1:
        raise ValueError(f"bands must be >= 1, got {bands}")
    a = np.asarray(activity, dtype=np.float64)
    if a.ndim == 2:
        a = a.mean(axis=0)
    order = np.argsort(-a, kind="stable")
    i = np.arange(len(a))
    lap, pos = i // bands, i % bands
    groups = np.empty(len(a), dtype=np.int32)
    groups[order] = np.where(lap % 2 == 0, pos, bands - 1 - pos)
    return groups


class ActivitySelector:
    """Fixed-constant Poisson selection (the state needed to resume is ``c`` and the rng), optionally cyclic.

    With ``bands`` b > 1 (cyclic Poisson selection, the participation pattern of amplified banded
    matrix factorization: Choquette-Choo et al. 2023, "(Amplified) Banded Matrix Factorization",
    Algorithm 2) the devices form b groups (:func:`balanced_groups`: ranked by their public example
    counts and dealt to the groups in snake order, so that each group holds about the same data),
    and round t (from 1) may select only group (t - 1) mod b: two rounds a device may join are at
    least b apart, and it joins at most ceil(T / b) of T rounds. c is then calibrated for an
    expected b * m devices over the population, so that the group of a round has m expected
    devices on average.

    Parameters
    ----------
    activity : numpy.ndarray, shape [K] or [T, K]
        Starting activities, or every planned round's activities (continual setting); used
        once, for the calibration of c when ``c`` is None (see :func:`calibrate_constant`).
    alpha : float
        Activity exponent; ``selection="uniform"`` is alpha = 0.
    expected_cohort : float
        Target expected cohort size m of a round for the calibration.
    c : float, optional
        Use this constant instead of calibrating.
    bands : int
        b, the number of device groups of cyclic selection (1: every device may join every round).

    Attributes
    ----------
    groups : numpy.ndarray [K] of int32, or None
        Each device's group (None when ``bands`` is 1).

    Raises
    ------
    ValueError
        If no c reaches b * m expected devices (see :func:`calibrate_constant`).
    """

    def __init__(self, activity: np.ndarray, alpha: float, expected_cohort: float, c: float | None = None,
                 bands: int = 1):
        self.alpha = float(alpha)
        self.bands = int(bands)
        self.calibrated = c is None
        if c is None:
            try:
                c = calibrate_constant(activity, alpha, expected_cohort * self.bands)
            except ValueError as exc:
                if self.bands == 1:
                    raise
                raise ValueError(f"--bands {self.bands} selects one device in {self.bands} each round, so "
                                 f"--cohort-size {expected_cohort:g} needs {self.bands} x {expected_cohort:g} "
                                 f"devices with examples: lower --bands or --cohort-size ({exc})") from None
        self.c = float(c)
        self.groups = balanced_groups(activity, self.bands) if self.bands > 1 else None

    def probabilities(self, activity: np.ndarray, excluded: np.ndarray | None = None,
                      round_: int | None = None) -> np.ndarray:
        """q_k(t) for the current activities; devices in ``excluded`` (e.g. over budget) get 0, and with
        cyclic selection (``bands`` > 1) so do the devices outside round ``round_``'s group. Without
        ``round_``: each device's q_k in the rounds it may join."""
        q = inclusion_probabilities(activity, self.alpha, self.c)
        if excluded is not None and len(excluded):
            q[np.asarray(excluded, dtype=np.int64)] = 0.0
        if self.bands > 1 and round_ is not None:
            q[..., self.groups != (int(round_) - 1) % self.bands] = 0.0  # outside the round's group
        return q
