"""Local DP-SGD (mechanisms/local_dpsgd.py): the example-level noise on the device.

* the event of a device holding n examples: (sigma, min(1, B/n), ceil(E n / B)) per round joined;
* ``--target-epsilon`` calibrates sigma against dp-accounting's PLD accountant built here;
* the device part trains with DP-SGD and replies the weights, ``num-examples`` alone and the event.

Tiny model, toy data (tests/inprocess.py), no Ray, no Flower round loop.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dp.secure_random import NoiseSource
from settings.config import RunConfig
from inprocess import lamp_device, state_snapshot
from mechanisms import DeviceWork, RoundPlan, mechanism_for
from mechanisms.base import ReplySpec
from mechanisms.fedavg import MeanAggregator
from mechanisms.local_dpsgd import LocalDPSGD
from nlu.model import set_trainable, trainable_state_keys
from test_congruent import _tiny

DELTA = 1e-5
PLD_INTERVAL = 1e-3
PRIVACY_FIELDS = {"device-id", "round", "noise_multiplier", "sample_rate", "steps", "max_grad_norm"}


def _cfg(**kw) -> RunConfig:
    base = dict(noise_at="device", model="tiny", noise_multiplier=0.8, max_grad_norm=0.5, batch_size=4,
                local_epochs=2, target_delta=DELTA)
    return RunConfig(**{**base, **kw}).validate()


def _pld_epsilon(profiles, delta=DELTA) -> float:
    """dp-accounting's PLD: ``count`` Poisson-subsampled Gaussian steps (sigma, q) per (sigma, q, count)."""
    from dp_accounting import dp_event
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    acc = PLDAccountant(value_discretization_interval=PLD_INTERVAL)
    for sigma, q, count in profiles:
        acc.compose(dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), count))
    return float(acc.get_epsilon(delta))


# ---------------------------------------------------------------------------------- settings
def test_local_dpsgd_settings_and_reply_spec():
    mech = mechanism_for(_cfg())
    assert type(mech) is LocalDPSGD
    assert mech.units == ("example",) and mech.private
    assert mech.round_params() == {}
    assert mech.reply == ReplySpec(kind="weights", privacy_record=True, info=True)
    assert mech.holdout_noise_at == "device" and not mech.releases_on_empty_cohort
    assert isinstance(mech.aggregator(NoiseSource(0), 1.0), MeanAggregator)


# ---------------------------------------------------------------------------------- events
@pytest.mark.parametrize("n", [1, 3, 4, 5, 6, 40, 1001])
@pytest.mark.parametrize("B, E", [(4, 1), (4, 3), (16, 2)])
def test_example_event_is_sigma_min1_B_over_n_ceil_E_n_over_B(n, B, E):
    sigma = 1.3
    mech = LocalDPSGD(_cfg(noise_multiplier=sigma, batch_size=B, local_epochs=E))
    ev = mech.example_event(n)
    assert (ev.noise_multiplier, ev.sample_rate, ev.steps) == (sigma, min(1.0, B / n), math.ceil(E * n / B))
    assert mech.event("example", n, 0.123) == ev  # q plays no part at the example level


def test_local_dpsgd_accounts_no_device_event_and_charges_the_cohort():
    mech = LocalDPSGD(_cfg(max_grad_norm=0.7, update_clip_norm=3.0))
    with pytest.raises(NotImplementedError):
        mech.device_event(0.5)
    q = np.array([0.0, 0.2, 0.0, 1.0, 0.5])
    cohort = np.array([3, 1])
    np.testing.assert_array_equal(mech.accounted("example", q, cohort), [3, 1])
    np.testing.assert_array_equal(mech.accounted("device", q, cohort), [1, 3, 4])
    assert mech.clip_norm("example") == 0.7


# ---------------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("target, rounds, planned", [
    (3.0, 5, np.array([3, 6, 40, 0])),            # profiles (1, 1), (2/3, 2), (0.1, 10)
    (1.5, 4, np.array([[0, 12, 5], [7, 0, 12]])),  # continual: [T, K] activities, (1/3, 3), (0.8, 2), (4/7, 2)
])
def test_target_epsilon_calibrates_sigma_for_the_worst_device(target, rounds, planned):
    B, E = 4, 1
    cfg = _cfg(noise_multiplier=None, target_epsilon=target, rounds=rounds, batch_size=B, local_epochs=E)
    cal = LocalDPSGD(cfg).calibrate(planned, DELTA, lambda: pytest.fail("q_max must not be called"))
    assert set(cal.values) == {"target_epsilon", "noise_multiplier"}
    assert cal.values["target_epsilon"] == target
    sigma = cal.values["noise_multiplier"]
    assert len(cal.notes) == 1 and f"{sigma:.4f}" in cal.notes[0]
    profiles = {(min(1.0, B / n), math.ceil(E * n / B)) for n in np.ravel(planned) if n > 0}
    eps = {p: _pld_epsilon([(sigma, p[0], p[1] * rounds)]) for p in profiles}
    assert max(eps.values()) <= target * (1 + 1e-6), eps
    worst = max(eps, key=eps.get)
    assert _pld_epsilon([(0.97 * sigma, worst[0], worst[1] * rounds)]) > target, "sigma is larger than needed"


def test_default_target_is_8_without_noise_multiplier_and_nothing_with_one():
    cal = LocalDPSGD(_cfg(noise_multiplier=None, rounds=3)).calibrate(np.array([8]), DELTA, None)
    assert cal.values["target_epsilon"] == 8.0
    sigma = cal.values["noise_multiplier"]
    # n = 8, B = 4, E = 2: q = 1/2 and 4 steps per round, 3 rounds
    assert _pld_epsilon([(sigma, 0.5, 4 * 3)]) <= 8.0 * (1 + 1e-6)
    assert _pld_epsilon([(0.97 * sigma, 0.5, 4 * 3)]) > 8.0
    given = LocalDPSGD(_cfg(noise_multiplier=1.1)).calibrate(np.array([8]), DELTA, None)
    assert given.values == {} and given.notes == ()


def test_unreachable_target_names_the_flags_to_change():
    cfg = _cfg(noise_multiplier=None, target_epsilon=1e-3, rounds=1, batch_size=4, local_epochs=1)
    with pytest.raises(ValueError) as err:
        LocalDPSGD(cfg).calibrate(np.array([3]), DELTA, None)
    msg = str(err.value)
    for flag in ("--target-epsilon", "--rounds", "--local-epochs", "--batch-size"):
        assert flag in msg, (flag, msg)


# ---------------------------------------------------------------------------------- device part
@pytest.fixture(scope="module")
def lamp(tmp_path_factory):
    """(task, encoded examples of one device): 3 "on" and 3 "off" utterances of the toy data set."""
    return lamp_device(tmp_path_factory.mktemp("lamp"), 3, 3)


def test_device_part_replies_trained_weights_num_examples_and_the_event(lamp):
    task, data = lamp
    n, B, E, sigma, C = len(data), 4, 2, 0.8, 0.5
    cfg = _cfg(noise_multiplier=sigma, max_grad_norm=C, batch_size=B, local_epochs=E, learning_rate=0.05)
    model = set_trainable(_tiny(task), "head")
    keys = trainable_state_keys(model)
    before = state_snapshot(model)
    work = DeviceWork(model, data, task, NoiseSource(0), {"server-round": 4}, device_id=7, round=4)
    reply = LocalDPSGD(cfg).device_part(work)

    assert reply.metrics == {"num-examples": n}
    assert set(reply.privacy) == PRIVACY_FIELDS
    assert reply.privacy == {"device-id": 7, "round": 4, "noise_multiplier": sigma, "sample_rate": min(1.0, B / n),
                             "steps": math.ceil(E * n / B), "max_grad_norm": C}
    # the event the device reports is the one the server charges
    ev = LocalDPSGD(cfg).example_event(n)
    assert (reply.privacy["noise_multiplier"], reply.privacy["sample_rate"], reply.privacy["steps"]) == \
        (ev.noise_multiplier, ev.sample_rate, ev.steps)
    # the trained trainable parameters (the head), changed; the frozen encoder is neither sent nor changed
    assert list(reply.arrays) == keys and all(not k.startswith("encoder.") for k in keys)
    state = model.state_dict()
    for k in keys:
        assert torch.equal(reply.arrays[k], state[k])
    assert all(not torch.equal(reply.arrays[k], before[k]) for k in keys)
    for k, v in state.items():
        if k not in keys:
            assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_device_part_is_a_function_of_its_noise_source(lamp):
    """Same reproducible source, same weights; another source, other batches and noise."""
    task, data = lamp
    cfg = _cfg(learning_rate=0.05)

    def trained(seed):
        model = set_trainable(_tiny(task), "head")
        work = DeviceWork(model, data, task, NoiseSource(seed), {"server-round": 1}, device_id=0, round=1)
        return {k: v.clone() for k, v in LocalDPSGD(cfg).device_part(work).arrays.items()}

    a, b, c = trained(5), trained(5), trained(6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_device_part_with_zero_local_epochs_keeps_the_weights_and_reports_zero_steps(lamp):
    # (--local-epochs 0 is refused by RunConfig.validate; the device part still honours it, cf. benchmarks/)
    task, data = lamp
    cfg = _cfg().replace(local_epochs=0)
    model = _tiny(task)
    before = state_snapshot(model)
    reply = LocalDPSGD(cfg).device_part(DeviceWork(model, data, task, NoiseSource(0), {"server-round": 2}, 1, 2))
    for k, v in reply.arrays.items():
        assert torch.equal(v, before[k]), k
    assert reply.metrics == {"num-examples": len(data)}
    assert reply.privacy["steps"] == 0 and reply.privacy["sample_rate"] == min(1.0, 4 / len(data))
    ev = LocalDPSGD(cfg).example_event(len(data))
    assert (ev.sample_rate, ev.steps) == (reply.privacy["sample_rate"], 0)


# ---------------------------------------------------------------------------------- the server side
def test_server_side_is_the_weighted_mean_of_the_noised_weights():
    agg = LocalDPSGD(_cfg()).aggregator(NoiseSource(0), step_size=0.3)  # the step is the strategy's, not the mean's
    current = {"w": np.zeros(2), "ids": np.array([1, 2])}
    agg.begin(1, current, RoundPlan(round=1, expected_cohort=2.0, expected_examples=50.0))
    agg.add({"w": np.array([1.0, 0.0]), "ids": np.array([0, 0])}, 3)
    agg.add({"w": np.array([0.0, 2.0]), "ids": np.array([0, 0])}, 1)
    out = agg.result()
    np.testing.assert_allclose(out["w"], [0.75, 0.5], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(out["ids"], [1, 2])
