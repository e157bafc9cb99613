"""End to end: a real Flower simulation on Ray, 8 devices, 2 rounds, tiny model, built-in data."""

import json
import math
import sqlite3

import pytest
import torch

from dpfl.commands.simulate import simulate
from dpfl.config import RunConfig


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    rd = tmp_path_factory.mktemp("sim") / "run"
    cfg = RunConfig(
        model="tiny", num_devices=8, rounds=2, cohort_size=4, run_dir=str(rd), run_id="e2e",
        max_length=24, learning_rate=1e-3,
    ).validate()
    result = simulate(cfg, progress=False)
    assert result["run_dir"] == str(rd)
    return rd


def test_ledger_has_a_row_for_every_device_that_trained(run_dir):
    con = sqlite3.connect(run_dir / "ledger.sqlite")
    rows = con.execute("SELECT round, device_id, unit, noise_multiplier, sample_rate, steps, max_grad_norm FROM privacy_events").fetchall()
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        trained = [r for r in rows if r[0] == m["round"]]
        assert len(trained) == m["replies"] == m["cohort_size"]
        assert len({r[1] for r in trained}) == len(trained)
    for _, _, unit, sigma, q, steps, c in rows:
        assert unit == "example" and sigma == pytest.approx(1.0) and 0 < q <= 1 and steps >= 1 and c == 1.0
    assert con.execute("SELECT COUNT(*) FROM rounds").fetchone()[0] == 2


def test_epsilon_positive_and_growing(run_dir):
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2]
    eps = [m["epsilon_example_max"] for m in metrics]
    assert all(e > 0 and math.isfinite(e) for e in eps)
    assert eps[1] >= eps[0]
    con = sqlite3.connect(run_dir / "ledger.sqlite")
    per_device = con.execute("SELECT device_id, epsilon FROM device_epsilon WHERE unit='example'").fetchall()
    assert per_device and max(e for _, e in per_device) == pytest.approx(eps[1])
    # a device that trained twice has a larger epsilon than after its first round
    twice = con.execute(
        "SELECT device_id FROM privacy_events GROUP BY device_id HAVING COUNT(*) = 2"
    ).fetchall()
    for (d,) in twice:
        evs = con.execute("SELECT noise_multiplier, sample_rate, steps FROM privacy_events WHERE device_id=? ORDER BY round", (d,)).fetchall()
        from dp.accounting import SubsampledGaussianEvent, compute_epsilon

        delta = con.execute("SELECT target_delta FROM runs").fetchone()[0]
        first = compute_epsilon([SubsampledGaussianEvent(*evs[0])], delta)
        both = compute_epsilon([SubsampledGaussianEvent(*e) for e in evs], delta)
        assert both > first
        assert dict(per_device)[d] == pytest.approx(both, rel=1e-6)


def test_metrics_lines_and_checkpoint(run_dir):
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        for key in ("round", "cohort_size", "train_loss", "accuracy", "macro_f1", "epsilon_example_max", "seconds"):
            assert key in m
        assert 0 <= m["accuracy"] <= 1
    state = torch.load(run_dir / "checkpoints" / "global.pt")
    assert any("embeddings" in k for k in state)
    assert (run_dir / "config.toml").read_text().count("target_delta") == 1
