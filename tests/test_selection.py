"""Activity-weighted Poisson selection: calibration and selection frequencies."""

import numpy as np
import pytest

from server.selection import ActivitySelector, calibrate_constant, inclusion_probabilities, poisson_cohort


def _activity(k=60, seed=0):
    rng = np.random.default_rng(seed)
    a = np.maximum(1, rng.lognormal(2.5, 1.2, size=k).astype(int))
    a[:3] = 0  # devices without data
    return a


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_calibration_hits_expected_cohort(alpha):
    a = _activity()
    c = calibrate_constant(a, alpha, 10)
    q = inclusion_probabilities(a, alpha, c)
    assert q.sum() == pytest.approx(10, rel=1e-6)
    assert (q[a == 0] == 0).all()
    assert (q <= 1).all()


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_selection_frequency_matches_q(alpha):
    a = _activity()
    sel = ActivitySelector(a, alpha, expected_cohort=10)
    q = sel.probabilities(a)
    rng = np.random.default_rng(1)
    rounds = 4000
    counts = np.zeros(len(a))
    sizes = []
    for _ in range(rounds):
        cohort = poisson_cohort(q, rng)
        counts[cohort] += 1
        sizes.append(len(cohort))
    freq = counts / rounds
    # Each count is Binomial(rounds, q_k): 5 standard deviations, Bonferroni-safe for 60 devices.
    tol = 5 * np.sqrt(q * (1 - q) / rounds) + 1e-12
    assert (np.abs(freq - q) <= tol).all(), np.max(np.abs(freq - q) - tol)
    assert np.mean(sizes) == pytest.approx(10, abs=5 * np.sqrt(10 / rounds) + 0.05)
    if alpha == 0.0:
        active = a > 0
        assert np.allclose(q[active], q[active][0])  # uniform over devices with data


def test_activity_weighting_prefers_heavy_devices():
    a = np.array([1, 10, 100])
    q = inclusion_probabilities(a, 1.0, 0.005)
    assert q[0] < q[1] < q[2]
    assert q[2] == pytest.approx(0.5)


def test_q_depends_only_on_own_activity_once_c_is_fixed():
    a = _activity()
    sel = ActivitySelector(a, 1.0, 10)
    q_all = sel.probabilities(a)
    q_without_last = sel.probabilities(a[:-1])
    assert np.array_equal(q_all[:-1], q_without_last)


def test_impossible_cohort_names_the_setting():
    with pytest.raises(ValueError, match="--cohort-size"):
        calibrate_constant(np.array([0, 3, 4]), 1.0, 3)


def test_excluded_devices_get_zero():
    a = _activity()
    sel = ActivitySelector(a, 1.0, 10)
    q = sel.probabilities(a, excluded=np.array([5, 7]))
    assert q[5] == 0 and q[7] == 0
