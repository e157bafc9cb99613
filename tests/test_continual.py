"""The continual setting (arrival rounds, storage cap) and the ``dpfl partitions`` command."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pytest

from partitions.continual import Stream, activity_at, deleted_at, held_at, make_stream


def _devices(sizes, seed=0):
    """Devices over rows 0..N-1 with the given sizes, rows shuffled over devices (sorted within)."""
    rng = np.random.default_rng(seed)
    rows = rng.permutation(int(sum(sizes)))
    out, s = [], 0
    for n in sizes:
        out.append(np.sort(rows[s:s + n]).astype(np.int64))
        s += n
    return out


@pytest.fixture(scope="module")
def heavy():
    rng = np.random.default_rng(1)
    sizes = np.maximum(0, rng.lognormal(2.5, 1.2, 300).astype(int))
    return _devices(sizes)


def test_every_example_arrives_once_in_range(heavy):
    s = make_stream(heavy, 20, seed=0, storage_cap=None)
    assert len(s.arrival) == len(heavy)
    for rows, arr in zip(heavy, s.arrival):
        assert len(arr) == len(rows)
        assert arr.dtype == np.int64
        if len(rows):
            assert arr.min() == 1 and arr.max() <= 20  # some at round 1, all by round R
    # without a cap, everything is held at the last round: the static partition
    for k in range(len(heavy)):
        assert np.array_equal(np.sort(held_at(s, heavy, k, 20)), heavy[k])
    assert np.array_equal(activity_at(s, heavy, 20), [len(d) for d in heavy])
    assert np.all(activity_at(s, heavy, 0) == 0)


def test_round_one_has_data_and_activity_changes(heavy):
    s = make_stream(heavy, 20, seed=0, storage_cap=None, initial_fraction=0.2)
    sizes = np.array([len(d) for d in heavy])
    a1 = activity_at(s, heavy, 1)
    assert np.all(a1[sizes > 0] >= 1)
    assert np.array_equal(a1, np.where(sizes > 0, np.maximum(1, np.ceil(0.2 * sizes)), 0))
    acts = np.stack([activity_at(s, heavy, t) for t in range(1, 21)])
    assert np.all(np.diff(acts, axis=0) >= 0)  # no cap: activity only grows
    changed = (np.diff(acts, axis=0) != 0).sum(axis=1)
    assert np.all(changed > 0)  # activity changes round to round
    # heavy users produce more per round: arrivals per round grow with the device's size
    per_round = (acts[-1] - acts[0]) / 19
    big, small = sizes >= np.quantile(sizes, 0.9), (sizes > 0) & (sizes <= np.quantile(sizes, 0.5))
    assert per_round[big].mean() > 5 * per_round[small].mean()
    corr = np.corrcoef(per_round[sizes > 0], sizes[sizes > 0])[0, 1]
    assert corr > 0.95


def test_storage_cap_never_exceeded_and_oldest_deleted_first(heavy):
    cap = 7
    s = make_stream(heavy, 15, seed=2, storage_cap=cap)
    for k in range(0, len(heavy), 7):
        rows, arr = heavy[k], s.arrival[k]
        arrival_of = dict(zip(rows.tolist(), arr.tolist()))
        prev = set()
        for t in range(0, 16):
            h = held_at(s, heavy, k, t)
            assert len(h) <= cap
            arrived = rows[arr <= t]
            assert len(h) == min(cap, len(arrived))
            # sorted by arrival (ties by row), and the held ones are the newest arrivals
            key = [(arrival_of[r], r) for r in h.tolist()]
            assert key == sorted(key)
            dropped = sorted((arrival_of[r], r) for r in set(arrived.tolist()) - set(h.tolist()))
            if dropped and key:
                assert max(dropped) < min(key)  # every deleted example is older than every held one
            # a deleted example never comes back
            assert not (set(h.tolist()) & (prev - set(h.tolist())))
            gone = prev - set(h.tolist())
            assert all(r not in set(held_at(s, heavy, k, u).tolist()) for r in gone for u in range(t, 16))
            prev = set(h.tolist())
        acts = [activity_at(s, heavy, t)[k] for t in range(16)]
        assert acts == [len(held_at(s, heavy, k, t)) for t in range(16)]


def test_deleted_at_matches_held_at(heavy):
    s = make_stream(heavy, 10, seed=5, storage_cap=4)
    for k in range(0, len(heavy), 11):
        rows, dele = deleted_at(s, heavy, k)
        for r, d in zip(rows.tolist(), dele.tolist()):
            held = [r in set(held_at(s, heavy, k, t).tolist()) for t in range(1, 11)]
            if d == 0:
                assert held[-1]
            else:
                assert not held[d - 1] and (d == 1 or held[d - 2] or not any(held))


def test_same_seed_same_stream(heavy):
    a = make_stream(heavy, 12, seed=9, storage_cap=5)
    b = make_stream(heavy, 12, seed=9, storage_cap=5)
    c = make_stream(heavy, 12, seed=10, storage_cap=5)
    assert all(np.array_equal(x, y) for x, y in zip(a.arrival, b.arrival))
    assert not all(np.array_equal(x, y) for x, y in zip(a.arrival, c.arrival))
    assert a == b


def test_one_round_is_static_and_errors(heavy):
    s = make_stream(heavy, 1, seed=0, storage_cap=None)
    assert all(np.all(a == 1) for a in s.arrival)
    with pytest.raises(ValueError, match="rounds"):
        make_stream(heavy, 0, seed=0, storage_cap=None)
    with pytest.raises(ValueError, match="storage_cap"):
        make_stream(heavy, 3, seed=0, storage_cap=0)
    with pytest.raises(ValueError, match="initial_fraction"):
        make_stream(heavy, 3, seed=0, storage_cap=None, initial_fraction=0.0)
    with pytest.raises(ValueError, match="devices"):
        activity_at(s, heavy[:-1], 1)
    assert isinstance(s, Stream)


def test_activity_at_fast_for_10k_devices():
    rng = np.random.default_rng(0)
    devices = _devices(np.maximum(1, rng.lognormal(3.0, 1.0, 10_000).astype(int)))
    t = time.perf_counter()
    s = make_stream(devices, 100, seed=0, storage_cap=50)
    built = time.perf_counter() - t
    t = time.perf_counter()
    acts = [activity_at(s, devices, r) for r in range(1, 101)]
    per_call = (time.perf_counter() - t) / 100
    assert built < 5.0 and per_call < 0.05, (built, per_call)
    assert acts[-1].max() == 50 and acts[0].min() >= 1


# --------------------------------------------------------------------------- dpfl partitions


def _parse(argv):
    from dpfl.commands.partitions import add_parser as add_partitions_parser

    p = argparse.ArgumentParser(prog="dpfl")
    sub = p.add_subparsers(dest="command", required=True)
    add_partitions_parser(sub)
    return p.parse_args(["partitions", *argv])


def _tiny_data(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "data"
    d.mkdir()
    with open(d / "train.jsonl", "w") as fh:
        for i in range(300):
            fh.write(json.dumps({"text": f"utterance number {i}", "label": f"intent_{rng.integers(0, 6)}"}) + "\n")
    (d / "test.jsonl").write_text(json.dumps({"text": "a test", "label": "intent_0"}) + "\n")
    return d


def test_run_partitions_writes_plots_and_prints_stats(tmp_path, capsys):
    from dpfl.commands.partitions import run as run_partitions

    data = _tiny_data(tmp_path)
    out = tmp_path / "out"
    ns = _parse(["--data-dir", str(data), "--num-devices", "25", "--partitioner", "dirichlet",
                 "--dirichlet-alpha", "0.3", "--out", str(out), "--setting", "continual", "--storage-cap", "5",
                 "--rounds", "6", "--cohort-size", "2"])
    assert run_partitions(ns) == 0
    text = capsys.readouterr().out
    assert "examples per device: min" in text and "median" in text and "max" in text
    assert "mean per-device label entropy" in text and "total-variation" in text
    assert "continual setting over 6 rounds" in text
    for name in ("label_distribution.png", "activity_histogram.png", "partition_stats.json"):
        assert (out / name).stat().st_size > 1000 or name.endswith(".json")
    stats = json.loads((out / "partition_stats.json").read_text())
    assert stats["examples"] == 300 and stats["num_devices"] == 25
    assert 0 < stats["label_skew"]["mean_tv"] <= 1
    assert max(stats["continual"]["held_max"]) <= 5
    assert len(stats["largest"]) == 10


def test_run_partitions_default_out_is_run_dir_and_bad_input(tmp_path, capsys):
    from dpfl.commands.partitions import run as run_partitions

    data = _tiny_data(tmp_path)
    run_dir = tmp_path / "run"
    assert run_partitions(_parse(["--data-dir", str(data), "--num-devices", "10", "--partitioner", "iid",
                                  "--run-dir", str(run_dir)])) == 0
    assert (run_dir / "partitions" / "label_distribution.png").is_file()
    stats = json.loads((run_dir / "partitions" / "partition_stats.json").read_text())
    assert stats["label_skew"]["mean_tv"] < 0.5 and "continual" not in stats
    assert run_partitions(_parse(["--data-dir", str(data), "--num-devices", "10", "--partitioner", "natural",
                                  "--out", str(tmp_path / "x")])) == 2
    assert "dpfl: error:" in capsys.readouterr().err


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_continual_selection_keeps_the_expected_cohort_on_average(heavy, alpha):
    """c calibrated on every round's activities: mean_t sum_k q_k(t) is the requested cohort size
    (calibrating on round 1 alone, when devices hold little, would select far more later on)."""
    from server.selection import ActivitySelector, calibrate_constant

    rounds, cohort = 20, 12
    s = make_stream(heavy, rounds, seed=0, storage_cap=50)
    planned = np.stack([activity_at(s, heavy, t) for t in range(1, rounds + 1)])
    sel = ActivitySelector(planned, alpha, cohort)
    per_round = [sel.probabilities(planned[t]).sum() for t in range(rounds)]
    assert np.mean(per_round) == pytest.approx(cohort, rel=1e-6)
    if alpha > 0:
        first_only = ActivitySelector(planned[0], alpha, cohort)
        assert np.mean([first_only.probabilities(a).sum() for a in planned]) > 1.5 * cohort
    with pytest.raises(ValueError, match="on average over the rounds"):
        calibrate_constant(planned, alpha, planned.shape[1])
