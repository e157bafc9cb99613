"""FedAvg without DP (mechanisms/fedavg.py): no privacy unit, plain local training whose reply may carry
the loss and timings, and the example-weighted mean on the server (:class:`MeanAggregator`).

Tiny model, toy data (tests/inprocess.py), no Ray, no Flower round loop.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from dp.secure_random import NoiseSource
from settings.config import RunConfig
from inprocess import lamp_device, state_snapshot
from mechanisms import DeviceWork, RoundPlan, mechanism_for
from mechanisms.base import ReplySpec
from mechanisms.fedavg import FedAvg, MeanAggregator
from nlu.model import trainable_state_keys
from test_congruent import _tiny


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def lamp(tmp_path_factory):
    """(task, encoded examples of one device): 3 "on" and 3 "off" utterances of the toy data set."""
    return lamp_device(tmp_path_factory.mktemp("lamp"), 3, 3)


def _cfg(**kw) -> RunConfig:
    return RunConfig(**{"dp": False, "noise_at": "device", "model": "tiny", "batch_size": 4, "local_epochs": 1,
                        **kw}).validate()


def _work(model, data, task, seed=0):
    return DeviceWork(model, data, task, NoiseSource(seed), {"server-round": 1}, device_id=2, round=1)


# ---------------------------------------------------------------------------------- settings
def test_fedavg_is_selected_by_no_dp_on_the_device_and_accounts_nothing():
    mech = mechanism_for(_cfg())
    assert type(mech) is FedAvg
    assert mech.units == () and not mech.private
    assert mech.round_params() == {}
    assert mech.reply == ReplySpec(kind="weights", privacy_record=False, info=True)
    assert mech.holdout_noise_at == "none" and not mech.releases_on_empty_cohort
    assert isinstance(mech.aggregator(NoiseSource(0), 1.0), MeanAggregator)
    with pytest.raises(NotImplementedError):
        mech.example_event(10)
    with pytest.raises(NotImplementedError):
        mech.device_event(0.5)
    assert mech.calibrate(np.array([3, 6]), 1e-5, lambda: pytest.fail("q_max must not be called")).values == {}


# ---------------------------------------------------------------------------------- device part
def test_device_part_trains_and_reports_loss_and_timings(lamp):
    """One full batch (B >= n), SGD: train_loss is the mean loss of the starting model over the device's examples."""
    task, data = lamp
    n = len(data)
    cfg = _cfg(batch_size=n, optimizer="sgd", learning_rate=0.5)
    model = _tiny(task)  # float64, no dropout: the loss at the start is a function of the weights alone
    keys = trainable_state_keys(model)
    with torch.no_grad():
        start_loss = float(task.per_example_loss(model.eval(), task.collate(data, np.arange(n))).mean())
    before = state_snapshot(model)
    work = _work(model, data, task)
    reply = FedAvg(cfg).device_part(work)

    assert set(reply.metrics) == {"num-examples", "train_loss", "train_seconds", "task_seconds", "pid"}
    assert reply.metrics["num-examples"] == n
    assert math.isfinite(reply.metrics["train_loss"])
    assert reply.metrics["train_loss"] == pytest.approx(start_loss, rel=1e-9)
    assert reply.metrics["pid"] == os.getpid()
    assert 0 <= reply.metrics["train_seconds"] <= reply.metrics["task_seconds"]
    assert reply.privacy is None
    # the reply's arrays are the trained trainable parameters, changed from the start
    assert list(reply.arrays) == keys
    state = model.state_dict()
    for k in keys:
        assert torch.equal(reply.arrays[k], state[k])
    assert any(not torch.equal(reply.arrays[k], before[k]) for k in keys)


def test_device_part_with_zero_local_epochs_returns_the_weights_unchanged(lamp):
    # (--local-epochs 0 is refused by RunConfig.validate; the device part still honours it, cf. benchmarks/)
    task, data = lamp
    cfg = _cfg().replace(local_epochs=0)
    model = _tiny(task)
    before = state_snapshot(model)
    reply = FedAvg(cfg).device_part(_work(model, data, task))
    assert reply.metrics["num-examples"] == len(data)
    for k, v in reply.arrays.items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------------------------- the server's mean
def test_mean_aggregator_is_the_example_weighted_mean():
    rng = np.random.default_rng(1)
    current = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=4),
               "ids": np.arange(6, dtype=np.int64)}
    replies = [({"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=4),
                 "ids": np.full(6, 99, dtype=np.int64)}, n) for n in (5, 1, 14)]
    agg = MeanAggregator()
    agg.begin(3, current, RoundPlan(round=3, expected_cohort=9.0, expected_examples=123.0, lr_factor=0.1))
    for arrays, n in replies:
        agg.add(arrays, n)  # plain numpy dicts
    out = agg.result()
    assert set(out) == set(current)
    total = sum(n for _, n in replies)
    for k in ("w", "b"):
        expect = sum(n * a[k].astype(np.float64) for a, n in replies) / total
        assert out[k].dtype == current[k].dtype and out[k].shape == current[k].shape
        np.testing.assert_allclose(out[k], expect, rtol=1e-6 if k == "w" else 1e-12)
    # integer arrays keep the global model's values, whatever the replies hold
    assert out["ids"].dtype == np.int64 and np.array_equal(out["ids"], current["ids"])


def test_mean_aggregator_of_one_reply_is_that_reply_and_of_none_keeps_the_model():
    agg = MeanAggregator()
    current = {"w": np.zeros(3)}
    agg.begin(1, current, RoundPlan(round=1))
    assert agg.result() is None  # nothing accepted: keep the current model
    agg.begin(2, current, RoundPlan(round=2))
    agg.add({"w": np.array([1.0, -2.0, 3.5])}, 7)
    np.testing.assert_array_equal(agg.result()["w"], [1.0, -2.0, 3.5])
    # a new round starts from empty sums
    agg.begin(3, current, RoundPlan(round=3))
    agg.add({"w": np.array([2.0, 2.0, 2.0])}, 1)
    np.testing.assert_array_equal(agg.result()["w"], [2.0, 2.0, 2.0])
