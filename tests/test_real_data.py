"""Smoke test on real data with the real model: MiniLM, a few hundred BANKING77 examples, DP on."""

import math

import pytest

from dpfl.commands.simulate import simulate
from settings.config import RunConfig
from rundir import read_metric_lines


@pytest.mark.slow
def test_minilm_on_banking77_learns_above_chance(banking77, tmp_path):
    cfg = RunConfig(
        data_dir=str(banking77),
        max_examples=400,
        num_devices=4,
        partitioner="iid",
        cohort_size=4,  # every device, every round
        rounds=3,
        local_epochs=3,
        noise_multiplier=0.3,
        run_dir=str(tmp_path / "run"),
        run_id="banking77-smoke",
    ).validate()
    simulate(cfg, progress=False)
    metrics = read_metric_lines(tmp_path / "run")
    assert [m["round"] for m in metrics] == [1, 2, 3]
    chance = 1 / 77
    final = metrics[-1]
    # Three times chance: the mean-pooled MiniLM features make 77 intents learnable in 3 rounds.
    assert final["accuracy"] > 3 * chance, final
    assert 0 < final["epsilon_example_max"] < math.inf
