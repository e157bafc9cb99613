"""Adaptive clipping (mechanisms/adaptive_clip.py; Andrew et al. 2021, Algorithm 1).

* The geometric update on the noised fraction of unclipped norms converges to the target quantile
  of a known norm distribution from 0.1x and 10x starts: the rule alone, the DP-FedAvg aggregator
  (update clip S over devices) and the aggregate placement's aggregator (example clip C over the
  cohort's sampled examples, counts from the devices).
* The noise split: sigma_g and sigma_b compose to the accounted sigma (Theorem 1), the sum's noise has
  std sigma_g C_t, and the ledger charges sigma with the round's C_t.
* A device's centred count equals the brute-force count of its examples' gradient norms <= C.
* The round loop in-process: C travels in the round config, the ledger records each round's C, the
  reply carries the clip record, and a resume continues from the checkpointed C.
* Bad settings are refused with the flag to change.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dp.secure_random import NoiseSource
from inprocess import run_rounds, toy_config, write_lamp_data
from mechanisms import RoundPlan, mechanism_for
from mechanisms.adaptive_clip import COUNT_STDDEV_PER_SIGMA, QuantileClip, gradient_noise_multiplier
from mechanisms.aggregate import AggregateNoiseAggregator, clipped_gradient_sum
from mechanisms.dp_fedavg import DeviceDPAggregator
from protocol import messages as rec
from rundir import LedgerReader
from settings.config import ConfigError, RunConfig
from test_congruent import _device_data, _tiny

pytestmark = pytest.mark.usefixtures("task_identity")

#: lognormal norms with median 1: the gamma quantile is exp(SIGMA_LN * z_gamma)
SIGMA_LN = 0.5
Z = {0.5: 0.0, 0.8: 0.8416212335729143, 0.2: -0.8416212335729143}


def _quantile(gamma: float) -> float:
    return math.exp(SIGMA_LN * Z[gamma])


@pytest.mark.parametrize("gamma", [0.5, 0.8])
@pytest.mark.parametrize("start", [0.1, 10.0])
def test_rule_converges_to_the_quantile_from_far_starts(gamma, start):
    rng = np.random.default_rng(0)
    noise = NoiseSource(1)
    target = _quantile(gamma)
    clip = QuantileClip(start * target, gamma, learning_rate=0.2, count_stddev=5.0)
    trace = []
    for _ in range(200):
        norms = rng.lognormal(0.0, SIGMA_LN, size=500)
        clip.update(float(((norms <= clip.value) - 0.5).sum()), 500, noise)
        trace.append(clip.value)
    tail = np.array(trace[-50:])
    assert abs(np.exp(np.log(tail).mean()) / target - 1) < 0.05
    assert tail.max() / target < 1.2 and tail.min() / target > 0.8


def test_the_rule_moves_C_by_exp_of_minus_lr_times_the_fraction_error():
    clip = QuantileClip(2.0, 0.5, learning_rate=0.3, count_stddev=0.0)  # no noise: b exact
    # 8 of 10 unclipped: b = 0.8 > gamma, so C shrinks by exp(-0.3 * 0.3)
    assert clip.update(8 - 5.0, 10, NoiseSource(0)) == pytest.approx(2.0 * math.exp(-0.09))
    assert clip.last_fraction == pytest.approx(0.8)
    # none unclipped: C grows by exp(0.3 * 0.5)
    before = clip.value
    assert clip.update(-5.0, 10, NoiseSource(0)) == pytest.approx(before * math.exp(0.15))
    state = clip.state_dict()
    other = QuantileClip(9.0, 0.5, 0.3, 0.0)
    other.load_state_dict(state)
    assert other.value == clip.value and other.last_fraction == clip.last_fraction


def test_count_noise_has_std_sigma_b_over_n():
    clip = QuantileClip(1.0, 0.5, learning_rate=0.2, count_stddev=4.0)
    noise = NoiseSource(3)
    fractions = np.array([clip.unclipped_fraction(10.0, 40.0, noise) for _ in range(4000)])
    assert fractions.mean() == pytest.approx(10 / 40 + 0.5, abs=0.01)
    assert fractions.std() == pytest.approx(4.0 / 40.0, rel=0.05)


@pytest.mark.parametrize("sigma, sigma_b", [(1.0, 5.0), (0.7, 0.4), (3.2, 16.0)])
def test_noise_split_composes_to_the_accounted_sigma(sigma, sigma_b):
    sigma_g = gradient_noise_multiplier(sigma, sigma_b)
    assert sigma_g > sigma
    # Theorem 1 of Andrew et al. 2021: the pair is one Gaussian query of noise multiplier sigma
    assert (sigma_g ** -2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(sigma, rel=1e-12)


def test_too_small_a_count_stddev_is_refused_by_name():
    with pytest.raises(ConfigError, match="--clipped-count-stddev"):
        gradient_noise_multiplier(2.0, 1.0)
    assert gradient_noise_multiplier(0.0, 0.0) == 0.0  # zero-noise test runs: nothing to split


def _zeros():
    return {"w": np.zeros(4000, dtype=np.float32)}


@pytest.mark.parametrize("start", [0.1, 10.0])
def test_dp_fedavg_update_clip_converges_to_the_quantile_of_update_norms(start):
    """S over m = 100 devices a round, sigma_u = 1, sigma_b = 5 sigma_u: S reaches the median of the update norms."""
    rng = np.random.default_rng(1)
    m, target = 100, _quantile(0.5)
    clip = QuantileClip(start * target, 0.5, 0.2, COUNT_STDDEV_PER_SIGMA * 1.0)
    agg = DeviceDPAggregator(clip.value, gradient_noise_multiplier(1.0, clip.count_stddev), NoiseSource(2), clip=clip)
    current = {"w": np.zeros(3, dtype=np.float64)}
    values = []
    for t in range(1, 201):
        agg.begin(t, current, RoundPlan(t, expected_cohort=m))
        for norm in rng.lognormal(0.0, SIGMA_LN, size=m):
            direction = rng.standard_normal(3)
            agg.add({"w": norm * direction / np.linalg.norm(direction)}, 1.0)
        agg.result()
        values.append(clip.value)
    assert agg.clip_norm == values[-2]  # the last round clipped at the S it started with
    tail = np.array(values[-50:])
    assert abs(np.exp(np.log(tail).mean()) / target - 1) < 0.1


@pytest.mark.parametrize("start", [0.1, 10.0])
def test_aggregate_clip_converges_to_the_quantile_of_example_norms(start):
    """C from the devices' centred counts of their sampled examples, over the expected examples E[n]."""
    rng = np.random.default_rng(4)
    gamma, target = 0.8, _quantile(0.8)
    clip = QuantileClip(start * target, gamma, 0.2, COUNT_STDDEV_PER_SIGMA * 1.0)
    agg = AggregateNoiseAggregator(gradient_noise_multiplier(1.0, clip.count_stddev), clip.value, 0.1, NoiseSource(5),
                                   clip=clip)
    current = {"w": np.zeros(2, dtype=np.float32)}
    values = []
    for t in range(1, 201):
        sizes = rng.poisson(20, size=10)  # 10 devices, p n_k = 20 expected examples each
        agg.begin(t, current, RoundPlan(t, expected_examples=200.0))
        assert agg.max_grad_norm == clip.value
        for n in sizes:
            norms = rng.lognormal(0.0, SIGMA_LN, size=n)
            agg.add({"w": np.zeros(2, dtype=np.float32)}, 1.0, float(((norms <= clip.value) - 0.5).sum()))
        agg.result()
        values.append(clip.value)
    tail = np.array(values[-50:])
    assert abs(np.exp(np.log(tail).mean()) / target - 1) < 0.1


def test_aggregate_sum_noise_has_std_sigma_g_times_the_rounds_C():
    sigma, sigma_b = 1.0, 2.0
    clip = QuantileClip(0.3, 0.5, 0.2, sigma_b)
    sigma_g = gradient_noise_multiplier(sigma, sigma_b)
    agg = AggregateNoiseAggregator(sigma_g, 99.0, 1.0, NoiseSource(6), clip=clip)
    agg.begin(1, _zeros(), RoundPlan(1, expected_examples=1.0))
    g = agg.noisy_gradient()["w"]
    assert g.std() == pytest.approx(sigma_g * 0.3, rel=0.05)


def test_centred_count_is_the_brute_force_count_of_norms_at_most_C():
    from nlu.tasks import make_task

    task = make_task("intent", 3)
    model = _tiny(task)
    data = _device_data(n=9)
    norms = []
    params = [p for p in model.parameters() if p.requires_grad]
    for i in range(len(data)):
        loss = task.per_example_loss(model, task.collate(data, [i])).sum()
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        norms.append(math.sqrt(sum(float(g.pow(2).sum()) for g in gs if g is not None)))
    C = float(np.median(norms))
    sums, count = clipped_gradient_sum(model, data, sample_rate=1.0, max_grad_norm=C, physical_batch_size=4,
                                       noise=NoiseSource(0), task=task, return_centred_count=True)
    assert count == sum(1 for n in norms if n <= C) - 0.5 * len(norms)
    assert set(sums) == {k for k, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------- the round loop
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_lamp_data(tmp_path_factory.mktemp("adaptdata"))


def test_round_loop_sends_and_records_each_rounds_C_and_resumes_it(tmp_path, data_dir):
    cfg = toy_config(tmp_path / "run", data_dir, noise_at="aggregate", trainable="head", num_devices=4, cohort_size=4,
                     rounds=4, sample_rate=1.0, noise_multiplier=1.0, max_grad_norm=5.0, adaptive_clip_quantile=0.5)
    server, grid, _, _ = run_rounds(cfg, rounds=3)
    sent = {}
    for m in grid.sent:
        sent.setdefault(int(m.content["config"]["server-round"]), set()).add(float(m.content["config"]["max-grad-norm"]))
    assert all(len(v) == 1 for v in sent.values()) and sent[1] == {5.0}
    for _, content in grid.outgoing:  # each reply: the clipped sum and its centred count, nothing else
        assert set(content.keys()) == {rec.ARRAYS, rec.CLIP}
        assert abs(content[rec.CLIP]["centred-unclipped-count"]) <= 6 * 0.5 + 1e-9  # at most n_k / 2 (6 examples a device)
    with LedgerReader(Path(cfg.run_dir) / "ledger.sqlite") as ledger:
        events = ledger.events_by_device("example")
    by_round = {e.round: e.max_grad_norm for evs in events.values() for e in evs}
    assert {t: {c} for t, c in by_round.items()} == sent
    # the accounted event is sigma's, whatever C does
    assert {e.noise_multiplier for evs in events.values() for e in evs} == {1.0}
    assert len(set(by_round.values())) > 1  # C moved
    recorded = (Path(cfg.run_dir) / "config.toml").read_text()
    assert f"clipped_count_stddev = {COUNT_STDDEV_PER_SIGMA * 1.0}" in recorded
    # resume: round 4 starts from the C round 3 ended with
    c_next = server.mechanism.clip.value
    server2, grid2, _, _ = run_rounds(cfg.replace(run_dir=cfg.run_dir), resume=True)
    assert server2.start_round == 4
    assert {float(m.content["config"]["max-grad-norm"]) for m in grid2.sent
            if m.metadata.message_type != "evaluate" and "max-grad-norm" in m.content["config"]} == {c_next}
    # the report states the adaptive clip, the split and the ledger's range of C
    from report import build_report

    build_report(Path(cfg.run_dir))
    md = (Path(cfg.run_dir) / "report" / "report.md").read_text()
    assert "adaptive clipping of C" in md and "0.5 quantile of the example gradient norms" in md
    sigma_g = gradient_noise_multiplier(1.0, COUNT_STDDEV_PER_SIGMA)
    assert f"{sigma_g:.4g}"[:5] in md
    assert "C at the start of each round, in the ledger" in md


def test_device_dp_round_loop_records_S_per_round(tmp_path, data_dir):
    cfg = toy_config(tmp_path / "run", data_dir, device_dp=True, dp=False, trainable="head", num_devices=4,
                     cohort_size=2, rounds=3, update_clip_norm=0.01, device_noise_multiplier=0.8,
                     adaptive_clip_quantile=0.5, noise_at="device")
    run_rounds(cfg)
    with LedgerReader(Path(cfg.run_dir) / "ledger.sqlite") as ledger:
        events = ledger.events_by_device("device")
    by_round = {}
    for evs in events.values():
        for e in evs:
            by_round.setdefault(e.round, set()).add(e.max_grad_norm)
            assert e.noise_multiplier == 0.8
    assert all(len(v) == 1 for v in by_round.values()) and by_round[1] == {0.01}
    assert by_round[2] != by_round[1]


@pytest.mark.parametrize("settings, flag", [
    (dict(adaptive_clip_quantile=1.0), "--adaptive-clip-quantile: must be in"),
    (dict(adaptive_clip_quantile=0.5, dp=False), "--no-dp"),
    (dict(adaptive_clip_quantile=0.5, noise_at="device", dp_engine="opacus"), "needs --dp-engine dpfl"),
    (dict(adaptive_clip_quantile=0.5, adaptive_clip_lr=0.0), "--adaptive-clip-lr"),
    (dict(adaptive_clip_quantile=0.5, clipped_count_stddev=-1.0), "--clipped-count-stddev"),
])
def test_bad_adaptive_settings_are_refused(settings, flag):
    with pytest.raises(ConfigError, match=flag):
        RunConfig(model="tiny", **settings).validate()


def test_calibration_records_sigma_b_and_refuses_one_too_small():
    cfg = RunConfig(model="tiny", noise_at="aggregate", sample_rate=0.5, target_epsilon=4.0, rounds=5,
                    adaptive_clip_quantile=0.5, target_delta=1e-5).validate()
    cal = mechanism_for(cfg).calibrate(np.array([10, 20]), 1e-5, lambda: 1.0)
    assert cal.values["clipped_count_stddev"] == pytest.approx(COUNT_STDDEV_PER_SIGMA * cal.values["noise_multiplier"])
    bad = cfg.replace(clipped_count_stddev=0.01)
    with pytest.raises(ConfigError, match="--clipped-count-stddev"):
        mechanism_for(bad).calibrate(np.array([10, 20]), 1e-5, lambda: 1.0)


def test_local_dpsgd_moves_C_every_step_and_the_server_takes_the_geometric_mean(tmp_path, data_dir):
    cfg = toy_config(tmp_path / "run", data_dir, noise_at="device", trainable="head", num_devices=4, cohort_size=4,
                     rounds=3, batch_size=2, noise_multiplier=1.0, max_grad_norm=5.0, adaptive_clip_quantile=0.5)
    mech = mechanism_for(cfg)
    assert mech.reply.clip == "clip-norm" and mech.round_params() == {}
    server, grid, _, _ = run_rounds(cfg)
    finals: dict[int, list[float]] = {}
    for d, content in grid.outgoing:
        if rec.CLIP in content:
            assert set(content[rec.CLIP].keys()) == {"clip-norm"}
            finals.setdefault(int(content[rec.PRIVACY]["round"]), []).append(float(content[rec.CLIP]["clip-norm"]))
    starts = {int(m.content["config"]["server-round"]): float(m.content["config"]["max-grad-norm"]) for m in grid.sent
              if "max-grad-norm" in m.content["config"]}
    assert starts[1] == 5.0 and set(finals) >= {1, 2}
    for t in (1, 2):  # round t + 1 starts from the geometric mean of round t's final C
        assert starts[t + 1] == pytest.approx(float(np.exp(np.mean(np.log(finals[t])))), rel=1e-9)
    assert any(abs(c - 5.0) > 1e-6 for c in finals[1])  # C moved within the devices' rounds
    with LedgerReader(Path(cfg.run_dir) / "ledger.sqlite") as ledger:
        events = ledger.events_by_device("example")
    assert {e.round: e.max_grad_norm for evs in events.values() for e in evs} == starts
    assert {e.noise_multiplier for evs in events.values() for e in evs} == {1.0}


def test_local_dpsgd_steps_use_sigma_g_and_the_device_noise_moves_C():
    """train_local with adaptive clipping: the engine's noise multiplier is sigma_g, and C changes after each step."""
    from mechanisms.training import local_config, train_local
    from nlu.tasks import make_task

    cfg = RunConfig(model="tiny", noise_at="device", noise_multiplier=2.0, max_grad_norm=1.0, batch_size=3,
                    local_epochs=2, adaptive_clip_quantile=0.5, clipped_count_stddev=4.0).validate()
    local = local_config(cfg, {"max-grad-norm": 0.7}, dp=True, adaptive=True)
    assert local.max_grad_norm == 0.7 and local.adaptive_clip == (0.5, 0.2, 4.0)
    assert local.noise_multiplier == pytest.approx(gradient_noise_multiplier(2.0, 4.0))
    plain = local_config(cfg, {"max-grad-norm": 0.7}, dp=True, adaptive=False)
    assert plain.max_grad_norm == 1.0 and plain.adaptive_clip is None and plain.noise_multiplier == 2.0
    task = make_task("intent", 3)
    model = _tiny(task).float()
    result = train_local(model, _device_data(n=9), local, NoiseSource(0), task=task)
    assert result.clip_norm is not None and result.clip_norm != 0.7


def test_a_count_beyond_half_the_devices_examples_is_rejected():
    mech = mechanism_for(RunConfig(model="tiny", noise_at="aggregate", noise_multiplier=1.0,
                                   adaptive_clip_quantile=0.5).validate())
    assert mech.check_clip(3.0, 6) is None and mech.check_clip(-3.0, 6) is None
    assert "exceeds half" in mech.check_clip(3.5, 6)


def test_zero_noise_adaptive_run_records_no_count_noise_and_resumes(tmp_path, data_dir):
    cfg = toy_config(tmp_path / "run", data_dir, noise_at="aggregate", trainable="head", num_devices=4, cohort_size=4,
                     rounds=2, sample_rate=1.0, noise_multiplier=0.0, allow_zero_noise=True, adaptive_clip_quantile=0.5)
    run_rounds(cfg, rounds=1)
    assert "clipped_count_stddev" not in (Path(cfg.run_dir) / "config.toml").read_text()
    from dpfl.commands.simulate import resume_config

    server, _, _, _ = run_rounds(resume_config(cfg.run_dir), resume=True)  # config.toml read back as --resume does
    assert server.start_round == 2
