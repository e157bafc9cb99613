"""Out-of-scope detection (commit f64e58b): the confidence score, histogram, threshold, AUROC and
metrics of nlu/oos.py checked against brute-force definitions; the held-out-intent split; the
settings' checks; the holdout reply's validation; and an in-process run (tiny model, toy data)
whose holdout release carries the noised confidence histogram that chooses the threshold."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from inprocess import run_rounds, toy_config
from nlu.oos import (
    auroc, confidence_edges, confidences, histogram, oos_metrics, rejected, threshold_from_histogram,
)
from partitions.errors import DataError
from partitions.loading import load_data
from partitions.out_of_scope import DEFAULT_OOS_NAME, held_out_intents, split_out_of_scope
from settings.config import ConfigError, RunConfig

pytestmark = pytest.mark.usefixtures("task_identity")

# six intents with words of their own (the tiny model's MiniLM vocabulary knows them)
INTENT_WORDS = {
    "alarm": ["wake", "morning", "alarm", "clock"],
    "balance": ["bank", "money", "account", "balance"],
    "cook": ["recipe", "pasta", "oven", "dinner"],
    "drive": ["route", "traffic", "car", "highway"],
    "email": ["inbox", "message", "mail", "send"],
    "flight": ["airport", "plane", "ticket", "flight"],
}
TRAIN_PER_INTENT, TEST_PER_INTENT = 12, 3


def _utterance(name: str, i: int, split: str) -> str:
    w = INTENT_WORDS.get(name, ["random", "nothing", "weather", "joke"])
    return f"{split} please {w[i % 4]} {w[(i + 1) % 4]} {w[(i + 2) % 4]} number {i}"


def write_intents(d: Path, names=tuple(INTENT_WORDS), train_per=TRAIN_PER_INTENT, test_per=TEST_PER_INTENT,
                  declared: bool = True) -> Path:
    """JSONL train/test files: ``train_per`` / ``test_per`` distinct utterances per intent, and (``declared``)
    ``labels.json``, the public label schema (sorted names)."""
    d.mkdir(parents=True, exist_ok=True)
    if declared:
        (d / "labels.json").write_text(json.dumps(sorted(names)))
    for split, per in (("train", train_per), ("test", test_per)):
        with open(d / f"{split}.jsonl", "w") as fh:
            for i in range(per):  # interleaved, so that the original order is not sorted by label
                for name in names:
                    fh.write(json.dumps({"text": _utterance(name, i, split), "label": name}) + "\n")
    return d


def _rows(d: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in open(d / f"{split}.jsonl")]


# ---------------------------------------------------------------------------------------------
# nlu/oos.py


def test_confidence_edges_are_a_uniform_grid():
    e = confidence_edges(50)
    assert len(e) == 51 and e[0] == 0.0 and e[-1] == 1.0
    assert np.allclose(np.diff(e), 0.02)
    with pytest.raises(ValueError):
        confidence_edges(0)


def test_histogram_counts_each_value_once():
    rng = np.random.default_rng(3)
    edges = confidence_edges(50)
    conf = np.concatenate([rng.uniform(0, 1, 997), [0.0, 1.0, 0.0, 1.0], edges])  # the edges themselves too
    h = histogram(conf, edges)
    assert h.shape == (50,) and h.dtype == np.float64
    assert h.sum() == len(conf)
    assert np.array_equal(h, np.histogram(conf, bins=edges)[0].astype(np.float64))  # [e_j, e_j+1), last closed
    assert np.array_equal(histogram([0.0], edges), np.eye(50)[0])
    assert np.array_equal(histogram([1.0], edges), np.eye(50)[-1])
    # each interior edge starts its own bin
    assert np.array_equal(histogram(edges[:-1], edges), np.ones(50))
    # values just outside [0, 1] (rounding) are clipped into the end bins, never dropped
    assert np.array_equal(histogram([-1e-12, 1 + 1e-12], edges), np.eye(50)[0] + np.eye(50)[-1])
    assert histogram([], edges).sum() == 0 and len(histogram([], edges)) == 50


def _quantile_edge(conf, q, edges):
    """Brute force: the largest edge (of the first B) below which at most a fraction q of conf lies."""
    conf = np.asarray(conf)
    best = edges[0]
    for e in edges[:-1]:
        if (conf < e).sum() <= q * len(conf):
            best = e
    return float(best)


def test_threshold_from_a_hand_built_histogram():
    edges = confidence_edges(4)  # 0, .25, .5, .75, 1
    counts = [1.0, 2.0, 3.0, 2.0]  # 8 examples; below the edges: 0, 1, 3, 6
    # q * total equal to a count below an edge: that edge still qualifies ("at most")
    assert threshold_from_histogram(counts, 8, 0.125, edges) == 0.25
    assert threshold_from_histogram(counts, 8, 0.375, edges) == 0.5
    assert threshold_from_histogram(counts, 8, 0.75, edges) == 0.75
    # just below those boundaries: the edge before
    assert threshold_from_histogram(counts, 8, 0.124, edges) == 0.0
    assert threshold_from_histogram(counts, 8, 0.374, edges) == 0.25
    assert threshold_from_histogram(counts, 8, 0.749, edges) == 0.5
    # never above the last bin's lower edge
    assert threshold_from_histogram(counts, 8, 0.999, edges) == 0.75
    # the returned tau rejects (conf < tau) at most q of the values the histogram counts
    conf = np.array([0.1, 0.3, 0.4, 0.55, 0.6, 0.7, 0.8, 0.9])
    assert np.array_equal(histogram(conf, edges), counts)
    for q in (0.05, 0.125, 0.2, 0.375, 0.5, 0.75, 0.95):
        tau = threshold_from_histogram(counts, 8, q, edges)
        assert tau == _quantile_edge(conf, q, edges)
        assert rejected(np.zeros(8), conf, tau).sum() <= q * 8


def test_threshold_is_the_quantile_of_random_confidences():
    rng = np.random.default_rng(0)
    edges = confidence_edges(50)
    for _ in range(50):
        n = int(rng.integers(1, 400))
        conf = rng.beta(5, 1, n)
        q = float(rng.uniform(0.01, 0.99))
        tau = threshold_from_histogram(histogram(conf, edges), n, q, edges)
        assert tau == _quantile_edge(conf, q, edges)
        assert (conf < tau).mean() <= q
        j = int(np.searchsorted(edges, tau))
        if j < 49:  # the next edge would reject more than q
            assert (conf < edges[j + 1]).mean() > q


def _prefix_rule(counts, total, q, edges):
    """Brute force of the documented rule: the largest edge e_j such that every cumulative count
    below e_0..e_j is at most q * total (the running maximum of the noisy cumulative counts)."""
    best, s = edges[0], 0.0
    for j in range(len(edges) - 1):
        if s > q * total:
            break
        best = edges[j]
        s += counts[j]
    return float(best)


def test_negative_noisy_counts_never_lower_the_threshold():
    edges = confidence_edges(5)  # 0, .2, .4, .6, .8, 1
    # the cumulative count passes q * total = 2 below edge .4, then a negative count brings it back
    # under: tau stays below the first crossing, it does not jump back up
    counts = [0.0, 3.0, -3.0, 0.0, 4.0]
    assert threshold_from_histogram(counts, 4, 0.5, edges) == 0.2
    rng = np.random.default_rng(1)
    edges = confidence_edges(50)
    for _ in range(200):
        counts = rng.normal(0, 2.0, 50) + rng.integers(0, 3, 50)
        total = max(float(np.sum(counts)), 0.0)
        q = float(rng.uniform(0.01, 0.99))
        tau = threshold_from_histogram(counts, total, q, edges)
        assert tau == _prefix_rule(counts, total, q, edges)
        # lowering any one count (more negative noise) never lowers tau
        lower = counts.copy()
        lower[int(rng.integers(0, 50))] -= float(rng.uniform(0.1, 5.0))
        assert threshold_from_histogram(lower, total, q, edges) >= tau
        # a larger quantile never lowers tau
        assert threshold_from_histogram(counts, total, min(q + 0.05, 0.999), edges) >= tau


@pytest.mark.parametrize("q", [0.0, 1.0, -0.1, 1.5])
def test_threshold_rejects_a_quantile_outside_the_unit_interval(q):
    with pytest.raises(ValueError, match="quantile"):
        threshold_from_histogram(np.ones(50), 50, q, confidence_edges(50))


def test_threshold_rejects_counts_of_the_wrong_shape():
    with pytest.raises(ValueError):
        threshold_from_histogram(np.ones(49), 49, 0.1, confidence_edges(50))
    with pytest.raises(ValueError):
        threshold_from_histogram(np.ones(51), 51, 0.1, confidence_edges(50))


def _auroc_pairs(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    s = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in a for y in b)
    return s / (len(a) * len(b))


def test_auroc_is_the_pairwise_count_with_ties_half():
    rng = np.random.default_rng(2)
    for _ in range(30):
        a = rng.integers(0, 6, int(rng.integers(1, 40))) / 5.0  # many ties within and across the sets
        b = rng.integers(0, 6, int(rng.integers(1, 40))) / 5.0
        assert auroc(a, b) == pytest.approx(_auroc_pairs(a, b), abs=1e-12)
    assert auroc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert auroc([0.1, 0.2], [0.9, 0.8]) == 0.0
    assert auroc([0.5, 0.5], [0.5]) == 0.5
    assert auroc([], [0.3]) is None and auroc([0.3], []) is None and auroc([], []) is None


def _metrics_loop(labels, top_in, conf_in, top_out, conf_out, tau, oos_index=None, closed_in=None):
    closed = top_in if closed_in is None else closed_in

    def rej(top, conf):
        return conf < tau or (oos_index is not None and top == oos_index)

    rin = [rej(t, c) for t, c in zip(top_in, conf_in)]
    rout = [rej(t, c) for t, c in zip(top_out, conf_out)]
    good = [not r and t == y for r, t, y in zip(rin, top_in, labels)]
    n_in, n_out, n_rej = len(labels), len(top_out), sum(rin) + sum(rout)
    return {
        "in_scope_accuracy": sum(good) / n_in if n_in else None,
        "closed_set_accuracy": sum(int(c == y) for c, y in zip(closed, labels)) / n_in if n_in else None,
        "oos_recall": sum(rout) / n_out if n_out else None,
        "oos_precision": sum(rout) / n_rej if n_rej else None,
        "overall_accuracy": (sum(good) + sum(rout)) / (n_in + n_out) if n_in + n_out else None,
        "in_scope_rejected": sum(rin) / n_in if n_in else None,
        "auroc": _auroc_pairs(conf_in, conf_out) if n_in and n_out else None,
        "in_scope": n_in, "out_of_scope": n_out,
    }


def _assert_same_metrics(got, want):
    assert set(got) == set(want)
    for k, v in want.items():
        if v is None:
            assert got[k] is None, k
        else:
            assert got[k] == pytest.approx(v, abs=1e-12), k


@pytest.mark.parametrize("oos_index", [None, 2])
def test_oos_metrics_match_a_brute_force_loop(oos_index):
    rng = np.random.default_rng(5)
    k = 5
    for _ in range(40):
        n_in, n_out = int(rng.integers(1, 30)), int(rng.integers(1, 30))
        in_scope = [c for c in range(k) if c != oos_index]
        labels = rng.choice(in_scope, n_in)
        top_in = np.where(rng.uniform(size=n_in) < 0.6, labels, rng.integers(0, k, n_in))
        top_out = rng.integers(0, k, n_out)
        conf_in = rng.integers(0, 11, n_in) / 10.0  # ties with the threshold too
        conf_out = rng.integers(0, 11, n_out) / 10.0
        closed_in = np.where(top_in == oos_index, rng.choice(in_scope, n_in), top_in) if oos_index is not None else None
        tau = float(rng.integers(0, 11) / 10.0)
        got = oos_metrics(labels, top_in, conf_in, top_out, conf_out, tau, oos_index, closed_in)
        _assert_same_metrics(got, _metrics_loop(labels, top_in, conf_in, top_out, conf_out, tau, oos_index, closed_in))
    if oos_index is not None:
        # oos-train: a confident top-class oos prediction is rejected; closed-set accuracy reads closed_in
        got = oos_metrics([0, 1], [oos_index, 1], [0.9, 0.9], [oos_index, 0], [0.99, 0.99], 0.5, oos_index,
                          closed_in=[0, 1])
        assert got["in_scope_rejected"] == 0.5 and got["in_scope_accuracy"] == 0.5
        assert got["closed_set_accuracy"] == 1.0
        assert got["oos_recall"] == 0.5 and got["oos_precision"] == 0.5
        assert got["overall_accuracy"] == pytest.approx(2 / 4)


def test_oos_metrics_edge_cases():
    # nothing rejected: precision undefined
    got = oos_metrics([0, 1], [0, 1], [0.9, 0.8], [1], [0.7], 0.0)
    assert got["oos_precision"] is None and got["oos_recall"] == 0.0 and got["in_scope_accuracy"] == 1.0
    # no out-of-scope utterances
    got = oos_metrics([0, 1], [0, 0], [0.9, 0.1], [], [], 0.5)
    assert got["oos_recall"] is None and got["auroc"] is None and got["out_of_scope"] == 0
    assert got["in_scope_accuracy"] == 0.5 and got["oos_precision"] == 0.0
    # no in-scope utterances
    got = oos_metrics([], [], [], [0], [0.2], 0.5)
    assert got["in_scope_accuracy"] is None and got["closed_set_accuracy"] is None and got["oos_recall"] == 1.0
    assert got["overall_accuracy"] == 1.0


def test_confidences_leave_out_the_oos_column():
    rng = np.random.default_rng(7)
    probs = rng.dirichlet(np.ones(6) * 0.5, 200)
    probs[:50, 3] += 5.0  # the oos class on top for a quarter of the rows
    probs /= probs.sum(axis=1, keepdims=True)
    top, top_in, conf = confidences(probs)
    assert np.array_equal(top, probs.argmax(1)) and np.array_equal(top_in, top)
    assert np.array_equal(conf, probs.max(1))
    top, top_in, conf = confidences(probs, oos_index=3)
    assert top.dtype == np.int64 and top_in.dtype == np.int64
    assert np.array_equal(top, probs.argmax(1)) and (top[:50] == 3).all()
    others = np.delete(probs, 3, axis=1)
    assert (top_in != 3).all()
    assert np.array_equal(top_in, np.array([0, 1, 2, 4, 5])[others.argmax(1)])
    assert np.array_equal(conf, others.max(1))
    assert (conf[:50] < probs[:50, 3]).all()
    # a row the model gives to the oos class is rejected at any threshold
    assert rejected(top, conf, 0.0, oos_index=3)[:50].all() and not rejected(top, conf, 0.0)[:50].any()


# ---------------------------------------------------------------------------------------------
# partitions/out_of_scope.py


def test_held_out_intents_are_seeded_sized_and_exclude_the_oos_class():
    a = held_out_intents(20, 0.3, 4)
    assert a == held_out_intents(20, 0.3, 4)  # fixed for a seed
    assert a == sorted(set(a)) and all(0 <= i < 20 for i in a) and len(a) == round(0.3 * 20)
    assert any(held_out_intents(20, 0.3, s) != a for s in range(5, 15))  # the seed matters
    for n, f in [(10, 0.3), (77, 0.25), (6, 0.34), (150, 0.27), (5, 0.62)]:
        assert len(held_out_intents(n, f, 0)) == round(f * n)
    for s in range(20):
        held = held_out_intents(8, 0.4, s, exclude=5)
        assert 5 not in held and len(held) == round(0.4 * 7)
    # every intent other than the excluded one is held out for some seed (uniform choice)
    seen = set().union(*(held_out_intents(8, 0.4, s, exclude=5) for s in range(200)))
    assert seen == set(range(8)) - {5}


@pytest.mark.parametrize("n,f,exclude", [(10, 0.01, None), (10, 0.99, None), (2, 0.2, None), (2, 0.8, None),
                                         (3, 0.9, 0), (2, 0.6, 1)])
def test_held_out_intents_refuse_to_hold_out_none_or_all(n, f, exclude):
    with pytest.raises(DataError, match="--oos-holdout-intents"):
        held_out_intents(n, f, 0, exclude=exclude)


@pytest.fixture(scope="module")
def intents_dir(tmp_path_factory):
    return write_intents(tmp_path_factory.mktemp("oosdata") / "six")


def test_split_removes_held_out_intents_and_renumbers(intents_dir):
    data = load_data(data_dir=intents_dir)
    names = list(data.label_names)
    assert names == sorted(INTENT_WORDS)
    name_of = {r["text"]: r["label"] for split in ("train", "test") for r in _rows(intents_dir, split)}
    for seed in (0, 1, 2):
        held = [names[i] for i in held_out_intents(len(names), 0.34, seed)]
        out = split_out_of_scope(data, None, 0.34, seed)
        assert list(out.oos_intents) == held and len(held) == 2
        kept = [n for n in names if n not in held]
        assert list(out.label_names) == kept  # original order, 0..K'-1
        assert out.oos_index is None and out.oos_label == DEFAULT_OOS_NAME
        tr_text, tr_label = list(out.train["text"]), list(out.train["label"])
        assert sorted(set(tr_label)) == list(range(len(kept)))
        assert all(name_of[t] not in held for t in tr_text)
        assert all(kept[y] == name_of[t] for t, y in zip(tr_text, tr_label))
        assert len(tr_text) == TRAIN_PER_INTENT * len(kept)
        te_text, te_label = list(out.test["text"]), list(out.test["label"])
        assert all(kept[y] == name_of[t] for t, y in zip(te_text, te_label))
        assert len(te_text) == TEST_PER_INTENT * len(kept)
        oos_text = list(out.test_oos["text"])
        want_oos = [r["text"] for r in _rows(intents_dir, "test") if r["label"] in held]
        assert sorted(oos_text) == sorted(want_oos)
        assert set(out.test_oos["label"]) == {-1}
        assert not set(oos_text) & set(te_text)
        # the stable example ids survive the split
        uid_of = dict(zip(data.train["text"], data.train["uid"]))
        assert all(uid_of[t] == u for t, u in zip(out.train["text"], out.train["uid"]))
    first = split_out_of_scope(data, None, 0.34, 0).oos_intents
    assert any(split_out_of_scope(data, None, 0.34, s).oos_intents != first for s in range(1, 10))


@pytest.fixture(scope="module")
def oos_train_dir(tmp_path_factory):
    return write_intents(tmp_path_factory.mktemp("oosdata") / "seven", names=tuple(INTENT_WORDS) + ("oos",))


def test_held_out_intents_need_a_declared_label_schema(tmp_path):
    """Without labels.json the names are read off the training data: the choice would depend on it."""
    data = load_data(data_dir=write_intents(tmp_path / "undeclared", declared=False))
    with pytest.raises(DataError, match="labels.json"):
        split_out_of_scope(data, None, 0.34, 0)


def test_a_declared_oos_label_stays_a_class_and_its_test_utterances_go_apart(oos_train_dir):
    data = load_data(data_dir=oos_train_dir)
    names = list(data.label_names)
    assert "oos" in names
    out = split_out_of_scope(data, "oos", 0.0, 0)
    assert list(out.label_names) == names and out.oos_index == names.index("oos")
    assert out.oos_intents == () and out.oos_label == "oos"
    assert names.index("oos") in set(out.train["label"])  # oos-train: the model learns the class
    assert len(out.train) == len(data.train)
    test_rows = _rows(oos_train_dir, "test")
    assert sorted(out.test_oos["text"]) == sorted(r["text"] for r in test_rows if r["label"] == "oos")
    assert set(out.test_oos["label"]) == {-1}
    assert out.oos_index not in set(out.test["label"])
    assert len(out.test) == sum(r["label"] != "oos" for r in test_rows)
    # with held-out intents as well: the oos class is never held out and keeps its (renumbered) index
    for seed in range(6):
        both = split_out_of_scope(data, "oos", 0.34, seed)
        assert "oos" not in both.oos_intents and len(both.oos_intents) == round(0.34 * 6)
        assert both.label_names[both.oos_index] == "oos"
        gone = set(both.oos_intents) | {"oos"}
        assert sorted(both.test_oos["text"]) == sorted(r["text"] for r in test_rows if r["label"] in gone)
        assert all(both.label_names[y] not in gone for y in both.test["label"])


def test_an_unknown_oos_label_without_holdout_is_an_error(intents_dir):
    data = load_data(data_dir=intents_dir)
    with pytest.raises(DataError, match="'nosuchlabel'"):
        split_out_of_scope(data, "nosuchlabel", 0.0, 0)
    # with held-out intents, the name only names them
    out = split_out_of_scope(data, "nosuchlabel", 0.34, 0)
    assert out.oos_label == "nosuchlabel" and out.oos_index is None and len(out.oos_intents) == 2


# ---------------------------------------------------------------------------------------------
# settings


def test_oos_settings_are_checked(tmp_path, intents_dir):
    d = str(intents_dir)
    ok = dict(run_dir=str(tmp_path / "r"), model="tiny", num_devices=4, cohort_size=3)
    # valid combinations (so that the errors below come from the checks under test)
    RunConfig(**ok, data_dir=d, oos_holdout_intents=0.34, holdout_per_device=0.3).validate()
    RunConfig(**ok, data_dir=d, oos_label="alarm", oos_threshold=0.5).validate()
    assert not RunConfig(**ok).validate().out_of_scope
    assert RunConfig(**ok, oos_label="x", oos_threshold=0.5).validate().out_of_scope
    with pytest.raises(ConfigError, match="--oos-threshold.*--oos-label"):
        RunConfig(**ok, data_dir=d, oos_threshold=0.5).validate()
    with pytest.raises(ConfigError, match="--holdout-per-device"):
        RunConfig(**ok, data_dir=d, oos_label="alarm").validate()
    with pytest.raises(ConfigError, match="--holdout-per-device"):
        RunConfig(**ok, data_dir=d, oos_holdout_intents=0.34).validate()
    with pytest.raises(ConfigError, match="--task intent"):
        RunConfig(**ok, data_dir=d, task="slots", oos_label="alarm", oos_threshold=0.5).validate()
    with pytest.raises(ConfigError, match="--oos-holdout-intents.*--data-dir"):
        RunConfig(**ok, oos_holdout_intents=0.3, holdout_per_device=0.3).validate()
    for q in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ConfigError, match="--oos-quantile"):
            RunConfig(**ok, data_dir=d, oos_holdout_intents=0.34, holdout_per_device=0.3, oos_quantile=q).validate()
    for f in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="--oos-holdout-intents"):
            RunConfig(**ok, data_dir=d, oos_holdout_intents=f, holdout_per_device=0.3).validate()
    for t in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="--oos-threshold"):
            RunConfig(**ok, data_dir=d, oos_label="alarm", oos_threshold=t).validate()


# ---------------------------------------------------------------------------------------------
# protocol: the holdout reply


def test_holdout_reply_validation_with_a_histogram():
    from flwr.app import MetricRecord, RecordDict

    from protocol.messages import validate_holdout_reply

    def reply(**entries):
        return RecordDict({"holdout": MetricRecord(entries)})

    hist = [float(i % 3) for i in range(50)]
    value, h, why = validate_holdout_reply(reply(**{"correct": 3.0, "oos-histogram": hist}), 50)
    assert why is None and value == 3.0 and isinstance(h, np.ndarray) and np.array_equal(h, hist)
    value, h, why = validate_holdout_reply(reply(correct=2.0), 0)
    assert (value, h, why) == (2.0, None, None)
    bad = [
        (reply(**{"correct": 3.0, "oos-histogram": hist[:49]}), 50),  # wrong length
        (reply(**{"correct": 3.0, "oos-histogram": hist + [1.0]}), 50),
        (reply(correct=3.0), 50),  # missing
        (reply(**{"correct": 3.0, "oos-histogram": hist, "extra": 1.0}), 50),  # an extra entry
        (reply(**{"correct": 3.0, "oos-histogram": hist}), 0),  # a histogram nobody asked for
        (reply(**{"correct": 3.0, "oos-histogram": hist[:49] + [float("nan")]}), 50),
        (reply(**{"correct": float("inf"), "oos-histogram": hist}), 50),
        (RecordDict({"holdout": MetricRecord({"correct": 3.0, "oos-histogram": hist}),
                     "other": MetricRecord({"x": 1.0})}), 50),  # an extra record
    ]
    for content, bins in bad:
        value, h, why = validate_holdout_reply(content, bins)
        assert value is None and h is None and isinstance(why, str) and why


# ---------------------------------------------------------------------------------------------
# end to end, in process


@pytest.fixture(scope="module")
def e2e_dir(tmp_path_factory):
    return write_intents(tmp_path_factory.mktemp("oose2e") / "data")


def _probs_one_by_one(model, enc) -> np.ndarray:
    """Softmax of ``model`` on each example alone (no padding), eval mode, float64."""
    import torch

    from nlu.data import collate, logits_of

    was = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(len(enc)):
            out.append(torch.softmax(logits_of(model, collate(enc, [i])).double(), dim=-1)[0].numpy())
    model.train(was)
    return np.array(out).reshape(len(enc), -1)


def _released_model(server, run_dir):
    """A copy of the run's model holding the final checkpoint (the released model)."""
    import copy

    from rundir.layout import load_global_model

    model = copy.deepcopy(server.model)
    load_global_model(run_dir, model)
    return model


def _max_diff(a, b) -> float:
    from protocol.arrays import trainable_state

    sa, sb = trainable_state(a), trainable_state(b)
    assert sa.keys() == sb.keys()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


SIGMA = 2.0


@pytest.mark.parametrize("noise_at", ["aggregate", "device"])
def test_holdout_histogram_chooses_the_threshold(tmp_path, e2e_dir, noise_at):
    from client.app import holdout_examples
    from nlu.model import load_tokenizer
    from rundir import LedgerReader, read_holdout, read_oos
    from server.holdout import holdout_epsilon

    cfg = toy_config(tmp_path / "run", e2e_dir, noise_multiplier=1.0, rounds=2, num_devices=4, cohort_size=3,
                     holdout_per_device=0.3, oos_holdout_intents=0.34, noise_at=noise_at,
                     holdout_noise_multiplier=SIGMA)
    assert cfg.server_ema > 0  # (the default) the released model is the moving average, not the iterate
    server, grid, arrays, _ = run_rounds(cfg)
    pop, data = server.pop, server.pop.data
    names = sorted(INTENT_WORDS)
    held = [names[i] for i in held_out_intents(6, 0.34, cfg.oos_split_seed)]
    assert list(data.oos_intents) == held
    sizes = {d: len(pop.holdout_rows(d)) for d in range(4)}
    assert sum(sizes.values()) > 0
    # the evaluation messages ask for the 50-bin histogram
    evals = [m for m in grid.sent if m.metadata.message_type == "evaluate"]
    assert len(evals) == sum(1 for n in sizes.values() if n)
    assert all(int(m.content["config"]["oos-bins"]) == 50 for m in evals)
    replies = [(d, c) for d, c in grid.outgoing if "holdout" in c.metric_records]
    assert len(replies) == len(evals)
    for _, c in replies:
        assert set(c.keys()) == {"holdout"}
        assert set(c.metric_records["holdout"].keys()) == {"correct", "oos-histogram"}
        assert len(c.metric_records["holdout"]["oos-histogram"]) == 50
    # the released model: the final checkpoint; the holdout evaluation sent it, the out-of-scope
    # evaluation scored it (server.model), not the iterate the next round would train from
    from protocol.arrays import trainable_state

    model = _released_model(server, tmp_path / "run")
    released = trainable_state(model)
    for m in evals:
        sent = m.content["arrays"].to_torch_state_dict()
        assert max(float((sent[k].float() - released[k].float()).abs().max()) for k in released) < 1e-6
    assert _max_diff(model, server.model) < 1e-6
    iterate = arrays.to_torch_state_dict()
    assert max(float((iterate[k].float() - released[k].float()).abs().max()) for k in released) > 1e-4
    device_hists = {d: np.asarray(c.metric_records["holdout"]["oos-histogram"], dtype=float) for d, c in replies}
    if noise_at == "aggregate":  # exact counts from the devices, the noise added once on the server
        for d, h in device_hists.items():
            assert all(float(x).is_integer() for x in h)
            assert h.sum() == sizes[d]  # every holdout example is in scope (held-out intents never train)
            conf = _probs_one_by_one(model, holdout_examples(cfg, d)).max(axis=1)
            want = np.bincount(np.minimum((conf * 50).astype(int), 49), minlength=50)
            assert np.array_equal(h, want)
    else:
        assert any(not float(x).is_integer() for h in device_hists.values() for x in h)
    # the ledger and holdout.json account sigma / sqrt(2) (the count and one bin per example)
    with LedgerReader(tmp_path / "run") as reader:
        (rel,) = reader.holdout_releases()
    assert rel.noise_multiplier == pytest.approx(SIGMA / math.sqrt(2)) and rel.noise_at == noise_at
    h = read_holdout(tmp_path / "run")
    eps = holdout_epsilon(SIGMA / math.sqrt(2), 1, server.delta, cfg.accountant)
    assert h["epsilon"] == pytest.approx(eps)
    assert h["epsilon"] > holdout_epsilon(SIGMA, 1, server.delta, cfg.accountant)
    counts = h["oos_histogram"]["counts"]
    assert h["oos_histogram"]["bins"] == 50 and len(counts) == 50
    total_sent = np.sum(list(device_hists.values()), axis=0)
    if noise_at == "aggregate":
        assert not np.allclose(counts, total_sent)  # noised on the server
    else:
        assert np.allclose(counts, total_sent)  # already noised on the devices
    # oos.json: the threshold is the histogram's quantile, the metrics those of the released model
    o = read_oos(tmp_path / "run")
    assert o["threshold_source"] == "holdout" and o["quantile"] == cfg.oos_quantile
    # its total is the public number of holdout examples it counts (no out-of-scope class here), not the noised sum
    assert h["oos_histogram"]["examples"] == sum(len(server.pop.holdout_rows(d)) for d in range(cfg.num_devices))
    tau = threshold_from_histogram(counts, h["oos_histogram"]["examples"], cfg.oos_quantile, confidence_edges(50))
    assert o["threshold"] == tau
    assert o["oos_intents"] == held and o["oos_index"] is None
    tok = load_tokenizer(cfg.model)
    enc_in = server.task.encode(data.test, tok, cfg.max_length)
    enc_out = server.task.encode(data.test_oos, tok, cfg.max_length)
    test_rows = _rows(e2e_dir, "test")
    assert len(enc_in) == sum(r["label"] not in held for r in test_rows)
    assert len(enc_out) == sum(r["label"] in held for r in test_rows)
    p_in, p_out = _probs_one_by_one(model, enc_in), _probs_one_by_one(model, enc_out)
    assert p_in.shape[1] == 4
    want = _metrics_loop(enc_in.labels, p_in.argmax(1), p_in.max(1), p_out.argmax(1), p_out.max(1), tau)
    for k, v in want.items():
        assert (o["test"][k] is None) if v is None else o["test"][k] == pytest.approx(v, abs=1e-9), k


def test_a_public_threshold_needs_no_holdout(tmp_path, e2e_dir):
    from rundir import read_holdout, read_oos

    cfg = toy_config(tmp_path / "run", e2e_dir, noise_multiplier=1.0, rounds=1, num_devices=4, cohort_size=3,
                     oos_holdout_intents=0.34, oos_threshold=0.5, noise_at="aggregate")
    server, grid, _, _ = run_rounds(cfg)
    assert not [m for m in grid.sent if m.metadata.message_type == "evaluate"]
    assert read_holdout(tmp_path / "run") is None
    o = read_oos(tmp_path / "run")
    assert o["threshold"] == 0.5 and o["threshold_source"] == "public" and o["quantile"] is None
    assert o["test"]["in_scope"] == len(server.pop.data.test) and o["test"]["out_of_scope"] == 2 * TEST_PER_INTENT



def test_oos_train_run_keeps_the_class_and_leaves_it_out_of_the_histogram(tmp_path, oos_train_dir):
    """oos-train (--oos-label naming a trained class): the devices' histograms count their in-scope
    holdout examples only; the oos class's probability is no confidence, a top-class oos is rejected."""
    from client.app import holdout_examples
    from nlu.model import load_tokenizer
    from rundir import read_oos

    cfg = toy_config(tmp_path / "run", oos_train_dir, noise_multiplier=1.0, rounds=2, num_devices=4, cohort_size=3,
                     holdout_per_device=0.3, oos_label="oos", noise_at="aggregate", holdout_noise_multiplier=SIGMA)
    server, grid, _, _ = run_rounds(cfg)
    data = server.pop.data
    oos_index = list(data.label_names).index("oos")
    assert data.oos_index == oos_index and data.oos_intents == ()
    replies = [(d, c) for d, c in grid.outgoing if "holdout" in c.metric_records]
    assert replies
    model = _released_model(server, tmp_path / "run")
    for d, c in replies:
        h = np.asarray(c.metric_records["holdout"]["oos-histogram"], dtype=float)
        enc = holdout_examples(cfg, d)
        inscope = enc.labels != oos_index
        assert h.sum() == inscope.sum()  # exact counts (aggregate noise), the oos examples left out
        p = _probs_one_by_one(model, enc)
        conf = np.delete(p, oos_index, axis=1).max(axis=1)[inscope]
        assert np.array_equal(h, np.bincount(np.minimum((conf * 50).astype(int), 49), minlength=50))
        # the count: top class over every class (oos included) equal to the label
        assert c.metric_records["holdout"]["correct"] == float((p.argmax(1) == enc.labels).sum())
    o = read_oos(tmp_path / "run")
    assert o["oos_index"] == oos_index and o["oos_label"] == "oos" and o["oos_intents"] == []
    tok = load_tokenizer(cfg.model)
    enc_in = server.task.encode(data.test, tok, cfg.max_length)
    enc_out = server.task.encode(data.test_oos, tok, cfg.max_length)
    assert len(enc_out) == TEST_PER_INTENT and len(enc_in) == 6 * TEST_PER_INTENT
    p_in, p_out = _probs_one_by_one(model, enc_in), _probs_one_by_one(model, enc_out)
    want = _metrics_loop(enc_in.labels, p_in.argmax(1), np.delete(p_in, oos_index, 1).max(1), p_out.argmax(1),
                         np.delete(p_out, oos_index, 1).max(1), o["threshold"], oos_index)
    closed = np.array([c for c in range(7) if c != oos_index])[np.delete(p_in, oos_index, 1).argmax(1)]
    want["closed_set_accuracy"] = float((closed == enc_in.labels).mean())
    for k, v in want.items():
        assert (o["test"][k] is None) if v is None else o["test"][k] == pytest.approx(v, abs=1e-9), k


def test_holding_out_intents_of_the_built_in_set_is_refused():
    data = load_data(synthetic_devices=4)
    with pytest.raises(DataError, match="--oos-holdout-intents"):
        split_out_of_scope(data, None, 0.3, 0)
