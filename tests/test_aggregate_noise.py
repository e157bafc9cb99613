"""Noise on the aggregate (issue 18): the noise's size, what a device's reply holds, the accounting.

* :class:`mechanisms.aggregate.AggregateNoiseAggregator` adds N(0, (sigma C)^2) ONCE to the
  cohort's sum and divides by E[n]; :class:`mechanisms.dp_fedavg.DeviceDPAggregator` adds
  N(0, (sigma_u S)^2) and divides by m. Measured on zero sums over many entries and rounds.
* A device's reply in the aggregate placement is the record ``arrays`` and nothing else, its
  keys are exactly the trainable parameters, and its values are the brute-force sum over the
  device's examples of their clipped per-example gradients (the ClientApp's train handler run
  in-process on the tiny model; float64 for the engine's own function).
* The example-level accounting of the placement equals dp-accounting's PLD accountant, built
  independently here, on hand-built and on recorded schedules; ``--target-epsilon`` calibrates
  sigma for T rounds at rate p.

The round loop runs in this process on a grid that calls the ClientApp directly (no Ray).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

import client.app as capp
from mechanisms.aggregate import clipped_gradient_sum
from dp.secure_random import NoiseSource
from settings.config import RunConfig
from inprocess import run_rounds, toy_config, write_lamp_data
from nlu.model import set_trainable, trainable_state_keys
from protocol.arrays import load_into, record_from_numpy
from protocol.messages import validate_update
from rundir import LedgerReader
from server import app as sapp
from mechanisms import RoundPlan, mechanism_for
from mechanisms.aggregate import AggregateNoiseAggregator
from mechanisms.dp_fedavg import DeviceDPAggregator
from server.privacy import PrivacyBook

DELTA = 1e-5
#: the discretisation of dp.accounting's PLD (its documented default); the reference uses the same grid
PLD_INTERVAL = 1e-3
pytestmark = pytest.mark.usefixtures("task_identity")  # Flower's Message() in-process (tests/conftest.py)


# ---------------------------------------------------------------------------------- harness
def example_event(cfg, num_examples):
    """The example-level event the run's mechanism charges a device holding ``num_examples``."""
    return mechanism_for(cfg).example_event(num_examples)


def calibrate_example_noise(cfg, activity, delta):
    """The noise multiplier the run's mechanism calibrates for ``cfg.target_epsilon``."""
    return mechanism_for(cfg).calibrate(activity, delta, lambda: 1.0).values["noise_multiplier"]

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_lamp_data(tmp_path_factory.mktemp("aggdata"))


def _cfg(tmp_path, data_dir, name="run", **kw) -> RunConfig:
    # strategy fedavg: server SGD on the noisy gradient, the maths these tests check
    agg = dict(run_id="agg", strategy="fedavg", noise_at="aggregate", target_delta=DELTA)
    return toy_config(tmp_path / name, data_dir, **{**agg, **kw})


# ---------------------------------------------------------------------------------- 1. the noise's size
def _zero_rounds(agg, shape, rounds, replies, plan_kw, dtype=np.float64):
    """Released change of the floating array over ``rounds`` rounds of all-zero replies (one row per round)."""
    changes = []
    for t in range(1, rounds + 1):
        current = {"w": np.full(shape, 0.25, dtype=dtype), "ids": np.arange(5, dtype=np.int64)}
        agg.begin(t, current, RoundPlan(round=t, **plan_kw))
        for _ in range(replies):
            agg.add(record_from_numpy({"w": np.zeros(shape, dtype=dtype), "ids": np.zeros(5, dtype=np.int64)}), 3.0)
        out = agg.result()
        assert out["w"].dtype == dtype and out["w"].shape == shape
        assert np.array_equal(out["ids"], current["ids"])  # integer arrays are never noised
        changes.append((out["w"].astype(np.float64) - 0.25).ravel())
    return np.stack(changes)


def _assert_gaussian(x: np.ndarray, std: float, rel=0.02):
    n = x.size
    assert np.std(x) == pytest.approx(std, rel=rel), (np.std(x), std)
    assert abs(np.mean(x)) < 5 * std / math.sqrt(n), (np.mean(x), std)
    # a Gaussian's mass within one standard deviation (not a uniform's or a Laplace's)
    assert np.mean(np.abs(x) < std) == pytest.approx(0.6827, abs=0.01)


@pytest.mark.parametrize("replies", [1, 5])
def test_aggregate_noise_has_std_sigma_C_on_the_sum(replies):
    """Zero clipped sums, E[n] = 1, step 1: the released change is the noise itself, std sigma C.

    The noise is added once to the cohort's sum: with 5 replies it is not sqrt(5) times larger.
    """
    sigma, C = 1.3, 0.7
    agg = AggregateNoiseAggregator(sigma, C, step_size=1.0, noise=NoiseSource())
    x = _zero_rounds(agg, (20000,), rounds=4, replies=replies, plan_kw={"expected_examples": 1.0, "expected_cohort": 7.0})
    _assert_gaussian(x, sigma * C)
    # fresh noise in each round: the rounds' draws are uncorrelated
    corr = np.corrcoef(x)
    assert np.all(np.abs(corr[~np.eye(len(x), dtype=bool)]) < 0.05), corr


def test_aggregate_noise_is_divided_by_the_expected_examples_and_scaled_by_the_step():
    sigma, C, E = 0.9, 2.0, 40.0
    x = _zero_rounds(AggregateNoiseAggregator(sigma, C, 1.0, NoiseSource()), (20000,), 3, 2, {"expected_examples": E})
    _assert_gaussian(x, sigma * C / E)
    x = _zero_rounds(AggregateNoiseAggregator(sigma, C, 0.25, NoiseSource()), (20000,), 2, 2, {"expected_examples": E})
    _assert_gaussian(x, 0.25 * sigma * C / E)
    # float32 models get the same noise, rounded
    x = _zero_rounds(AggregateNoiseAggregator(sigma, C, 1.0, NoiseSource()), (20000,), 2, 1, {"expected_examples": E}, np.float32)
    _assert_gaussian(x, sigma * C / E)


def test_aggregate_step_without_noise_is_minus_lr_times_the_mean_clipped_sum():
    """sigma = 0: w - step * (sum_k s_k) / E[n] exactly (the replies' weights play no part)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 4))
    sums = [rng.normal(size=(3, 4)) for _ in range(3)]
    agg = AggregateNoiseAggregator(0.0, 1.0, step_size=0.5, noise=NoiseSource())
    agg.begin(1, {"w": w}, RoundPlan(round=1, expected_examples=12.5))
    for i, s in enumerate(sums):
        agg.add(record_from_numpy({"w": s}), weight=100.0 * (i + 1))
    np.testing.assert_allclose(agg.result()["w"], w - 0.5 * sum(sums) / 12.5, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("replies", [0, 3])
def test_device_dp_noise_has_std_sigma_u_S_over_m(replies):
    """DP-FedAvg with unchanged updates (zero deltas): the release is w + N(0, (sigma_u S)^2) / m."""
    sigma_u, S, m = 1.7, 0.4, 5.0
    agg = DeviceDPAggregator(S, sigma_u, NoiseSource())
    changes = []
    for t in range(1, 4):
        current = {"w": np.full(20000, 0.25)}
        agg.begin(t, current, RoundPlan(round=t, expected_cohort=m, expected_examples=1.0))
        for _ in range(replies):
            agg.add(record_from_numpy({"w": np.full(20000, 0.25)}), 9.0)
        changes.append(agg.result()["w"] - 0.25)
    _assert_gaussian(np.stack(changes), sigma_u * S / m)


def test_device_dp_clips_each_update_to_S():
    S = 0.5
    agg = DeviceDPAggregator(S, 0.0, NoiseSource())
    w = np.zeros(4)
    agg.begin(1, {"w": w}, RoundPlan(round=1, expected_cohort=2.0))
    agg.add(record_from_numpy({"w": np.array([3.0, 4.0, 0.0, 0.0])}), 1.0)  # norm 5 -> clipped to 0.5
    agg.add(record_from_numpy({"w": np.array([0.0, 0.0, 0.1, 0.0])}), 1.0)  # norm 0.1 -> kept
    np.testing.assert_allclose(agg.result()["w"], (np.array([0.3, 0.4, 0.0, 0.0]) + [0, 0, 0.1, 0]) / 2.0, atol=1e-15)


# ---------------------------------------------------------------------------------- 2. the reply: the clipped sum alone
def _brute_force(server, cfg, arrays: ArrayRecord, device: int, C: float):
    """(sum_i clip_C(grad l_i), per-example norms) over the device's examples, one example at a time, float64."""
    model = set_trainable(server.task.build_model(cfg.model, seed=cfg.seed), cfg.trainable, **cfg.lora_options())
    load_into(model, arrays, partial=True)
    model = model.double().eval()  # eval: no dropout
    keys = trainable_state_keys(model)
    by_name = dict(model.named_parameters(remove_duplicate=False))
    params = [by_name[k] for k in keys]
    data = capp.device_examples(cfg, device, 1)
    total = {k: torch.zeros_like(p) for k, p in zip(keys, params)}
    norms = []
    for i in range(len(data)):
        loss = server.task.per_example_loss(model, server.task.collate(data, np.array([i])))
        assert loss.shape == (1,)
        grads = torch.autograd.grad(loss[0], params)
        norm = float(torch.sqrt(sum((g * g).sum() for g in grads)))
        norms.append(norm)
        scale = min(1.0, C / norm)
        for k, g in zip(keys, grads):
            total[k] += g * scale
    return total, norms


def _initial_norms(tmp_path, data_dir, trainable):
    """Per-example gradient norms of every device's examples at the initial model (to choose C)."""
    cfg = _cfg(tmp_path, data_dir, name="probe", trainable=trainable)
    server = sapp.Server(cfg)
    server.ledger.close()
    norms = []
    for d in range(cfg.num_devices):
        norms += _brute_force(server, cfg, server.arrays, d, 1.0)[1]
    return norms


@pytest.mark.parametrize("trainable", ["head", "all", "lora"])
def test_reply_is_exactly_the_clipped_sum(tmp_path, data_dir, no_dropout, trainable):
    """Reply = {"arrays"}, keys = trainable parameters, values = sum_i clip_C(grad l_i) (sample rate 1);
    with sigma = 0 the release is w - lr * (sum of the replies) / (p * sum n_k)."""
    norms = _initial_norms(tmp_path, data_dir, trainable)
    C = float(np.median(norms))
    lr = 0.5
    cfg = _cfg(tmp_path, data_dir, trainable=trainable, num_devices=4, cohort_size=4, rounds=1, sample_rate=1.0,
               noise_multiplier=0.0, allow_zero_noise=True, max_grad_norm=C, server_learning_rate=lr)
    server, grid, released, outs = run_rounds(cfg)
    keys = trainable_state_keys(server.model)
    assert len(grid.outgoing) == cfg.num_devices == outs[0].replies  # q = 1: every device trained and replied
    sent = {grid.nodes[m.metadata.dst_node_id]: m.content["arrays"] for m in grid.sent}
    clipped = unclipped = 0
    total = None
    for d, content in grid.outgoing:
        # nothing but the clipped sum: one record, "arrays", no metrics, no config, no info
        assert list(content.keys()) == ["arrays"]
        assert list(content.array_records) == ["arrays"] and not content.metric_records and not content.config_records
        assert list(content["arrays"].keys()) == keys
        assert validate_update(content, server.expected, dp=True, kind="clipped-sum") is None
        ref, ns = _brute_force(server, cfg, sent[d], d, C)
        clipped += sum(n > C * (1 + 1e-6) for n in ns)
        unclipped += sum(n < C * (1 - 1e-6) for n in ns)
        # float32 engine against the float64 loop; the absolute tolerance is set by the largest entry of the
        # whole sum (some entries are exactly 0 in theory, e.g. attention key biases, and rounding noise in practice)
        scale = max(float(v.abs().max()) for v in ref.values())
        for k in keys:
            got = torch.from_numpy(content["arrays"][k].numpy()).double()
            torch.testing.assert_close(got, ref[k], rtol=1e-4, atol=1e-5 * scale, msg=f"device {d}, {k}")
        total = {k: ref[k].clone() for k in keys} if total is None else {k: total[k] + ref[k] for k in keys}
    assert clipped > 0 and unclipped > 0, "C should clip some examples and leave others (median norm)"
    # the server's release without noise: w - lr * sum_k s_k / E[n],  E[n] = p * sum_k n_k
    n_total = sum(len(capp.device_examples(cfg, d, 1)) for d in range(cfg.num_devices))
    w0 = next(iter(sent.values()))
    step_scale = lr * max(float(v.abs().max()) for v in total.values()) / n_total
    changed = 0
    for k in keys:
        before = torch.from_numpy(w0[k].numpy()).double()
        expect = before - lr * total[k] / (1.0 * n_total)
        got = torch.from_numpy(released[k].numpy()).double()
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-4 * step_scale, msg=k)
        changed += int((got != before).sum())
    assert changed > 0


@pytest.mark.parametrize("trainable", ["head", "all", "lora"])
def test_clipped_gradient_sum_equals_brute_force_float64(tmp_path, data_dir, trainable):
    """The engine's clipped sum on a float64 model (dropout off) equals the per-example loop to 1e-10."""
    cfg = _cfg(tmp_path, data_dir, trainable=trainable)
    server = sapp.Server(cfg)
    server.ledger.close()
    model = set_trainable(server.task.build_model(cfg.model, seed=cfg.seed), cfg.trainable, **cfg.lora_options()).double()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    norms = _brute_force(server, cfg, server.arrays, 0, 1.0)[1]
    C = float(np.median(norms))
    data = capp.device_examples(cfg, 0, 1)
    got = clipped_gradient_sum(model, data, sample_rate=1.0, max_grad_norm=C, physical_batch_size=4,
                               noise=NoiseSource(), task=server.task)
    ref, _ = _brute_force(server, cfg, server.arrays, 0, C)
    assert list(got) == trainable_state_keys(model)
    for k in got:
        assert got[k].dtype == torch.float64
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-12, msg=k)
    assert all(p.grad is None for p in model.parameters())  # the model is left as it was


def test_clipped_sum_reply_with_anything_else_is_rejected():
    good = RecordDict({"arrays": record_from_numpy({"w": np.zeros(3, dtype=np.float32)})})
    exp = {"w": ((3,), "float32")}
    assert validate_update(good, exp, dp=True, kind="clipped-sum") is None
    for extra in ({"metrics": MetricRecord({"num-examples": 5, "train_loss": 0.3})}, {"info": ConfigRecord({"device-id": 0})}):
        bad = RecordDict({"arrays": record_from_numpy({"w": np.zeros(3, dtype=np.float32)}), **extra})
        why = validate_update(bad, exp, dp=True, kind="clipped-sum")
        assert why is not None and next(iter(extra)) in why


# ---------------------------------------------------------------------------------- 5. the accounting
def _pld_reference(events: list[tuple[float, float]], delta=DELTA) -> float:
    """dp-accounting's PLD accountant: one PoissonSampled(p, Gaussian(sigma)) per round joined."""
    from dp_accounting import dp_event
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    acc = PLDAccountant(value_discretization_interval=PLD_INTERVAL)
    for sigma, p in events:
        acc.compose(dp_event.PoissonSampledDpEvent(p, dp_event.GaussianDpEvent(sigma)))
    return float(acc.get_epsilon(delta))


def test_aggregate_accounting_equals_dp_accounting_on_a_hand_built_schedule():
    """Device 0 joins rounds {1, 3, 4}, device 1 round {2}, device 2 every round of 5: one event per round
    joined at rate p (whatever the device holds: no amplification by device selection)."""
    sigma, p = 1.1, 0.3
    cfg = RunConfig(noise_at="aggregate", sample_rate=p, noise_multiplier=sigma).validate()
    for n in (1, 7, 500):
        ev = example_event(cfg, n)
        assert (ev.noise_multiplier, ev.sample_rate, ev.steps) == (sigma, p, 1)
    schedule = {0: {1, 3, 4}, 1: {2}, 2: {1, 2, 3, 4, 5}}
    book = PrivacyBook(DELTA, "pld")
    for t in range(1, 6):
        book.add("example", {d: example_event(cfg, 10 + d) for d, rounds in schedule.items() if t in rounds})
    for d, rounds in schedule.items():
        ref = _pld_reference([(sigma, p)] * len(rounds))
        assert book.epsilon["example"][d] == pytest.approx(ref, rel=1e-6), d
    # the schedule matters: more rounds joined, more epsilon
    assert book.epsilon["example"][1] < book.epsilon["example"][0] < book.epsilon["example"][2]


def test_aggregate_accounting_of_a_run_equals_dp_accounting_on_its_recorded_schedule(tmp_path, data_dir):
    """The ledger's events are the rounds each device was sent a message; its epsilons are dp-accounting's."""
    sigma, p = 1.4, 0.4
    cfg = _cfg(tmp_path, data_dir, trainable="head", num_devices=5, cohort_size=3, rounds=5, sample_rate=p,
               noise_multiplier=sigma)
    server, grid, _, _ = run_rounds(cfg)
    joined: dict[int, list[int]] = {}
    for m in grid.sent:
        joined.setdefault(grid.nodes[m.metadata.dst_node_id], []).append(int(m.content["config"]["server-round"]))
        assert float(m.content["config"]["sample-rate"]) == p
    with LedgerReader(Path(cfg.run_dir) / "ledger.sqlite") as ledger:
        eps = ledger.device_epsilons("example")
        by_device = ledger.events_by_device("example")
    assert set(by_device) == set(joined) and len(joined) >= 2
    sizes = {len(v) for v in joined.values()}
    for d, evs in by_device.items():
        assert sorted(e.round for e in evs) == sorted(joined[d])
        assert all((e.noise_multiplier, e.sample_rate, e.steps) == (sigma, p, 1) for e in evs)
        assert eps[d] == pytest.approx(_pld_reference([(sigma, p)] * len(evs)), rel=1e-6), d
    if len(sizes) > 1:  # devices that joined more rounds spent more
        most = max(joined, key=lambda d: len(joined[d]))
        least = min(joined, key=lambda d: len(joined[d]))
        assert eps[most] > eps[least]


@pytest.mark.parametrize("target, rounds, p", [(3.0, 20, 0.2), (8.0, 6, 1.0)])
def test_target_epsilon_calibrates_sigma_for_T_rounds_at_rate_p(tmp_path, data_dir, target, rounds, p):
    cfg = _cfg(tmp_path, data_dir, rounds=rounds, sample_rate=p, target_epsilon=target)
    sigma = calibrate_example_noise(cfg, np.array([3, 6, 40]), DELTA)
    eps = _pld_reference([(sigma, p)] * rounds)
    assert eps <= target * (1 + 1e-6)
    assert eps >= 0.97 * target, "sigma is larger than needed"
    assert _pld_reference([(0.97 * sigma, p)] * rounds) > target  # and not much larger
    # the server applies it (and writes it to config.toml)
    server = sapp.Server(cfg)
    server.ledger.close()
    assert server.cfg.noise_multiplier == pytest.approx(sigma, rel=1e-9)
    assert RunConfig.from_toml(Path(cfg.run_dir) / "config.toml").noise_multiplier == pytest.approx(sigma, rel=1e-9)
