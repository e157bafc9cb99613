"""Noise on the aggregate (mechanisms/aggregate.py): the round's ``sample-rate``, the clipped-sum reply,
ONE (sigma, p) event per round joined whatever the device holds, its calibration, and the server step
without noise. (The noise's statistics are tests/test_aggregate_noise.py's.)

Tiny model, toy data (tests/inprocess.py), no Ray, no Flower round loop.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from dp.secure_random import NoiseSource
from settings.config import RunConfig
from inprocess import lamp_device
from mechanisms import DeviceWork, RoundPlan, mechanism_for
from mechanisms.aggregate import AggregateNoise, AggregateNoiseAggregator
from mechanisms.base import ReplySpec
from nlu.model import set_trainable, trainable_state_keys
from test_congruent import _brute_clipped_sum, _tiny

DELTA = 1e-5
PLD_INTERVAL = 1e-3


def _cfg(**kw) -> RunConfig:
    base = dict(noise_at="aggregate", model="tiny", sample_rate=0.3, noise_multiplier=1.1, max_grad_norm=0.5,
                physical_batch_size=4, target_delta=DELTA)
    return RunConfig(**{**base, **kw}).validate()


def _pld_epsilon(sigma: float, p: float, rounds: int, delta=DELTA) -> float:
    """dp-accounting's PLD: ``rounds`` Poisson-subsampled Gaussians (sigma, p)."""
    from dp_accounting import dp_event
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    acc = PLDAccountant(value_discretization_interval=PLD_INTERVAL)
    acc.compose(dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(p, dp_event.GaussianDpEvent(sigma)), rounds))
    return float(acc.get_epsilon(delta))


# ---------------------------------------------------------------------------------- settings
def test_aggregate_round_params_and_reply_spec():
    mech = mechanism_for(_cfg(sample_rate=0.37))
    assert type(mech) is AggregateNoise
    assert mech.units == ("example",) and mech.private
    assert mech.round_params() == {"sample-rate": 0.37}
    assert isinstance(mech.round_params()["sample-rate"], float)
    # the clipped sum alone: no privacy record, no info record
    assert mech.reply == ReplySpec(kind="clipped-sum", privacy_record=False, info=False)
    assert mech.holdout_noise_at == "aggregate" and not mech.releases_on_empty_cohort


def test_aggregator_carries_sigma_C_and_the_step():
    agg = AggregateNoise(_cfg(noise_multiplier=1.7, max_grad_norm=0.25)).aggregator(NoiseSource(0), step_size=0.4)
    assert isinstance(agg, AggregateNoiseAggregator)
    assert (agg.noise_multiplier, agg.max_grad_norm, agg.step_size) == (1.7, 0.25, 0.4)


# ---------------------------------------------------------------------------------- events
def test_example_event_is_sigma_p_once_whatever_the_device_holds():
    sigma, p = 1.1, 0.3
    mech = AggregateNoise(_cfg(noise_multiplier=sigma, sample_rate=p, batch_size=4, local_epochs=3))
    for n in (1, 2, 7, 64, 10_000):
        ev = mech.example_event(n)
        assert (ev.noise_multiplier, ev.sample_rate, ev.steps) == (sigma, p, 1), n
        assert mech.event("example", n, 0.9) == ev
    with pytest.raises(NotImplementedError):
        mech.device_event(0.5)


def test_accounted_and_clip_norm():
    mech = AggregateNoise(_cfg(max_grad_norm=0.5, update_clip_norm=2.0))
    q = np.array([0.5, 0.0, 0.1, 0.0])
    np.testing.assert_array_equal(mech.accounted("example", q, np.array([2])), [2])
    np.testing.assert_array_equal(mech.accounted("example", q, np.array([], dtype=np.int64)), [])
    np.testing.assert_array_equal(mech.accounted("device", q, np.array([2])), [0, 2])
    assert mech.clip_norm("example") == 0.5


# ---------------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("target, rounds, p", [(2.0, 12, 0.25), (5.0, 3, 1.0)])
def test_target_epsilon_calibrates_sigma_for_T_rounds_at_rate_p(target, rounds, p):
    cfg = _cfg(noise_multiplier=None, target_epsilon=target, rounds=rounds, sample_rate=p)
    # the device's activity plays no part (the event is the same for every device)
    cal = AggregateNoise(cfg).calibrate(np.array([1, 5, 300]), DELTA, lambda: pytest.fail("q_max must not be called"))
    assert set(cal.values) == {"target_epsilon", "noise_multiplier"} and cal.values["target_epsilon"] == target
    sigma = cal.values["noise_multiplier"]
    assert _pld_epsilon(sigma, p, rounds) <= target * (1 + 1e-6)
    assert _pld_epsilon(0.97 * sigma, p, rounds) > target, "sigma is larger than needed"
    other = AggregateNoise(cfg).calibrate(np.array([2]), DELTA, None).values["noise_multiplier"]
    assert other == sigma


def test_given_noise_multiplier_is_not_recalibrated():
    cal = AggregateNoise(_cfg(noise_multiplier=0.9)).calibrate(np.array([4]), DELTA, None)
    assert cal.values == {} and cal.notes == ()


def test_unreachable_target_names_the_flags_to_change():
    cfg = _cfg(noise_multiplier=None, target_epsilon=1e-3, rounds=1, sample_rate=1.0)
    with pytest.raises(ValueError) as err:
        AggregateNoise(cfg).calibrate(np.array([3]), DELTA, None)
    msg = str(err.value)
    for flag in ("--target-epsilon", "--rounds", "--sample-rate"):
        assert flag in msg, (flag, msg)


# ---------------------------------------------------------------------------------- device part
@pytest.fixture(scope="module")
def lamp(tmp_path_factory):
    """(task, encoded examples of one device): 4 "on" and 3 "off" utterances of the toy data set."""
    return lamp_device(tmp_path_factory.mktemp("lamp"), 4, 3)


def _per_example_norms(model, task, data):
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(len(data)):
        gs = torch.autograd.grad(task.per_example_loss(model, task.collate(data, [i])).sum(), params)
        out.append(float(torch.sqrt(sum(g.pow(2).sum() for g in gs))))
    return out


def _subset(data, idx):
    return type(data)(input_ids=[data.input_ids[i] for i in idx], labels=data.labels[np.asarray(idx, dtype=np.int64)])


@pytest.mark.parametrize("trainable", ["all", "head"])
def test_device_part_is_the_clipped_gradient_sum_alone(lamp, trainable):
    """Sample rate 1 (from the round's config, not --sample-rate): sum_i clip_C(grad l_i) over every example,
    equal to the per-example loop in float64; no metrics, no privacy record; the model is left as it was."""
    task, data = lamp
    model = set_trainable(_tiny(task), trainable)
    norms = _per_example_norms(model, task, data)
    C = float(np.median(norms))
    assert min(norms) < C < max(norms)  # some examples clipped, some not
    cfg = _cfg(max_grad_norm=C, sample_rate=0.01, physical_batch_size=3)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    work = DeviceWork(model, data, task, NoiseSource(0), {"server-round": 1, "sample-rate": 1.0}, device_id=0, round=1)
    reply = AggregateNoise(cfg).device_part(work)

    assert reply.metrics is None and reply.privacy is None
    assert list(reply.arrays) == trainable_state_keys(model)
    ref = _brute_clipped_sum(model, task, data, None, C)
    assert set(ref) == set(reply.arrays)
    for k, v in reply.arrays.items():
        assert v.dtype == torch.float64
        torch.testing.assert_close(v, ref[k], rtol=1e-10, atol=1e-12, msg=k)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert model.training  # _tiny's model is in train mode; the eval-mode forward passes restore it


def test_device_part_samples_examples_with_the_round_rate_from_its_noise_source(lamp):
    """The Poisson sample is the work's NoiseSource's first Bernoulli draw at the round's rate."""
    task, data = lamp
    p, seed, C = 0.5, 11, 0.05
    included = np.flatnonzero(NoiseSource(seed).bernoulli(len(data), p))
    assert 0 < len(included) < len(data)
    model = set_trainable(_tiny(task), "head")
    work = DeviceWork(model, data, task, NoiseSource(seed), {"server-round": 3, "sample-rate": p}, device_id=1, round=3)
    got = AggregateNoise(_cfg(max_grad_norm=C)).device_part(work).arrays
    ref = _brute_clipped_sum(model, task, _subset(data, included), None, C)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-12, msg=k)
    # rate 0: nothing sampled, zeros of each trainable parameter's shape
    work = DeviceWork(model, data, task, NoiseSource(seed), {"server-round": 3, "sample-rate": 0.0}, device_id=1, round=3)
    zeros = AggregateNoise(_cfg(max_grad_norm=C)).device_part(work)
    assert zeros.metrics is None and zeros.privacy is None
    for k, v in zeros.arrays.items():
        assert v.shape == ref[k].shape and not v.any(), k


# ---------------------------------------------------------------------------------- the server step without noise
def test_aggregator_without_noise_steps_minus_lr_times_sum_over_expected_examples():
    """sigma 0: w - step * lr_factor * sum_k s_k / E[n]; float32 kept, integer arrays untouched, numpy dicts."""
    rng = np.random.default_rng(4)
    current = {"w": rng.normal(size=(4, 3)).astype(np.float32), "v": rng.normal(size=5),
               "ids": np.arange(7, dtype=np.int64)}
    sums = [{"w": rng.normal(size=(4, 3)).astype(np.float32), "v": rng.normal(size=5),
             "ids": np.full(7, -1, dtype=np.int64)} for _ in range(3)]
    step, lr_factor, expected = 0.5, 0.2, 8.75
    agg = AggregateNoiseAggregator(0.0, 1.0, step_size=step, noise=NoiseSource(0))
    agg.begin(2, current, RoundPlan(round=2, expected_cohort=3.0, expected_examples=expected, lr_factor=lr_factor))
    for i, s in enumerate(sums):
        agg.add(s, weight=10.0 * (i + 1))  # the weights play no part
    out = agg.result()
    for k in ("w", "v"):
        total = sum(s[k].astype(np.float64) for s in sums)
        expect = current[k].astype(np.float64) - step * lr_factor * total / expected
        assert out[k].dtype == current[k].dtype
        np.testing.assert_allclose(out[k], expect, rtol=1e-6 if k == "w" else 1e-12, atol=1e-7 if k == "w" else 0)
    assert out["ids"].dtype == np.int64 and np.array_equal(out["ids"], current["ids"])


def test_aggregator_without_noise_or_replies_keeps_the_model():
    current = {"w": np.array([0.5, -1.0])}
    agg = AggregateNoiseAggregator(0.0, 1.0, step_size=1.0, noise=NoiseSource(0))
    agg.begin(1, current, RoundPlan(round=1, expected_examples=4.0))
    np.testing.assert_array_equal(agg.result()["w"], current["w"])
    # a new round starts from a zero sum
    agg.begin(2, current, RoundPlan(round=2, expected_examples=4.0))
    agg.add({"w": np.array([4.0, 8.0])}, 1)
    np.testing.assert_allclose(agg.result()["w"], [-0.5, -3.0], rtol=0, atol=1e-15)
