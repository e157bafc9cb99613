"""A population that costs memory per cohort: the built-in data as an index, devices generated when
selected, one device index, few Flower nodes, and budget checks that scale with distinct events.

Correctness only: round times and peak memory at 10k-1M devices are in benchmarks/population_scale.py.
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

from dp.accounting import SubsampledGaussianEvent, compute_epsilons
from partitions.device_index import DeviceIndex
from partitions.loading import SyntheticTrain, load_data
from partitions.population import build_population
from partitions.synthetic import device_records, device_sizes, generate
from rundir import release_run_lock
from server.privacy import PrivacyBook
from settings.config import SIMULATION_NODES, ConfigError, RunConfig


# --------------------------------------------------------------------------- the data as an index
def test_generated_rows_equal_the_materialised_split():
    data = load_data(synthetic_devices=40, seed=5)
    assert data.generated_train is not None and data.num_train == data.generated_train.size
    rows = [7, 0, data.num_train - 1, 300, 7]  # any order, repeats allowed
    full = data.train  # materialised: every device's records in device order
    assert len(full) == data.num_train and data.train_columns == full.column_names
    assert data.train_records(rows) == full.select(rows).to_dict()
    picked = data.select_train(rows)
    assert picked.to_dict() == full.select(rows).to_dict() and picked.features == full.features
    assert np.array_equal(data.train_uids(), np.asarray(full["uid"]))
    assert full.to_dict() == load_data(synthetic_devices=40, seed=5).train.to_dict()  # a function of the seed
    with pytest.raises(IndexError, match="out of range"):
        data.train_records([data.num_train])


def test_generate_lays_out_the_same_records_as_the_index():
    gen = generate(30, seed=2)
    data = load_data(synthetic_devices=30, seed=2)
    assert gen.train["text"] == data.train["text"] and gen.train["device"] == data.train["device"]
    assert gen.test["text"] == data.test["text"]


def test_a_device_is_generated_alone_whatever_the_population():
    """Device k's examples depend on the seed and k only (and its size on the seed and the mean
    size, which is 30 for any population of at least 100), not on the devices before it."""
    small, large = device_sizes(200, seed=9), device_sizes(5000, seed=9)
    assert np.array_equal(small, large[:200])
    assert small.dtype == np.int64 and small.min() >= 1
    k = 123
    a, b = device_records(9, k, int(small[k])), device_records(9, k, int(large[k]))
    assert a == b and set(a["device"]) == {k}
    assert device_records(9, k, 5) != device_records(9, k + 1, 5)


def test_a_million_device_population_is_an_index():
    tracemalloc.start()
    pop = build_population(RunConfig(num_devices=1_000_000, rounds=3))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    k = 1_000_000
    assert pop.num_devices == k and pop.data._train is None  # nothing of the train split was built
    assert pop.devices.rows is None and pop.devices.nbytes() == 8 * (k + 1)
    assert peak < 96 * 2**20  # sizes and offsets (8 MB each) and the test split, not 30M utterances
    a = pop.activity()
    assert a.shape == (k,) and int(a.sum()) == pop.data.num_train and a.min() >= 1
    last = pop.held(k - 1)
    recs = pop.data.train_records(last)
    assert set(recs["device"]) == {k - 1} and len(recs["text"]) == a[k - 1]
    assert list(pop.uids(last)) == recs["uid"]


def test_device_index():
    arrays = [np.array([4, 2]), np.array([], dtype=np.int64), np.array([9])]
    idx = DeviceIndex.from_arrays(arrays)
    assert len(idx) == 3 and [list(x) for x in idx] == [[4, 2], [], [9]]
    assert list(idx.sizes) == [2, 0, 1] and list(idx[-1]) == [9]
    with pytest.raises(IndexError, match="device 3"):
        idx[3]
    with pytest.raises(ValueError):
        idx[0][0] = 1  # read-only views: a device's rows are shared
    ranges = DeviceIndex.ranges(np.array([2, 3]))
    assert [list(x) for x in ranges] == [[0, 1], [2, 3, 4]] and ranges.rows is None
    with pytest.raises(ValueError, match="non-decreasing"):
        DeviceIndex(np.array([0, 3, 2]))
    with pytest.raises(ValueError, match="expected 3"):
        DeviceIndex(np.array([0, 3]), np.arange(2))


def test_the_server_never_builds_a_generated_split(tmp_path, monkeypatch):
    """Server start-up, selection and the ledger need the devices' sizes only."""
    from server.round import commit_events, select
    from server.state import Server

    def refuse(self):
        raise AssertionError("the whole synthetic train split was built")

    monkeypatch.setattr(SyntheticTrain, "materialise", refuse)
    cfg = RunConfig(model="tiny", num_devices=200_000, cohort_size=50, rounds=2, run_dir=str(tmp_path / "run"),
                    run_id="big").validate()
    server = Server(cfg)
    try:
        sel = select(server, 1)
        commit_events(server, sel)
        assert 10 < len(sel.cohort) < 150
    finally:
        server.ledger.close()
        release_run_lock(server.rundir.path)


# --------------------------------------------------------------------------- Flower nodes
def test_supernodes_setting():
    assert RunConfig(num_devices=1_000_000).supernodes() == SIMULATION_NODES
    assert RunConfig(num_devices=5).supernodes() == 5
    assert RunConfig(num_devices=1000, simulation_nodes=100).supernodes() == 100
    assert RunConfig(num_devices=10, simulation_nodes=100).supernodes() == 10
    with pytest.raises(ConfigError, match="simulation-nodes"):
        RunConfig(simulation_nodes=0).validate()
    assert "simulation_nodes" not in RunConfig().device_settings()  # a server setting


# --------------------------------------------------------------------------- budgets at scale
def test_grouped_budget_check_equals_the_check_device_by_device():
    rng = np.random.default_rng(3)
    events = [SubsampledGaussianEvent(1.1, q, 1) for q in (0.02, 0.3, 0.9)]
    devices = np.arange(2000, dtype=np.int64)
    which = rng.integers(0, len(events), len(devices))

    def book():
        b = PrivacyBook(1e-5, "pld", max_epsilon=2.0)
        for d in range(0, 2000, 7):  # some devices carry a history
            b.history["example"][d] = [events[int(rng2.integers(0, 3))] for _ in range(int(rng2.integers(1, 4)))]
        b.exhausted[14] = ("example", 9.0)
        return b

    rng2 = np.random.default_rng(5)
    grouped = book()
    rng2 = np.random.default_rng(5)
    single = book()
    hits = grouped.over_budget_grouped("example", devices, events, which)
    # brute force: each device's projected history composed on its own
    histories = {int(d): [*single.history["example"].get(int(d), []), events[int(j)]]
                 for d, j in zip(devices, which) if int(d) not in single.exhausted}
    eps = compute_epsilons(histories, 1e-5, "pld")
    expected = sorted((d, "example", e) for d, e in eps.items() if e > 2.0)
    assert sorted(hits) == expected and 0 < len(hits) < len(devices)
    assert set(grouped.exhausted) == {14} | {d for d, _, _ in expected}
    assert sorted(single.over_budget("example", {int(d): events[int(j)] for d, j in zip(devices, which)})) == expected


def test_distinct_pairs_key_devices_by_activity_and_q():
    from server.state import _distinct_pairs

    a = np.array([5, 3, 5, 9, 3])
    q = np.array([0.5, 0.3, 0.5, 0.9, 0.3])
    pairs, which = _distinct_pairs(a, q)
    assert pairs == [(3, 0.3), (5, 0.5), (9, 0.9)] and list(which) == [1, 0, 1, 2, 0]
    q2 = q.copy()
    q2[2] = 0.0  # one activity with two q's (e.g. a device removed): grouped by both
    pairs, which = _distinct_pairs(a, q2)
    assert [pairs[j] for j in which] == [(int(x), float(y)) for x, y in zip(a, q2)]


@pytest.mark.usefixtures("task_identity")
def test_accounting_of_a_large_population_equals_dp_accounting(tmp_path):
    """Every sampled device of a 20,000-device run holds the epsilon dp-accounting's PLD gives for the
    Poisson-subsampled Gaussian events of the rounds it joined (noise on the aggregate)."""
    from inprocess import run_rounds

    from rundir import LedgerReader

    cfg = RunConfig(model="tiny", num_devices=20_000, cohort_size=8, rounds=2, run_dir=str(tmp_path / "run"),
                    run_id="acc", noise_multiplier=1.0, sample_rate=0.25, round_timeout=60.0).validate()
    server, _, _, outs = run_rounds(cfg, nodes=4)
    release_run_lock(server.rundir.path)
    assert sum(o.cohort_size for o in outs) > 0
    with LedgerReader(server.rundir.ledger_path) as led:
        by_device = led.events_by_device("example")
        stored = led.device_epsilons("example")
    assert by_device and set(by_device) == set(stored)
    for d, evs in by_device.items():
        acc = PLDAccountant()
        for e in evs:
            acc.compose(dp_event.PoissonSampledDpEvent(e.sample_rate, dp_event.GaussianDpEvent(e.noise_multiplier)),
                        e.steps)
        assert stored[d] == pytest.approx(acc.get_epsilon(server.delta), rel=1e-6), d


# --------------------------------------------------------------------------- feature cache
def test_feature_cache_holds_at_most_its_bytes():
    from nlu.features import FeatureCache, cache_frozen_encoder
    from nlu.model import build_model, encoder_of, set_trainable

    model = set_trainable(build_model("tiny", num_labels=3, seed=0), "head")
    assert cache_frozen_encoder(model)
    enc = encoder_of(model)
    cache: FeatureCache = enc._feature_cache
    cache.max_bytes = 40 * FeatureCache.ENTRY_OVERHEAD  # room for a few dozen short utterances
    g = torch.Generator().manual_seed(0)
    ref = FeatureCache(enc, max_entries=10**6, max_bytes=10**12)
    for step in range(20):
        ids = torch.randint(1000, 2000, (8, 6), generator=g)
        mask = torch.ones_like(ids)
        out = cache.forward(input_ids=ids, attention_mask=mask)
        assert cache.bytes <= max(cache.max_bytes, sum(cache._size(e) for e in cache.entries.values()))
        assert cache.bytes == sum(cache._size(e) for e in cache.entries.values())
        torch.testing.assert_close(out.last_hidden_state, ref.forward(input_ids=ids, attention_mask=mask).last_hidden_state)
    assert cache.bytes <= cache.max_bytes and 8 <= len(cache.entries) < len(ref.entries)
    assert math.isclose(cache.bytes / len(cache.entries), cache._size(next(iter(cache.entries.values()))), rel_tol=0.01)
