"""Nothing a run releases undoes its noise (issues 15 and 18), checked from outside the simulation.

* Only the trainable parameters travel, in both directions, in both noise placements.
* No reply of a DP run carries a loss, a timing or any other un-noised statistic of the data.
* The noise is secret: two runs with the same seed release different models; the seed (and
  everything else recorded in the run directory) does not regenerate it; ``--reproducible-noise``
  does, by design. :class:`dp.secure_random.NoiseSource` never repeats and never travels.
* Budgets hold: a run with ``--target-epsilon E`` never takes a device past E, even past its
  planned rounds or after a crash whose round was spent and is re-run.

The round loop runs in this process on a grid that calls the ClientApp directly (no Ray).
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import client.app as capp
from dp.accounting import SubsampledGaussianEvent, calibrate_noise_multiplier, compute_epsilon
from dp.secure_random import NoiseSource
from settings.config import RunConfig
from inprocess import run_rounds, toy_config, write_lamp_data
from nlu.model import set_trainable, trainable_state_keys
from nlu.tasks import task_for_data
from partitions.population import build_population
from rundir import LedgerReader, config_path, read_metric_lines
from server import app as sapp
from server.round import commit_events, select

DELTA = 1e-5
_DEVICE_MODEL = capp._model  # the ClientApp's per-process model cache (lru_cache)
pytestmark = pytest.mark.usefixtures("task_identity")  # Flower's Message() in-process (tests/conftest.py)


# ---------------------------------------------------------------------------------- harness
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_lamp_data(tmp_path_factory.mktemp("hygdata"))


def _cfg(tmp_path, data_dir, name="run", **kw) -> RunConfig:
    # strategy fedavg: server SGD on the noisy gradient, the maths these tests check
    hyg = dict(run_id="hyg", strategy="fedavg", target_delta=DELTA)
    return toy_config(tmp_path / name, data_dir, **{**hyg, **kw})


def _floats(arrays) -> np.ndarray:
    """Every floating entry of an ArrayRecord, in key order, float64."""
    return np.concatenate([np.asarray(a.numpy(), dtype=np.float64).ravel() for a in arrays.values() if a.numpy().dtype.kind == "f"])


def _trainable_keys(cfg) -> tuple[list[str], list[str]]:
    """(trainable keys, frozen keys) of the run's model, built here from the settings (not the server's)."""
    pop = build_population(cfg)
    task = task_for_data(cfg.task, pop.data, cfg.slot_loss_weight, pooling=cfg.pooling)
    model = set_trainable(task.build_model(cfg.model, seed=cfg.seed), cfg.trainable, **cfg.lora_options())
    keys = trainable_state_keys(model)
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    frozen = [k for k in model.state_dict() if k in params and k not in keys]
    return keys, frozen


# ---------------------------------------------------------------------------------- 3. only trainable parameters travel
@pytest.mark.parametrize("noise_at", ["device", "aggregate"])
@pytest.mark.parametrize("trainable", ["head", "lora"])
def test_messages_hold_only_trainable_parameters(tmp_path, data_dir, noise_at, trainable):
    cfg = _cfg(tmp_path, data_dir, noise_at=noise_at, trainable=trainable, rounds=2, cohort_size=4)  # q = 1
    keys, frozen = _trainable_keys(cfg)
    assert "encoder.embeddings.word_embeddings.weight" in frozen and len(frozen) > len(keys)
    if trainable == "lora":
        assert any("lora_A" in k for k in keys) and any("lora_B" in k for k in keys)
        assert not any("base_layer" in k for k in keys)
    else:
        assert keys == ["classifier.weight", "classifier.bias"]
    server, grid, released, _ = run_rounds(cfg)
    assert trainable_state_keys(server.model) == keys
    assert grid.sent and grid.outgoing
    for m in grid.sent:  # server -> device
        assert list(m.content["arrays"].keys()) == keys
        assert list(m.content.array_records) == ["arrays"]
    for _, content in grid.outgoing:  # device -> server (trained weights, or the clipped sum)
        assert list(content["arrays"].keys()) == keys
        assert list(content.array_records) == ["arrays"]
    assert list(released.keys()) == keys
    # the bytes that travel are those of the trainable parameters (no frozen weight hidden in a record)
    n_trainable = sum(int(np.prod(v.shape)) for k, v in server.model.state_dict().items() if k in keys)
    for m in grid.sent[:2]:
        assert sum(int(np.prod(a.shape)) for a in m.content["arrays"].values()) == n_trainable


# ---------------------------------------------------------------------------------- 4. no un-noised statistic leaves a device
PRIVACY_FIELDS = {"device-id", "round", "noise_multiplier", "sample_rate", "steps", "max_grad_norm"}


def test_dp_replies_carry_no_loss_timing_or_other_statistic(tmp_path, data_dir):
    cfg = _cfg(tmp_path, data_dir, noise_at="device", rounds=2, cohort_size=4, batch_size=4, local_epochs=2)  # q = 1
    server, grid, _, outs = run_rounds(cfg)
    assert grid.outgoing
    for d, content in grid.outgoing:
        assert set(content.keys()) == {"arrays", "metrics", "privacy", "info"}
        metrics = dict(content["metrics"])
        assert set(metrics) == {"num-examples"}, metrics  # the device no longer re-composes its epsilon (the ledger is the account)
        # num-examples is the public count n_k (the server knows it); the event is a function of it
        n = len(capp.device_examples(cfg, d, int(content["privacy"]["round"])))
        assert metrics["num-examples"] == n
        privacy = dict(content["privacy"])
        assert set(privacy) == PRIVACY_FIELDS, privacy
        assert privacy["sample_rate"] == pytest.approx(min(1.0, cfg.batch_size / n))
        assert privacy["steps"] == math.ceil(cfg.local_epochs * n / cfg.batch_size)
        assert privacy["noise_multiplier"] == server.cfg.noise_multiplier and privacy["max_grad_norm"] == cfg.max_grad_norm
        assert set(content["info"].keys()) == {"ray-node", "device-id"}
    assert all(o.train_loss is None and o.train_seconds_mean is None for o in outs)
    for line in read_metric_lines(cfg.run_dir):
        assert line.get("train_loss") is None and line.get("train_seconds_mean") is None
        assert line.get("task_seconds_mean") is None


def test_the_report_releases_no_round_timing(tmp_path, data_dir):
    """A private round's seconds follow its cohort and its devices' secret Poisson sample sizes:
    metrics.jsonl keeps them for the operator (the run directory is not a release), the report
    (the release beside the models) carries none."""
    from report import build_report

    def keys(x, out):
        if isinstance(x, dict):
            for k, v in x.items():
                out.add(str(k))
                keys(v, out)
        elif isinstance(x, list):
            for v in x:
                keys(v, out)
        return out

    cfg = _cfg(tmp_path, data_dir, noise_at="aggregate", rounds=2, cohort_size=3)
    run_rounds(cfg)
    assert all("seconds" in line for line in read_metric_lines(cfg.run_dir))
    summary = build_report(Path(cfg.run_dir))
    assert not [k for k in keys(summary, set()) if "second" in k or k.endswith("_s")]


def test_device_level_dp_replies_carry_no_loss(tmp_path, data_dir):
    """DP-FedAvg without example-level DP is a DP run too: its replies carry no training loss or timings."""
    cfg = _cfg(tmp_path, data_dir, dp=False, device_dp=True, rounds=1, cohort_size=4)  # q = 1: the (secret) cohort is never empty
    server, grid, _, outs = run_rounds(cfg)
    assert grid.outgoing
    for _, content in grid.outgoing:
        assert set(dict(content["metrics"])) == {"num-examples"}, dict(content["metrics"])
    assert all(o.train_loss is None for o in outs)


def test_non_private_fedavg_run_still_reports_its_loss(tmp_path, data_dir):
    cfg = _cfg(tmp_path, data_dir, dp=False, noise_at="device", rounds=1, cohort_size=4)  # FedAvg; q = 1: never an empty cohort
    _, grid, _, outs = run_rounds(cfg)
    assert grid.outgoing
    for _, content in grid.outgoing:
        m = dict(content["metrics"])
        assert {"num-examples", "train_loss"} <= set(m) and math.isfinite(m["train_loss"]) and "epsilon" not in m
        assert "privacy" not in content
    assert outs[0].train_loss is not None and math.isfinite(outs[0].train_loss)


# ---------------------------------------------------------------------------------- 6. the noise is secret
def test_noise_source_is_secret_fresh_and_reproducible_only_when_seeded():
    a, b = NoiseSource(), NoiseSource()
    assert not np.array_equal(a.normal_numpy((1000,), 1.0), b.normal_numpy((1000,), 1.0))
    assert not np.array_equal(a.uniform(100), a.uniform(100))  # one source never repeats itself
    assert not np.array_equal(a.bytes(32), NoiseSource().bytes(32))
    s, t = NoiseSource(7), NoiseSource(7)
    assert np.array_equal(s.normal_numpy((1000,), 1.0), t.normal_numpy((1000,), 1.0))
    assert np.array_equal(s.bernoulli(500, 0.3), t.bernoulli(500, 0.3))
    assert not np.array_equal(NoiseSource(7).normal_numpy((1000,), 1.0), NoiseSource(8).normal_numpy((1000,), 1.0))
    assert s.reproducible and not a.reproducible
    for src in (a, s):
        with pytest.raises(TypeError):
            pickle.dumps(src)
        assert src._key.hex() not in repr(src)


def _cohorts(grid) -> list[tuple[int, list[int]]]:
    rounds = sorted({int(m.content["config"]["server-round"]) for m in grid.sent})
    return [(t, sorted(grid.nodes[m.metadata.dst_node_id] for m in grid.sent if int(m.content["config"]["server-round"]) == t))
            for t in rounds]


def _released(cfg):
    _DEVICE_MODEL.cache_clear()  # same process state for every run (the devices' models are rebuilt)
    server, grid, released, outs = run_rounds(cfg)
    return server, grid, released


@pytest.mark.parametrize("noise_at", ["device", "aggregate"])
def test_two_runs_with_the_same_seed_release_different_models(tmp_path, data_dir, noise_at, no_dropout):
    """Without dropout (whose draws would differ anyway) the two runs differ only by their secret draws."""
    kw = dict(noise_at=noise_at, trainable="head", rounds=1, num_devices=3, cohort_size=3, sample_rate=1.0, seed=5)
    s1, g1, r1 = _released(_cfg(tmp_path, data_dir, name="a", **kw))
    s2, g2, r2 = _released(_cfg(tmp_path, data_dir, name="b", **kw))
    # the seed drives initialisation and partitioning: the same starting model went to the same devices
    assert _cohorts(g1) == _cohorts(g2) == [(1, [0, 1, 2])]
    assert np.array_equal(_floats(g1.sent[0].content["arrays"]), _floats(g2.sent[0].content["arrays"]))
    # ... but not the noise: the released models differ
    assert np.abs(_floats(r1) - _floats(r2)).max() > 1e-4  # far above float32 rounding of a reordered sum


@pytest.mark.parametrize("noise_at", ["device", "aggregate"])
def test_reproducible_noise_with_the_same_seed_releases_the_same_model(tmp_path, data_dir, noise_at, no_dropout):
    """--reproducible-noise derives the noise, the batches, the example sampling and the cohorts from the seed.

    Dropout is switched off: it draws from torch's global generator, in whatever order the
    devices' tasks run (Flower orders a round's messages at random), and is not part of the
    secret randomness the switch makes reproducible. The replies are folded in device order and
    the devices' features do not depend on the batches that met them: the same model bit for bit.
    """
    kw = dict(noise_at=noise_at, trainable="head", rounds=2, num_devices=3, cohort_size=2, sample_rate=0.5, seed=5,
              reproducible_noise=True)
    _, g1, r1 = _released(_cfg(tmp_path, data_dir, name="a", **kw))
    _, g2, r2 = _released(_cfg(tmp_path, data_dir, name="b", **kw))
    assert _cohorts(g1) == _cohorts(g2)  # the same cohorts (the seeded selection draws)
    np.testing.assert_array_equal(_floats(r1), _floats(r2))
    # the same run without the switch: secret noise, another model
    _, _, r3 = _released(_cfg(tmp_path, data_dir, name="c", **{**kw, "reproducible_noise": False}))
    assert np.abs(_floats(r1) - _floats(r3)).max() > 1e-4


def test_noise_cannot_be_regenerated_from_the_run_directory(tmp_path, data_dir, no_dropout):
    """An attacker with the run directory (config.toml: seed and every setting) and the data tries to
    regenerate the noise of a secure run and subtract it.

    With sample rate 1, every device selected (q = 1) and no dropout, the noise-free release
    ``w_clean`` is a function of the recorded settings and the data; the residual
    ``released - w_clean`` is the (scaled) noise. Re-running the recorded configuration, or
    deriving the noise from the recorded seed (``--reproducible-noise``), gives residuals
    uncorrelated with it, while a reproducible run's residual is regenerated exactly.
    """
    lr, sigma, C = 1.0, 1.0, 1.0
    cfg = _cfg(tmp_path, data_dir, name="secure", noise_at="aggregate", trainable="all", rounds=1, num_devices=3,
               cohort_size=3, sample_rate=1.0, noise_multiplier=sigma, max_grad_norm=C, server_learning_rate=lr)
    server, _, released = _released(cfg)
    rd = Path(cfg.run_dir)
    recorded = RunConfig.from_toml(config_path(rd))
    assert recorded.seed == cfg.seed and recorded.reproducible_noise is False

    # the run directory holds nothing of the server's key
    key = server.noise._key
    for p in rd.rglob("*"):
        if p.is_file():
            blob = p.read_bytes()
            assert key not in blob and key.hex().encode() not in blob, p

    def again(name, **changes):
        return _released(recorded.replace(run_dir=str(tmp_path / name), **changes))[2]

    clean = _floats(again("clean", noise_multiplier=0.0, allow_zero_noise=True))
    residual = _floats(released) - clean
    n_examples = len(build_population(cfg).data.train)
    # the residual is the noise: -lr * N(0, (sigma C)^2) / E[n], E[n] = p * sum n_k
    assert np.std(residual) == pytest.approx(lr * sigma * C / n_examples, rel=0.03)

    def corr(x):
        return float(np.corrcoef(residual, x)[0, 1])

    rerun = _floats(again("rerun")) - clean  # the recorded configuration, same seed
    seeded = _floats(again("seeded", reproducible_noise=True)) - clean  # noise derived from the recorded seed
    assert np.std(rerun) == pytest.approx(np.std(residual), rel=0.03)
    assert abs(corr(rerun)) < 0.02 and abs(corr(seeded)) < 0.02
    assert np.std(residual - seeded) > 0.5 * np.std(residual)  # subtracting it removes nothing
    # control: with --reproducible-noise the same attack regenerates the noise exactly
    seeded2 = _floats(again("seeded2", reproducible_noise=True)) - clean
    np.testing.assert_allclose(seeded2, seeded, rtol=0, atol=1e-6 * np.std(seeded))


# ---------------------------------------------------------------------------------- 7. budgets hold
def _check_ledger_within(cfg, budget, delta):
    """Every device's example-level epsilon in the ledger (cached and recomputed) <= budget; returns the reader's view."""
    with LedgerReader(Path(cfg.run_dir) / "ledger.sqlite") as ledger:
        cached = ledger.device_epsilons("example")
        by_device = ledger.events_by_device("example")
        hits = ledger.budget_events("example")
    assert by_device and set(cached) == set(by_device)
    for d, evs in by_device.items():
        recomputed = compute_epsilon([SubsampledGaussianEvent(*e.mechanism) for e in evs], delta, cfg.accountant)
        assert cached[d] <= budget + 1e-9 and recomputed <= budget + 1e-9, (d, cached[d], recomputed, budget)
        assert cached[d] == pytest.approx(recomputed, rel=1e-9)
    for h in hits:  # a device stopped by its budget never trains again
        assert h.unit == "example" and h.epsilon is not None and h.epsilon > budget
        assert all(e.round < h.round for e in by_device.get(h.device_id, [])), h
    return by_device, hits


@pytest.mark.parametrize("noise_at", ["device", "aggregate"])
def test_target_epsilon_is_a_budget_past_the_planned_rounds(tmp_path, data_dir, noise_at):
    """sigma is calibrated for T rounds; running 2T rounds (every device selected) stops every device at the budget."""
    E, T = 4.0, 3
    cfg = _cfg(tmp_path, data_dir, noise_at=noise_at, trainable="head", rounds=T, num_devices=3, cohort_size=3,
               sample_rate=0.5, target_epsilon=E)
    server, grid, _, outs = run_rounds(cfg, rounds=2 * T)
    by_device, hits = _check_ledger_within(cfg, E, server.delta)
    hit = {h.device_id for h in hits}
    assert hit, "no device reached the budget in 2T rounds"
    for d, evs in by_device.items():  # a device trains until its budget stops it (at T rounds or later)
        assert (d in hit and len(evs) >= T) or len(evs) == 2 * T, (d, len(evs))
    if noise_at == "aggregate":  # one event per round, the same for every device: all stop after exactly T
        assert hit == set(range(cfg.num_devices)) and all(len(evs) == T for evs in by_device.values())
        assert outs[-1].extra["devices_over_budget"] == cfg.num_devices and outs[-1].cohort_size == 0


@pytest.mark.parametrize("noise_at", ["device", "aggregate"])
def test_target_epsilon_holds_after_a_crash_and_resume(tmp_path, data_dir, noise_at):
    """A crash in round 3 after its events were committed (spent), then --resume: the re-run round 3 and
    round 4 would compose T + 1 events for a target calibrated for T; the budget stops the device first."""
    E, T = 4.0, 4
    cfg = _cfg(tmp_path, data_dir, noise_at=noise_at, trainable="head", rounds=T, num_devices=3, cohort_size=3,
               sample_rate=0.5, target_epsilon=E)
    run_rounds(cfg.replace(), rounds=2)
    crashed = sapp.Server(cfg.replace(), resume=True)
    assert crashed.start_round == 3
    sel = select(crashed, 3)  # the real stages of round 3, up to the ledger commit; then the process dies
    commit_events(crashed, sel)
    crashed.ledger.close()
    assert len(sel.cohort) == cfg.num_devices
    server, _, _, _ = run_rounds(cfg.replace(), resume=True)
    assert server.start_round == 3
    by_device, hits = _check_ledger_within(cfg, E, server.delta)
    # the crashed attempt's events of round 3 stay in the ledger beside the re-run's
    assert len({e.attempt for evs in by_device.values() for e in evs if e.round == 3}) == 2
    assert hits, "the crashed round's spent events should make some device reach the budget"
    rounds = [line["round"] for line in read_metric_lines(cfg.run_dir)]
    assert rounds == list(range(1, T + 1))


@pytest.mark.parametrize("noise_at", ["device", "aggregate"])
def test_participation_cap_calibrates_for_the_cap_and_the_filter_stops_devices_across_a_resume(tmp_path, data_dir,
                                                                                              noise_at):
    """--participation-cap K: the noise is calibrated for K of a device's rounds (less than for all T), and
    the budget filter stops each device before its epsilon passes the target, across a resume."""
    from server.plan import resolve

    E, T, K = 4.0, 5, 2
    kw = dict(noise_at=noise_at, trainable="head", rounds=T, num_devices=3, cohort_size=3, sample_rate=0.5,
              target_epsilon=E)
    capped = _cfg(tmp_path, data_dir, participation_cap=K, **kw)
    uncapped = _cfg(tmp_path, data_dir, name="uncapped", **kw)
    sigma_cap = resolve(capped, build_population(capped)).settings.noise_multiplier
    sigma_all = resolve(uncapped, build_population(uncapped)).settings.noise_multiplier
    assert 0 < sigma_cap < sigma_all
    if noise_at == "aggregate":  # one event at rate p per round joined: K of them reach the target
        assert sigma_cap == pytest.approx(calibrate_noise_multiplier(E, resolve(capped, build_population(capped)).delta,
                                                                     schedule=[(0.5, K)]), rel=1e-9)
    run_rounds(capped.replace(), rounds=2)
    server, _, _, outs = run_rounds(capped.replace(), resume=True)
    assert server.start_round == 3
    by_device, hits = _check_ledger_within(capped, E, server.delta)
    assert hits and set(by_device) == set(range(3))
    if noise_at == "aggregate":  # q = 1: every device joins exactly K rounds, then none is left
        assert all(len(evs) == K for evs in by_device.values())
        assert outs[-1].cohort_size == 0
    with pytest.raises(Exception, match="--participation-cap"):
        RunConfig(participation_cap=2, noise_multiplier=1.0).validate()
