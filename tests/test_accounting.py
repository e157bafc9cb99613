"""Accountants (PLD primary, RDP cross-check) over Poisson-subsampled Gaussian and any dp-accounting event; calibration."""

import json
import math

import pytest

from dp.accounting import (
    SubsampledGaussianEvent,
    calibrate_noise_multiplier,
    canonical_history,
    compute_epsilon,
    compute_epsilons,
    privacy_tier,
    to_dp_event,
)

DELTA = 1e-5


@pytest.mark.parametrize(
    "sigma,q,steps,accountant,expected",
    [
        (1.0, 0.01, 10000, "pld", 6.188),
        (1.0, 0.01, 10000, "rdp", 6.713),
        (2.0, 0.01, 10000, "pld", 2.163),
        (2.0, 0.01, 10000, "rdp", 2.353),
        (0.8, 0.004, 10000, "pld", 3.535),
    ],
)
def test_reference_values(sigma, q, steps, accountant, expected):
    eps = compute_epsilon([SubsampledGaussianEvent(sigma, q, steps)], DELTA, accountant)
    assert eps == pytest.approx(expected, rel=0.01)


def test_pld_is_tighter_than_rdp_and_is_an_upper_bound_at_coarse_grid():
    ev = [SubsampledGaussianEvent(1.0, 0.01, 10000)]
    fine = compute_epsilon(ev, DELTA, "pld", value_discretization_interval=1e-4)
    coarse = compute_epsilon(ev, DELTA, "pld")
    assert fine <= coarse <= compute_epsilon(ev, DELTA, "rdp")
    # Pessimistic discretisation: a coarser grid can only report more epsilon.
    assert coarse <= fine * 1.005


def test_matches_dp_accounting_pld_accountant_with_self_composed_events():
    from dp_accounting import dp_event
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    events = [(1.1, 0.05, 30), (0.9, 0.02, 50), (1.1, 0.05, 20)]
    ref = PLDAccountant(value_discretization_interval=1e-3)
    for s, q, n in events:
        ref.compose(
            dp_event.SelfComposedDpEvent(
                dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(s)), n
            )
        )
    ours = compute_epsilon([SubsampledGaussianEvent(*e) for e in events], DELTA, "pld")
    assert ours == pytest.approx(ref.get_epsilon(DELTA), rel=1e-3)


def test_edge_cases():
    assert compute_epsilon([], DELTA) == 0.0
    assert compute_epsilon([SubsampledGaussianEvent(1.0, 0.0, 100)], DELTA) == 0.0
    assert compute_epsilon([SubsampledGaussianEvent(1.0, 0.5, 0)], DELTA) == 0.0
    assert compute_epsilon([SubsampledGaussianEvent(0.0, 0.1, 1)], DELTA) == math.inf
    assert compute_epsilon([SubsampledGaussianEvent(0.0, 0.1, 1)], DELTA, "rdp") == math.inf
    # sigma = 0 but nothing released: still no privacy loss.
    assert compute_epsilon([SubsampledGaussianEvent(0.0, 0.0, 5)], DELTA) == 0.0
    # q = 1 (no subsampling) works.
    assert 0 < compute_epsilon([SubsampledGaussianEvent(5.0, 1.0, 10)], DELTA) < math.inf


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(noise_multiplier=-0.1, sample_rate=0.1, steps=1),
        dict(noise_multiplier=float("nan"), sample_rate=0.1, steps=1),
        dict(noise_multiplier=1.0, sample_rate=1.5, steps=1),
        dict(noise_multiplier=1.0, sample_rate=-0.01, steps=1),
        dict(noise_multiplier=1.0, sample_rate=0.1, steps=-1),
        dict(noise_multiplier=1.0, sample_rate=0.1, steps=2.5),
        dict(noise_multiplier=1.0, sample_rate=0.1, steps=True),
    ],
)
def test_invalid_events_raise(kwargs):
    with pytest.raises(ValueError):
        SubsampledGaussianEvent(**kwargs)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0, float("nan")])
def test_invalid_delta_raises(delta):
    with pytest.raises(ValueError, match="delta"):
        compute_epsilon([SubsampledGaussianEvent(1.0, 0.1, 1)], delta)


def test_unknown_accountant_raises():
    with pytest.raises(ValueError, match="accountant"):
        compute_epsilon([SubsampledGaussianEvent(1.0, 0.1, 1)], DELTA, "gdp")


def test_canonical_history_merges_and_orders():
    a = [SubsampledGaussianEvent(1.0, 0.1, 3), SubsampledGaussianEvent(2.0, 0.1, 1),
         SubsampledGaussianEvent(1.0, 0.1, 2), SubsampledGaussianEvent(1.0, 0.0, 7)]
    b = [SubsampledGaussianEvent(2.0, 0.1, 1), SubsampledGaussianEvent(1.0, 0.1, 5)]
    assert canonical_history(a) == canonical_history(b) == ((1.0, 0.1, 5), (2.0, 0.1, 1))
    assert compute_epsilon(a, DELTA) == compute_epsilon(b, DELTA)


def test_compute_epsilons_groups_identical_histories():
    hist = {k: [SubsampledGaussianEvent(1.0, 0.05, 10)] * 3 for k in range(200)}
    hist[999] = [SubsampledGaussianEvent(1.0, 0.05, 10)]
    hist[1000] = [SubsampledGaussianEvent(0.0, 0.05, 10)]
    out = compute_epsilons(hist, DELTA)
    assert len({out[k] for k in range(200)}) == 1
    assert out[0] == compute_epsilon(hist[0], DELTA)
    assert out[999] < out[0]
    assert out[1000] == math.inf


def test_calibration_hits_target_from_below():
    for accountant in ("pld", "rdp"):
        sigma = calibrate_noise_multiplier(3.0, DELTA, 0.01, 1000, accountant=accountant)
        eps = compute_epsilon([SubsampledGaussianEvent(sigma, 0.01, 1000)], DELTA, accountant)
        assert 0.99 * 3.0 <= eps <= 3.0


def test_calibration_schedule():
    schedule = [(0.02, 200), (0.05, 100)]
    sigma = calibrate_noise_multiplier(2.0, DELTA, schedule=schedule)
    eps = compute_epsilon([SubsampledGaussianEvent(sigma, q, n) for q, n in schedule], DELTA)
    assert 0.99 * 2.0 <= eps <= 2.0


def test_calibration_unreachable_and_invalid():
    with pytest.raises(ValueError, match="unreachable.*target_epsilon"):
        calibrate_noise_multiplier(1e-4, DELTA, 1.0, 100000, max_noise_multiplier=100.0)
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise_multiplier(0.0, DELTA, 0.01, 100)
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise_multiplier(float("inf"), DELTA, 0.01, 100)
    with pytest.raises(ValueError, match="delta"):
        calibrate_noise_multiplier(1.0, 1.5, 0.01, 100)
    with pytest.raises(ValueError, match="sample_rate"):
        calibrate_noise_multiplier(1.0, DELTA, 1.5, 100)
    with pytest.raises(ValueError):
        calibrate_noise_multiplier(1.0, DELTA)
    # Nothing released: no noise needed.
    assert calibrate_noise_multiplier(1.0, DELTA, 0.01, 0) == 0.0


def _dp_accounting_epsilon(events, accountant):
    """The epsilon dp-accounting's own accountant gives for ``events`` (each composed once)."""
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = (pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3) if accountant == "pld"
           else rdp_privacy_accountant.RdpAccountant())
    for e in events:
        acc.compose(to_dp_event(e) if isinstance(e, SubsampledGaussianEvent) else e)
    return acc.get_epsilon(DELTA)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_any_dp_event_composes_as_dp_accounting_does(accountant):
    from dp_accounting import dp_event as de

    laplace = de.LaplaceDpEvent(3.0)
    inner = de.LaplaceDpEvent(2.0) if accountant == "pld" else de.GaussianDpEvent(2.0)  # RDP: sampled Gaussians only
    composed = de.ComposedDpEvent([de.GaussianDpEvent(4.0), de.PoissonSampledDpEvent(0.2, inner)])
    history = [SubsampledGaussianEvent(1.1, 0.02, 40), laplace, composed, SubsampledGaussianEvent(1.1, 0.02, 10), laplace]
    eps = compute_epsilon(history, DELTA, accountant)
    assert eps == pytest.approx(_dp_accounting_epsilon(history, accountant), rel=1e-6)
    # identical histories, in any order, share one value; one more event raises it
    again = compute_epsilons({0: history, 1: history[::-1], 2: history + [laplace]}, DELTA, accountant)
    assert again[0] == again[1] == eps < again[2]
    if accountant == "rdp":  # an event the accountant cannot compose is refused, naming the fix
        with pytest.raises(ValueError, match="--accountant pld"):
            compute_epsilon([de.PoissonSampledDpEvent(0.2, de.LaplaceDpEvent(2.0))], DELTA, "rdp")


def test_dp_events_of_the_subsampled_gaussian_shape_are_read_as_one():
    from dp_accounting import dp_event as de

    events = [SubsampledGaussianEvent(1.0, 0.05, 20), SubsampledGaussianEvent(2.0, 1.0, 1)]
    as_dp = [to_dp_event(events[0]), de.GaussianDpEvent(2.0), de.NoOpDpEvent()]
    assert canonical_history(as_dp) == canonical_history(events) == ((1.0, 0.05, 20), (2.0, 1.0, 1))
    assert compute_epsilon(as_dp, DELTA) == compute_epsilon(events, DELTA)
    assert compute_epsilon([de.NoOpDpEvent()], DELTA) == 0.0
    assert compute_epsilon([events[0], de.NonPrivateDpEvent()], DELTA) == math.inf
    with pytest.raises(ValueError, match="Unsupported"):
        compute_epsilon([de.UnsupportedDpEvent()], DELTA)
    with pytest.raises(ValueError, match="privacy events must be"):
        compute_epsilon(["not an event"], DELTA)


def test_privacy_tier():
    assert privacy_tier(0.5) == "strong"
    assert privacy_tier(1.0) == "strong"
    assert privacy_tier(8.0) == "reasonable"
    assert privacy_tier(10.5) == "weak"
    assert privacy_tier(math.inf) == "weak"
    assert privacy_tier(None) == "none"


# --------------------------------------------------------------- Flower's accountant


@pytest.mark.parametrize(
    "sampling,sigma,sample_size,population,releases",
    [("poisson", 1.0, 10, 1000, 1000), ("poisson", 0.7, 50, 500, 200),
     ("no-amplification", 20.0, 10, 1000, 50)],
)
def test_rdp_agrees_with_flower_rdp_accountant(sampling, sigma, sample_size, population, releases):
    """Flower's RdpAccountant (flwr.supercore.privacy_accounting) composes
    PoissonSampledDpEvent(sample_size / population_size, GaussianDpEvent(sigma)) for
    POISSON sampling, or a bare GaussianDpEvent for NO_AMPLIFICATION (what its
    DifferentialPrivacyServerSideFixedClipping requires today), in dp-accounting's
    RdpAccountant with default orders and add-or-remove-one adjacency. Our "rdp" with
    q = sample_size / population_size (or q = 1) must give the same epsilon; our "pld"
    is tighter (below it, within about 15 % in these settings)."""
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    method = SamplingMethod(sampling)
    flwr_acc = RdpAccountant(
        PrivacyConfig(DELTA, population, NeighboringRelation.ADD_OR_REMOVE_ONE, method)
    )
    flwr_acc.compose(GaussianPrivacyEvent(sigma, sample_size, population), count=releases)
    q = sample_size / population if method is SamplingMethod.POISSON else 1.0
    events = [SubsampledGaussianEvent(sigma, q, releases)]
    flwr_eps = flwr_acc.get_epsilon(DELTA)
    assert compute_epsilon(events, DELTA, "rdp") == pytest.approx(flwr_eps, rel=1e-9)
    pld = compute_epsilon(events, DELTA, "pld")
    assert 0.8 * flwr_eps <= pld <= flwr_eps


def test_simplify_event_reads_the_subsampled_gaussian_shape_back_as_one():
    from dp_accounting import dp_event as de

    from dp.accounting import simplify_event

    ev = SubsampledGaussianEvent(1.0, 0.05, 20)
    assert simplify_event(to_dp_event(ev)) == ev and simplify_event(ev) == ev
    laplace = de.LaplaceDpEvent(2.0)
    assert simplify_event(laplace) is laplace
