"""End to end: a real Flower simulation on Ray, 8 devices, 2 rounds, tiny model, built-in data."""

import math
from collections import Counter

import pytest
import torch

from dpfl.commands.simulate import simulate
from settings.config import RunConfig
from rundir import LedgerReader, config_path, global_model_path, read_checkpoint_state, read_metric_lines


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    rd = tmp_path_factory.mktemp("sim") / "run"
    cfg = RunConfig(
        model="tiny", num_devices=8, rounds=2, cohort_size=4, run_dir=str(rd), run_id="e2e",
        max_length=24, learning_rate=1e-3, noise_multiplier=1.0,
    ).validate()
    result = simulate(cfg, progress=False)
    assert result["run_dir"] == str(rd)
    return rd


def test_ledger_has_a_row_for_every_device_that_trained(run_dir):
    ledger = LedgerReader(run_dir / "ledger.sqlite")
    rows = [(e.round, e.device_id, e.unit, e.noise_multiplier, e.sample_rate, e.steps, e.max_grad_norm) for e in ledger.events()]
    metrics = read_metric_lines(run_dir)
    for m in metrics:
        trained = [r for r in rows if r[0] == m["round"]]
        assert len(trained) == m["replies"] == m["cohort_size"]
        assert len({r[1] for r in trained}) == len(trained)
    for _, _, unit, sigma, q, steps, c in rows:
        assert unit == "example" and sigma == pytest.approx(1.0) and 0 < q <= 1 and steps >= 1 and c == 1.0
    assert len(ledger.rounds()) == 2


def test_epsilon_positive_and_growing(run_dir):
    metrics = read_metric_lines(run_dir)
    assert [m["round"] for m in metrics] == [1, 2]
    eps = [m["epsilon_example_max"] for m in metrics]
    assert all(e > 0 and math.isfinite(e) for e in eps)
    assert eps[1] >= eps[0]
    ledger = LedgerReader(run_dir / "ledger.sqlite")
    per_device = list(ledger.device_epsilons("example").items())
    assert per_device and max(e for _, e in per_device) == pytest.approx(eps[1])
    # a device that trained twice has a larger epsilon than after its first round
    twice = [d for d, n in Counter(e.device_id for e in ledger.events()).items() if n == 2]
    for d in twice:
        evs = [e.mechanism for e in ledger.events(device_id=d)]
        from dp.accounting import SubsampledGaussianEvent, compute_epsilon

        delta = ledger.runs()[0].target_delta
        first = compute_epsilon([SubsampledGaussianEvent(*evs[0])], delta)
        both = compute_epsilon([SubsampledGaussianEvent(*e) for e in evs], delta)
        assert both > first
        assert dict(per_device)[d] == pytest.approx(both, rel=1e-6)


def test_metrics_lines_and_checkpoint(run_dir):
    metrics = read_metric_lines(run_dir)
    for m in metrics:
        for key in ("round", "cohort_size", "train_loss", "accuracy", "macro_f1", "epsilon_example_max", "seconds"):
            assert key in m
        assert 0 <= m["accuracy"] <= 1
    state = torch.load(global_model_path(run_dir))  # --trainable head (the default): the head alone
    assert state and all(k.startswith("classifier.") for k in state)
    assert read_checkpoint_state(run_dir)["frozen_from"] == {"model": "tiny", "seed": 0}
    assert config_path(run_dir).read_text().count("target_delta") == 1
