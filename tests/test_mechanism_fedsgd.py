"""FedSGD without DP (mechanisms/fedsgd.py): --no-dp runs the aggregate placement's algorithm with
neither clipping nor noise."""

import math

import numpy as np
import pytest
import torch

from dp.secure_random import NoiseSource
from mechanisms import RoundPlan, mechanism_for
from mechanisms.aggregate import AggregateNoise, clipped_gradient_sum
from mechanisms.base import DeviceWork
from mechanisms.fedavg import FedAvg
from mechanisms.fedsgd import FedSGD
from settings.config import RunConfig
from inprocess import lamp_device
from test_congruent import _brute_clipped_sum, _tiny


@pytest.fixture
def lamp(tmp_path):
    return lamp_device(tmp_path, 5, 4)


def test_no_dp_runs_the_placements_algorithm_without_dp():
    mech = mechanism_for(RunConfig(dp=False).validate())
    assert type(mech) is FedSGD and isinstance(mech, AggregateNoise)
    assert mech.units == () and not mech.private and mech.holdout_noise_at == "none"
    assert mech.round_params() == {"sample-rate": 1.0} and mech.reply.kind == "clipped-sum"
    assert mech.calibrate(np.array([3, 6]), 1e-5, lambda: pytest.fail("q_max must not be called")).values == {}
    with pytest.raises(NotImplementedError):
        mech.example_event(10)
    assert type(mechanism_for(RunConfig(dp=False, noise_at="device").validate())) is FedAvg
    # the same server step as the private run: FedAdam for the aggregate placement, with or without DP
    assert RunConfig(dp=False).resolved_strategy() == RunConfig().resolved_strategy() == "fedadam"
    assert RunConfig(dp=False, noise_at="device").resolved_strategy() == "fedavg"


def test_device_part_is_the_unclipped_gradient_sum(lamp):
    """Every example sampled (p = 1): the reply equals the brute-force sum of per-example gradients, which
    the private placement would have clipped (C = 0.01 changes it)."""
    task, data = lamp
    model = _tiny(task)
    mech = mechanism_for(RunConfig(dp=False, trainable="all").validate())
    reply = mech.device_part(DeviceWork(model, data, task, NoiseSource(0), {"sample-rate": 1.0, "server-round": 1},
                                        device_id=0, round=1))
    want = _brute_clipped_sum(model, task, data, None, math.inf)  # C = infinity: the plain per-example sum
    for k, w in want.items():
        assert torch.allclose(torch.as_tensor(reply.arrays[k]).double(), w, atol=1e-8), k
    clipped = clipped_gradient_sum(model, data, sample_rate=1.0, max_grad_norm=0.01, physical_batch_size=64,
                                   noise=NoiseSource(0), task=task)
    k = next(iter(want))
    assert not torch.allclose(torch.as_tensor(clipped[k]).double(), want[k])


def test_aggregator_takes_the_noiseless_mean_gradient_step():
    mech = mechanism_for(RunConfig(dp=False).validate())
    agg = mech.aggregator(NoiseSource(0), 0.5)
    current = {"w": np.array([1.0, 2.0])}
    agg.begin(1, current, RoundPlan(round=1, expected_cohort=2.0, expected_examples=4.0, lr_factor=1.0))
    agg.add({"w": np.array([2.0, 0.0])}, 1.0)
    agg.add({"w": np.array([2.0, 4.0])}, 1.0)
    out = agg.result()
    assert np.allclose(out["w"], current["w"] - 0.5 * np.array([4.0, 4.0]) / 4.0)
    assert math.isfinite(float(out["w"].sum()))
