"""DP-FedAvg (mechanisms/dp_fedavg.py): device-level DP over local DP-SGD (``--device-dp``) or over plain
local training (``--device-dp --no-dp``).

* the device-level event (sigma_u, q, 1) charged to every device with q > 0, selected or not;
* the calibration of sigma_u for ``--target-epsilon-device`` (against dp-accounting's PLD built
  here), none when ``--device-noise-multiplier`` is given, 1.0 without a target;
* the device part (the local DP-SGD's, or plain training replying ``num-examples`` alone);
* :class:`DeviceDPAggregator` without noise: each update clipped to S, w + step * sum / m.
  (The noise's statistics are tests/test_aggregate_noise.py's.)

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
from mechanisms.dp_fedavg import DEFAULT_DEVICE_NOISE_MULTIPLIER, DeviceDPAggregator, DPFedAvg
from mechanisms.local_dpsgd import LocalDPSGD
from nlu.model import set_trainable, trainable_state_keys
from test_congruent import _tiny

DELTA = 1e-5
PLD_INTERVAL = 1e-3


def _cfg(dp=True, **kw) -> RunConfig:
    base = dict(device_dp=True, dp=dp, model="tiny", update_clip_norm=0.8, device_noise_multiplier=1.2,
                batch_size=4, local_epochs=1, target_delta=DELTA)
    if dp:
        base.update(noise_at="device", noise_multiplier=0.9, max_grad_norm=0.5)
    return RunConfig(**{**base, **kw}).validate()


def _pld_epsilon(sigma: float, q: float, count: int, delta=DELTA) -> float:
    """dp-accounting's PLD: ``count`` Poisson-subsampled Gaussians (sigma, q)."""
    from dp_accounting import dp_event
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    acc = PLDAccountant(value_discretization_interval=PLD_INTERVAL)
    acc.compose(dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), count))
    return float(acc.get_epsilon(delta))


def _no_q_max():
    raise AssertionError("q_max must not be called")


# ---------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("dp", [True, False])
def test_settings_and_reply_spec(dp):
    mech = mechanism_for(_cfg(dp))
    assert type(mech) is DPFedAvg
    assert mech.units == (("example", "device") if dp else ("device",))
    assert mech.private
    assert mech.round_params() == {}
    # over local DP-SGD: its reply (with the privacy record); over plain training: the weights alone
    assert mech.reply == ReplySpec(kind="weights", privacy_record=dp, info=True)
    assert mech.holdout_noise_at == ("device" if dp else "none")
    assert mech.releases_on_empty_cohort
    assert isinstance(mech.local, LocalDPSGD) if dp else mech.local is None
    agg = mech.aggregator(NoiseSource(0), step_size=0.7)
    assert isinstance(agg, DeviceDPAggregator)
    assert (agg.clip_norm, agg.noise_multiplier, agg.step_size) == (0.8, 1.2, 0.7)


# ---------------------------------------------------------------------------------- events
@pytest.mark.parametrize("dp", [True, False])
@pytest.mark.parametrize("q", [0.0, 0.05, 0.5, 1.0])
def test_device_event_is_sigma_u_q_once(dp, q):
    mech = DPFedAvg(_cfg(dp, device_noise_multiplier=1.7))
    ev = mech.device_event(q)
    assert (ev.noise_multiplier, ev.sample_rate, ev.steps) == (1.7, q, 1)
    assert mech.event("device", 123, q) == ev  # the device's example count plays no part


def test_example_event_is_the_local_dpsgds_and_absent_without_dp():
    sigma, B, E = 0.9, 4, 3
    mech = DPFedAvg(_cfg(True, noise_multiplier=sigma, batch_size=B, local_epochs=E))
    for n in (2, 4, 9, 100):
        ev = mech.example_event(n)
        assert (ev.noise_multiplier, ev.sample_rate, ev.steps) == (sigma, min(1.0, B / n), math.ceil(E * n / B))
        assert mech.event("example", n, 0.3) == ev
    with pytest.raises(NotImplementedError):
        DPFedAvg(_cfg(False)).example_event(10)


def test_accounted_devices_and_clip_norms():
    mech = DPFedAvg(_cfg(True, max_grad_norm=0.5, update_clip_norm=2.5))
    q = np.array([0.0, 0.3, 1e-9, 0.0, 1.0, 0.2])
    cohort = np.array([4, 1])
    # device level: every device that could have been selected, selected or not
    np.testing.assert_array_equal(mech.accounted("device", q, cohort), [1, 2, 4, 5])
    # example level: the devices asked to train
    np.testing.assert_array_equal(mech.accounted("example", q, cohort), [4, 1])
    np.testing.assert_array_equal(mech.accounted("device", np.zeros(3), np.array([], dtype=np.int64)), [])
    assert mech.clip_norm("device") == 2.5
    assert mech.clip_norm("example") == 0.5


# ---------------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("target, rounds, q", [(2.0, 10, 0.3), (4.0, 3, 1.0)])
def test_target_epsilon_device_calibrates_sigma_u_for_q_max(target, rounds, q):
    cfg = _cfg(False, device_noise_multiplier=None, target_epsilon_device=target, rounds=rounds)
    calls = []
    cal = DPFedAvg(cfg).calibrate(np.array([3, 8]), DELTA, lambda: calls.append(1) or q)
    assert calls == [1]  # asked once, only because it is needed
    assert set(cal.values) == {"device_noise_multiplier"}
    sigma_u = cal.values["device_noise_multiplier"]
    assert len(cal.notes) == 1 and f"{sigma_u:.4f}" in cal.notes[0]
    assert _pld_epsilon(sigma_u, q, rounds) <= target * (1 + 1e-6)
    assert _pld_epsilon(0.97 * sigma_u, q, rounds) > target, "sigma_u is larger than needed"


def test_both_levels_are_calibrated_with_dp():
    B, E, rounds, n = 4, 1, 4, 10  # local profile: q = 0.4, 3 steps per round
    cfg = _cfg(True, noise_multiplier=None, target_epsilon=3.0, device_noise_multiplier=None,
               target_epsilon_device=2.0, rounds=rounds, batch_size=B, local_epochs=E)
    cal = DPFedAvg(cfg).calibrate(np.array([n]), DELTA, lambda: 0.5)
    assert set(cal.values) == {"target_epsilon", "noise_multiplier", "device_noise_multiplier"}
    assert len(cal.notes) == 2
    sigma, sigma_u = cal.values["noise_multiplier"], cal.values["device_noise_multiplier"]
    assert sigma == LocalDPSGD(cfg).calibrate(np.array([n]), DELTA, _no_q_max).values["noise_multiplier"]
    assert _pld_epsilon(sigma, min(1.0, B / n), math.ceil(E * n / B) * rounds) <= 3.0 * (1 + 1e-6)
    assert _pld_epsilon(sigma_u, 0.5, rounds) <= 2.0 * (1 + 1e-6)
    assert _pld_epsilon(0.97 * sigma_u, 0.5, rounds) > 2.0


@pytest.mark.parametrize("dp", [True, False])
def test_given_device_noise_multiplier_calibrates_nothing_for_the_device_level(dp):
    extra = dict(noise_multiplier=None, rounds=3) if dp else {}  # with dp: the local sigma for the default target
    cfg = _cfg(dp, device_noise_multiplier=0.6, target_epsilon_device=1.0, **extra)
    cal = DPFedAvg(cfg).calibrate(np.array([5]), DELTA, _no_q_max)
    assert "device_noise_multiplier" not in cal.values
    assert all("device" not in note for note in cal.notes)
    if dp:  # the local DP-SGD's calibration alone
        assert set(cal.values) == {"target_epsilon", "noise_multiplier"}
        assert cal == LocalDPSGD(cfg).calibrate(np.array([5]), DELTA, _no_q_max)
    else:
        assert cal.values == {} and cal.notes == ()


def test_without_a_device_target_sigma_u_is_the_default():
    assert DEFAULT_DEVICE_NOISE_MULTIPLIER == 1.0
    cal = DPFedAvg(_cfg(False, device_noise_multiplier=None)).calibrate(np.array([5]), DELTA, _no_q_max)
    assert cal.values == {"device_noise_multiplier": 1.0}
    assert cal.notes == ()


def test_unreachable_device_target_names_the_flags_to_change():
    cfg = _cfg(False, device_noise_multiplier=None, target_epsilon_device=1e-3, rounds=1)
    with pytest.raises(ValueError) as err:
        DPFedAvg(cfg).calibrate(np.array([5]), DELTA, lambda: 1.0)
    msg = str(err.value)
    for flag in ("--target-epsilon-device", "--rounds", "--cohort-size"):
        assert flag in msg, (flag, msg)


# ---------------------------------------------------------------------------------- device part
@pytest.fixture(scope="module")
def lamp(tmp_path_factory):
    """(task, encoded examples of one device): 3 "on" and 3 "off" utterances of the toy data set."""
    return lamp_device(tmp_path_factory.mktemp("lamp"), 3, 3)


def _work(model, data, task, device_id=3, round_=2):
    return DeviceWork(model, data, task, NoiseSource(0), {"server-round": round_}, device_id=device_id, round=round_)


def test_device_part_without_dp_replies_weights_and_num_examples_alone(lamp):
    task, data = lamp
    model = set_trainable(_tiny(task), "head")
    keys = trainable_state_keys(model)
    before = state_snapshot(model)
    reply = DPFedAvg(_cfg(False, learning_rate=0.05)).device_part(_work(model, data, task))
    assert reply.metrics == {"num-examples": len(data)}  # no loss, no timing: a device-level private reply
    assert reply.privacy is None
    assert list(reply.arrays) == keys
    state = model.state_dict()
    assert all(torch.equal(reply.arrays[k], state[k]) for k in keys)
    assert all(not torch.equal(reply.arrays[k], before[k]) for k in keys)


def test_device_part_with_dp_is_the_local_dpsgds(lamp):
    task, data = lamp
    n, B, E = len(data), 4, 2
    cfg = _cfg(True, batch_size=B, local_epochs=E, learning_rate=0.05)
    model = set_trainable(_tiny(task), "head")
    before = state_snapshot(model)
    reply = DPFedAvg(cfg).device_part(_work(model, data, task, device_id=5, round_=3))
    assert reply.metrics == {"num-examples": n}
    assert reply.privacy == {"device-id": 5, "round": 3, "noise_multiplier": 0.9, "sample_rate": min(1.0, B / n),
                             "steps": math.ceil(E * n / B), "max_grad_norm": 0.5}
    assert any(not torch.equal(v, before[k]) for k, v in reply.arrays.items())
    # the same DP-SGD as LocalDPSGD's device part, from the same start and noise
    other = set_trainable(_tiny(task), "head")
    ref = LocalDPSGD(cfg).device_part(_work(other, data, task, device_id=5, round_=3))
    assert ref.privacy == reply.privacy
    assert all(torch.equal(reply.arrays[k], ref.arrays[k]) for k in reply.arrays)


@pytest.mark.parametrize("dp", [True, False])
def test_device_part_with_zero_local_epochs_returns_the_weights_unchanged(lamp, dp):
    # (--local-epochs 0 is refused by RunConfig.validate; the device part still honours it, cf. benchmarks/)
    task, data = lamp
    cfg = _cfg(dp).replace(local_epochs=0)
    model = _tiny(task)
    before = state_snapshot(model)
    reply = DPFedAvg(cfg).device_part(_work(model, data, task))
    assert reply.metrics == {"num-examples": len(data)}
    for k, v in reply.arrays.items():
        assert torch.equal(v, before[k]), k
    if dp:
        assert reply.privacy["steps"] == 0
    else:
        assert reply.privacy is None


# ---------------------------------------------------------------------------------- the server side without noise
def _norm(arrays):
    return math.sqrt(sum(float((np.asarray(a, dtype=np.float64) ** 2).sum()) for a in arrays.values()))


def test_each_update_is_clipped_to_S_over_all_arrays_jointly():
    """One reply, m = 1, step 1: the release minus w is the clipped update, of norm min(||u||, S), same direction."""
    S = 0.5
    w = {"a": np.array([1.0, 2.0]), "b": np.array([[0.5], [0.5]])}
    for u, expect_norm in (({"a": np.array([3.0, 0.0]), "b": np.array([[0.0], [4.0]])}, S),  # ||u|| = 5 -> S
                           ({"a": np.array([0.1, 0.0]), "b": np.array([[0.0], [0.2]])}, math.sqrt(0.05))):  # kept
        agg = DeviceDPAggregator(S, 0.0, NoiseSource(0))
        agg.begin(1, w, RoundPlan(round=1, expected_cohort=1.0))
        agg.add({k: w[k] + u[k] for k in w}, 1.0)
        delta = {k: v - w[k] for k, v in agg.result().items()}
        assert _norm(delta) == pytest.approx(expect_norm, rel=1e-12)
        assert _norm(delta) <= S * (1 + 1e-12)
        scale = min(1.0, S / _norm(u))
        for k in w:
            np.testing.assert_allclose(delta[k], scale * u[k], rtol=1e-12, atol=1e-15)
        assert agg.norms == [pytest.approx(_norm(u), rel=1e-12)]


def test_without_noise_the_release_is_w_plus_step_times_the_clipped_sum_over_m():
    rng = np.random.default_rng(2)
    S, m, step, lr_factor = 1.0, 4.0, 0.6, 0.5
    current = {"w": rng.normal(size=(3, 2)).astype(np.float32), "v": rng.normal(size=3),
               "ids": np.arange(4, dtype=np.int64)}
    # updates of norms about 0.1, 1.5 and 6: one kept, two clipped
    replies = []
    for size in (0.1, 1.5, 6.0):
        u = {"w": rng.normal(size=(3, 2)), "v": rng.normal(size=3)}
        u = {k: v * size / _norm(u) for k, v in u.items()}
        replies.append(u)
    agg = DeviceDPAggregator(S, 0.0, NoiseSource(0), step_size=step)
    agg.begin(5, current, RoundPlan(round=5, expected_cohort=m, expected_examples=99.0, lr_factor=lr_factor))
    for i, u in enumerate(replies):
        arrays = {"w": (current["w"] + u["w"]).astype(np.float32), "v": current["v"] + u["v"],
                  "ids": np.full(4, 7, dtype=np.int64)}
        agg.add(arrays, weight=100.0 * (i + 1))  # plain numpy dicts; the example counts play no part
    out = agg.result()
    clipped = []
    for u in replies:
        # the update as it arrives (float32 weights), clipped to S
        d = {"w": (current["w"] + u["w"]).astype(np.float32).astype(np.float64) - current["w"], "v": u["v"]}
        clipped.append({k: v * min(1.0, S / _norm(d)) for k, v in d.items()})
    for k in ("w", "v"):
        expect = current[k].astype(np.float64) + step * lr_factor * sum(c[k] for c in clipped) / m
        assert out[k].dtype == current[k].dtype
        np.testing.assert_allclose(out[k], expect, rtol=1e-6 if k == "w" else 1e-12, atol=1e-7 if k == "w" else 1e-15)
    assert out["ids"].dtype == np.int64 and np.array_equal(out["ids"], current["ids"])
    assert agg.norms == pytest.approx([0.1, 1.5, 6.0], rel=1e-5)


def test_without_noise_or_replies_the_model_is_kept():
    current = {"w": np.array([0.25, -0.5])}
    agg = DeviceDPAggregator(1.0, 0.0, NoiseSource(0))
    agg.begin(1, current, RoundPlan(round=1, expected_cohort=2.0))
    np.testing.assert_array_equal(agg.result()["w"], current["w"])
    assert agg.norms == []
