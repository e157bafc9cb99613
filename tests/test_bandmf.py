"""Correlated noise across rounds (``--bands``; mechanisms/correlated_noise.py).

* the noise rows are C^-1 z for the column-normalised banded Toeplitz strategy of jax-privacy's
  coefficients: C (built here from the coefficients, not by jax-privacy) times the rows is
  white noise, and the rows' covariance is C^-1 C^-T;
* a skipped round still advances the stream; rows are drawn once, in order;
* cyclic selection: groups of about equal data (snake order of the example counts); a device joins
  only the rounds of its group, at most ceil(T / b) of them;
* the ledger's epsilon equals jax-privacy's ``amplified_bandmf_event`` composed by dp-accounting,
  and the calibrated sigma is the one jax-privacy's event calibrates to;
* settings that cannot carry correlated noise are refused with the setting to change.
"""

from __future__ import annotations

import numpy as np
import pytest

from dp.secure_random import NoiseSource
from inprocess import run_rounds, toy_config, write_lamp_data
from mechanisms.base import RoundPlan
from mechanisms.correlated_noise import BandedNoise, banded_strategy, strategy_matrix
from rundir import LedgerReader, release_run_lock
from server.selection import ActivitySelector
from settings.config import ConfigError, RunConfig

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_lamp_data(tmp_path_factory.mktemp("bandmfdata"))


def _banded_toeplitz(coef, n: int) -> np.ndarray:
    """The b-banded lower-triangular Toeplitz matrix of ``coef`` [n, n], each column scaled to L2 norm 1."""
    c = np.zeros((n, n))
    for j in range(n):
        for i, v in enumerate(coef):
            if j + i < n:
                c[j + i, j] = v
    return c / np.linalg.norm(c, axis=0)


# ---------------------------------------------------------------------------------- the strategy
def test_strategy_is_banded_normalised_and_from_jax_privacy():
    import jax
    from jax_privacy.matrix_factorization import toeplitz

    coef = banded_strategy(3, 12)
    with jax.enable_x64(True):
        expected = np.asarray(toeplitz.optimize_banded_toeplitz(n=12, bands=3))
    np.testing.assert_allclose(coef, expected, rtol=1e-12)
    assert len(coef) == 3 and np.linalg.norm(coef) == pytest.approx(1.0)
    assert all(a >= b >= 0 for a, b in zip(coef, coef[1:]))  # the min-sep sensitivity's conditions
    c = strategy_matrix(coef, 12)
    np.testing.assert_allclose(c, _banded_toeplitz(coef, 12), atol=1e-10)
    assert np.allclose(np.triu(c, 1), 0) and np.allclose(np.tril(c, -3), 0)  # lower triangular, 3 bands
    with jax.enable_x64(True):  # participations 3 apart: sensitivity^2 is their number (4 of 12 rounds)
        assert float(toeplitz.minsep_sensitivity_squared(np.asarray(coef), min_sep=3, n=12)) == pytest.approx(4.0)
    assert banded_strategy(1, 5) == (1.0,)
    with pytest.raises(ValueError, match="bands must be in"):
        banded_strategy(6, 5)


def test_noise_rows_are_the_strategy_inverse_times_white_noise():
    n, bands, d = 8, 3, 40_000
    stream = BandedNoise(bands, n, NoiseSource(seed=11))
    rows = np.stack([stream.draw(t, {"w": (d,)})["w"] for t in range(1, n + 1)])  # [n, d]
    c = _banded_toeplitz(stream.coef, n)
    white = c @ rows
    np.testing.assert_allclose(np.cov(white), np.eye(n), atol=0.04)  # 4 sd of a covariance estimate from 40k
    cinv = np.linalg.inv(c)
    np.testing.assert_allclose(np.cov(rows), cinv @ cinv.T, atol=0.06)
    assert abs(np.cov(rows)[0, 1]) > 0.2  # correlated across rounds (rho of rounds 1 and 2 is far from 0)


def test_skipped_rounds_advance_the_stream_and_rows_are_drawn_once():
    a = BandedNoise(2, 6, NoiseSource(seed=5))
    b = BandedNoise(2, 6, NoiseSource(seed=5))
    shapes = {"w": (4, 3), "b": (3,)}
    a1, _, a3 = (a.draw(t, shapes) for t in (1, 2, 3))
    b1, b3 = b.draw(1, shapes), b.draw(3, shapes)  # round 2 had no release
    for k in shapes:
        np.testing.assert_array_equal(a1[k], b1[k])
        np.testing.assert_array_equal(a3[k], b3[k])
        assert a3[k].shape == shapes[k]
    with pytest.raises(ValueError, match="drawn once, in order"):
        b.draw(3, shapes)
    with pytest.raises(ValueError, match="drawn once, in order"):
        b.draw(7, shapes)
    late = BandedNoise(2, 6, NoiseSource(seed=5))  # a resumed run: a new stream over the rounds left
    late.draw(4, shapes)
    assert late.first_round == 4


def test_aggregator_adds_the_correlated_rows():
    from mechanisms.aggregate import AggregateNoiseAggregator

    sigma, clip, rounds = 1.5, 0.5, 4
    agg = AggregateNoiseAggregator(sigma, clip, 1.0, NoiseSource(seed=2),
                                   correlated=BandedNoise(2, rounds, NoiseSource(seed=3)))
    twin = BandedNoise(2, rounds, NoiseSource(seed=3))
    w = {"w": np.zeros(5)}
    for t in range(1, rounds + 1):
        agg.begin(t, w, RoundPlan(t, expected_examples=2.0))
        agg.add({"w": np.ones(5)}, 1.0)
        out = agg.result()["w"]
        np.testing.assert_allclose(out, -(np.ones(5) + sigma * clip * twin.draw(t, {"w": (5,)})["w"]) / 2.0)


def test_independent_bands_noise_keeps_cyclic_selection_without_the_correlation():
    from mechanisms import mechanism_for

    base = dict(model="tiny", rounds=8, bands=4, noise_multiplier=1.0)
    for device_dp in (False, True):
        extra = dict(device_dp=True, dp=False, device_noise_multiplier=1.0) if device_dp else {}
        correlated = mechanism_for(RunConfig(**base, **extra).validate()).aggregator(NoiseSource(seed=1), 1.0)
        independent = mechanism_for(RunConfig(**base, **extra, bands_noise="independent").validate()).aggregator(
            NoiseSource(seed=1), 1.0)
        assert isinstance(correlated.correlated, BandedNoise) and correlated.correlated.bands == 4
        assert independent.correlated is None


# ---------------------------------------------------------------------------------- cyclic selection
def test_cyclic_selection_groups_and_calibrates_for_the_round():
    a = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], dtype=float)
    sel = ActivitySelector(a, 0.0, 2.0, bands=3)
    assert sel.probabilities(a).sum() == pytest.approx(6.0)  # b m over the population
    # snake order of 12, 11, .., 1: {12, 7, 6, 1}, {11, 8, 5, 2}, {10, 9, 4, 3}: 26 examples each
    assert [sorted(a[sel.groups == g].astype(int).tolist()) for g in range(3)] == [[1, 6, 7, 12], [2, 5, 8, 11],
                                                                                  [3, 4, 9, 10]]
    for t in range(1, 7):
        q = sel.probabilities(a, round_=t)
        assert set(np.flatnonzero(q)) == set(np.flatnonzero(sel.groups == (t - 1) % 3))
        assert q.sum() == pytest.approx(2.0)
    continual = ActivitySelector(np.stack([a, 2 * a]), 0.0, 2.0, bands=3)  # [T, K]: ranked by the mean
    np.testing.assert_array_equal(continual.groups, sel.groups)
    with pytest.raises(ValueError, match="--bands 3 selects one device in 3"):
        ActivitySelector(a, 0.0, 5.0, bands=3)


def _amplified_bandmf_epsilon(sigma, rounds, bands, q, delta):
    import dp_accounting
    from jax_privacy.experimental.accounting import amplified_bandmf_event

    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(amplified_bandmf_event(sigma, rounds, num_bands=bands, sampling_prob=q))
    return float(acc.get_epsilon(delta))


def test_example_level_run_accounts_what_jax_privacy_accounts(tmp_path, data_dir):
    """Noise on the aggregate, 6 rounds, 2 bands, 4 devices, q = 1 in a device's own rounds: each device
    joins exactly its 3 rounds; sigma is jax-privacy's for the target; the ledger's epsilon is its event's."""
    import dp_accounting
    from jax_privacy.experimental.accounting import amplified_bandmf_event

    cfg = toy_config(tmp_path / "run", data_dir, rounds=6, bands=2, num_devices=4, cohort_size=2, sample_rate=0.5,
                     target_epsilon=3.0, target_delta=1e-5, noise_at="aggregate")
    server, grid, _, outs = run_rounds(cfg)
    release_run_lock(server.rundir.path)
    sigma = server.cfg.noise_multiplier
    jp_sigma = dp_accounting.calibrate_dp_mechanism(
        dp_accounting.pld.PLDAccountant, lambda s: amplified_bandmf_event(s, 6, num_bands=2, sampling_prob=0.5),
        3.0, 1e-5)
    assert sigma == pytest.approx(jp_sigma, rel=2e-3)
    with LedgerReader(server.rundir.path) as reader:
        events = reader.events("example")
        stored = reader.device_epsilons("example")
    groups = server.selector.groups
    assert sorted(np.bincount(groups).tolist()) == [2, 2]
    joined = {}
    for e in events:
        assert groups[e.device_id] == (e.round - 1) % 2  # only the rounds of its group
        joined.setdefault(e.device_id, []).append(e.round)
    assert {d: sorted(r) for d, r in joined.items()} == {d: [1 + int(groups[d]), 3 + int(groups[d]), 5 + int(groups[d])]
                                                         for d in range(4)}
    for d in range(4):
        assert stored[d] == pytest.approx(_amplified_bandmf_epsilon(sigma, 6, 2, 0.5, server.delta), rel=1e-4)
    assert max(stored.values()) <= 3.0 + 1e-6
    assert [o.cohort_size for o in outs] == [2] * 6
    from server.round import Selection, plan_of

    a = server.activity.astype(float)  # every round divides by the expectation over a cycle of the 2 groups
    plan = plan_of(server, Selection(1, np.ones(4), np.array([0]), []))
    assert plan.expected_examples == pytest.approx(0.5 * a.sum() / 2)
    from report import build_report

    build_report(server.rundir.path)
    text = (server.rundir.path / "report" / "report.md").read_text()
    assert "correlated: banded matrix factorization with b = 2 bands" in text
    assert "at most ceil(6 / 2) = 3 rounds per device" in text and "Choquette-Choo et al. 2023" in text


def test_device_level_run_charges_only_a_devices_rounds(tmp_path, data_dir):
    """DP-FedAvg with 2 bands, uniform selection of 1 expected device of each group of 2: every device is
    charged (sigma_u, q = 1/2) in its 2 rounds of 4, the epsilon of jax-privacy's amplified BandMF event."""
    cfg = toy_config(tmp_path / "dev", data_dir, rounds=4, bands=2, num_devices=4, cohort_size=1, dp=False,
                     device_dp=True, device_noise_multiplier=1.1, target_delta=1e-5)
    server, _, _, _ = run_rounds(cfg)
    release_run_lock(server.rundir.path)
    with LedgerReader(server.rundir.path) as reader:
        events = reader.events("device")
        stored = reader.device_epsilons("device")
    groups = server.selector.groups
    rounds = {}
    for e in events:
        assert e.sample_rate == pytest.approx(0.5)
        rounds.setdefault(e.device_id, []).append(e.round)
    assert {d: sorted(r) for d, r in rounds.items()} == {d: [1 + int(groups[d]), 3 + int(groups[d])] for d in range(4)}
    for d in range(4):
        assert stored[d] == pytest.approx(_amplified_bandmf_epsilon(1.1, 4, 2, 0.5, server.delta), rel=1e-4)


def test_device_level_calibration_uses_the_joinable_rounds():
    from mechanisms.dp_fedavg import calibrate_device_noise

    base = dict(model="tiny", dp=False, device_dp=True, rounds=10, target_epsilon_device=2.0, target_delta=1e-5)
    banded = RunConfig(**base, bands=5).validate()
    two = RunConfig(**{**base, "rounds": 2}).validate()  # ceil(10 / 5) = 2 rounds
    plain = RunConfig(**base).validate()
    sigma = calibrate_device_noise(banded, 0.3, 1e-5)
    assert sigma == pytest.approx(calibrate_device_noise(two, 0.3, 1e-5))
    assert sigma < calibrate_device_noise(plain, 0.3, 1e-5)


# ---------------------------------------------------------------------------------- settings refused
@pytest.mark.parametrize("settings, message", [
    (dict(bands=0), "must be >= 1"),
    (dict(bands=4, rounds=3), "need at least as many rounds"),
    (dict(bands=2, noise_at="device"), "needs the noise on the aggregate"),
    (dict(bands=2, dp=False), "needs the noise on the aggregate"),
    (dict(bands=2, adaptive_clip_quantile=0.5), "adaptive clipping"),
    (dict(bands=2, selection_constant=0.5), "drop --selection-constant"),
    (dict(bands=2, target_epsilon=3.0, participation_cap=5), "does nothing with --bands 2"),
    (dict(bands=2, bands_noise="sometimes"), "must be 'correlated' or 'independent'"),
])
def test_settings_without_correlated_noise_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**{"model": "tiny", "rounds": 10, **settings}).validate()


def test_a_cohort_the_groups_cannot_hold_names_bands(tmp_path, data_dir):
    from server import app as sapp

    cfg = toy_config(tmp_path / "big", data_dir, rounds=4, bands=2, num_devices=4, cohort_size=3)
    with pytest.raises(ConfigError, match="lower --bands or --cohort-size"):
        sapp.Server(cfg)
    assert not (tmp_path / "big" / "ledger.sqlite").exists()
