"""Data loading: JSONL files (real BANKING77/SNIPS and bad inputs), hub errors, the synthetic set, caps."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest

from partitions import DataError, NLUData, load_data
from partitions.loading import stratified_subset
from partitions.synthetic import INTENTS, generate

from conftest import SHARED_DATA as SHARED
BANKING77 = SHARED / "banking77"
SNIPS = SHARED / "snips"
needs_banking = pytest.mark.skipif(not (BANKING77 / "train.jsonl").is_file(), reason="BANKING77 files not present")
needs_snips = pytest.mark.skipif(not (SNIPS / "train.jsonl").is_file(), reason="SNIPS files not present")


# --------------------------------------------------------------------------- real files

@pytest.fixture(scope="module")
def banking() -> NLUData:
    return load_data(BANKING77)


@needs_banking
def test_banking77_counts_and_label_order(banking):
    assert len(banking.train) == 10003
    assert len(banking.test) == 3080
    assert banking.label_names == json.loads((BANKING77 / "labels.json").read_text())
    assert len(banking.label_names) == 77
    assert banking.slot_names is None and not banking.has_slots
    assert set(banking.train.column_names) == {"text", "label", "uid"}
    assert banking.train["uid"] == list(range(10003))
    first = json.loads((BANKING77 / "train.jsonl").open().readline())
    assert banking.train[0]["text"] == first["text"]
    assert banking.label_names[banking.train[0]["label"]] == first["label"]
    assert set(banking.test["label"]) <= set(range(77))


@needs_snips
def test_snips_has_aligned_slots():
    d = load_data(SNIPS)
    assert (len(d.train), len(d.test)) == (13784, 700)
    assert d.label_names == sorted(d.label_names) and len(d.label_names) == 7
    assert d.slot_names[0] == "O" and "B-playlist" in d.slot_names and len(set(d.slot_names)) == len(d.slot_names)
    row = d.train[0]
    assert len(row["tokens"]) == len(row["slots"]) > 0
    assert all(tag in d.slot_names for tag in row["slots"])


@needs_banking
def test_max_examples_caps_train_and_test_keeping_uids(banking):
    d = load_data(BANKING77, max_examples=1000, seed=3)
    assert len(d.train) == 1000
    assert len(d.test) == 500  # max(500, 1000 // 2)
    uids = np.asarray(d.train["uid"])
    assert np.all(np.diff(uids) > 0)  # original order kept
    assert [banking.train[int(u)]["text"] for u in uids[:20]] == d.train["text"][:20]
    assert len(set(d.train["label"])) == 77  # stratified: every label kept
    assert d.train["uid"] == load_data(BANKING77, max_examples=1000, seed=3).train["uid"]
    assert "capped" in d.source
    big = load_data(BANKING77, max_examples=10**6)
    assert len(big.train) == 10003 and len(big.test) == 3080


def test_stratified_subset_is_proportional():
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    rows = stratified_subset(labels, 100, seed=0)
    assert len(rows) == 100 and len(set(rows)) == 100
    assert Counter(labels[rows].tolist()) == {0: 90, 1: 9, 2: 1}


# --------------------------------------------------------------------------- bad JSONL

def _write(dir_: Path, train: str | list, test: str | list | None = None, labels: list | None = None) -> Path:
    def text(x):
        return x if isinstance(x, str) else "".join(json.dumps(r) + "\n" for r in x)

    dir_.mkdir(parents=True, exist_ok=True)
    (dir_ / "train.jsonl").write_text(text(train), encoding="utf-8")
    if test is not None:
        (dir_ / "test.jsonl").write_text(text(test), encoding="utf-8")
    if labels is not None:
        (dir_ / "labels.json").write_text(json.dumps(labels))
    return dir_


GOOD = [{"text": "hello there", "label": "greet"}, {"text": "bye now", "label": "bye"}]


def _error(dir_: Path) -> str:
    with pytest.raises(DataError) as info:
        load_data(dir_)
    return str(info.value)


def test_small_valid_dir_blank_lines_and_int_labels(tmp_path):
    d = load_data(_write(tmp_path, "\n" + json.dumps(GOOD[0]) + "\n\n" + json.dumps(GOOD[1]) + "\n", GOOD))
    assert d.label_names == ["bye", "greet"] and d.train["label"] == [1, 0]
    ints = [{"text": f"t{i}", "label": i} for i in (2, 10, 1)]
    d = load_data(_write(tmp_path / "ints", ints, [{"text": "x", "label": "10"}]))
    assert d.label_names == ["1", "2", "10"] and d.test["label"] == [2]


@pytest.mark.parametrize(
    "train, expected",
    [
        (json.dumps(GOOD[0]) + "\n" * 16 + '{"text": "oops", "label": }\n', "train.jsonl:17: not valid JSON"),
        (json.dumps(GOOD[0]) + "\n[1, 2]\n", "train.jsonl:2: record must be a JSON object"),
        ([GOOD[0], {"label": "x"}], "train.jsonl:2: missing field 'text'"),
        ([GOOD[0], GOOD[1], {"text": "   ", "label": "x"}], "train.jsonl:3: field 'text' is empty"),
        ([{"text": 5, "label": "x"}], "train.jsonl:1: field 'text' must be a string"),
        ([GOOD[0], {"text": "no label"}], "train.jsonl:2: missing field 'label'"),
        ([{"text": "a", "label": None}], "train.jsonl:1: field 'label' must be a string or an integer"),
        ([{"text": "a", "label": [1]}], "train.jsonl:1: field 'label' must be a string or an integer"),
        ([{"text": "a", "label": True}], "train.jsonl:1: field 'label' must be a string or an integer"),
        ("", "train.jsonl: no records"),
        ("\n  \n\n", "train.jsonl: no records"),
        (b"\xff\xfe bad\n", "train.jsonl:1: not valid UTF-8"),
    ],
)
def test_bad_train_file_names_file_and_line(tmp_path, train, expected):
    _write(tmp_path, "" if isinstance(train, bytes) else train, GOOD)
    if isinstance(train, bytes):
        (tmp_path / "train.jsonl").write_bytes(train)
    assert expected in _error(tmp_path)


def test_tokens_slots_mismatch_and_missing(tmp_path):
    rec = {"text": "a b c d e f g", "label": "x", "tokens": list("abcdefg"), "slots": ["O"] * 7}
    bad = dict(rec, slots=["O"] * 6)
    msg = _error(_write(tmp_path / "a", [rec] * 4 + [bad], [rec]))
    assert "train.jsonl:5: 7 tokens but 6 slot tags" in msg
    msg = _error(_write(tmp_path / "b", [rec, {"text": "q", "label": "x"}], [rec]))
    assert "train.jsonl:2: missing field 'tokens'" in msg
    msg = _error(_write(tmp_path / "c", [rec], [rec, {"text": "q", "label": "x", "tokens": ["q"]}]))
    assert "test.jsonl:2: missing field 'slots'" in msg
    msg = _error(_write(tmp_path / "d", [dict(rec, slots=["O"] * 6 + ["city"])], [rec]))
    assert "train.jsonl:1:" in msg and "BIO" in msg


def test_unseen_test_label_names_label_and_first_line(tmp_path):
    test = [GOOD[0], {"text": "what", "label": "mystery"}, {"text": "again", "label": "mystery"}]
    msg = _error(_write(tmp_path, GOOD, test))
    assert "test.jsonl:2:" in msg and "'mystery'" in msg


def test_labels_json_order_and_errors(tmp_path):
    d = load_data(_write(tmp_path / "ok", GOOD, GOOD, labels=["greet", "bye", "unused"]))
    assert d.label_names == ["greet", "bye", "unused"] and d.train["label"] == [0, 1]
    msg = _error(_write(tmp_path / "missing", GOOD + [{"text": "z", "label": "zzz"}], GOOD, labels=["greet", "bye"]))
    assert "train.jsonl:3:" in msg and "'zzz'" in msg and "labels.json" in msg
    bad = _write(tmp_path / "bad", GOOD, GOOD)
    (bad / "labels.json").write_text("[\"greet\",\n oops]")
    assert "labels.json:2: not valid JSON" in _error(bad)
    assert "listed twice" in _error(_write(tmp_path / "dup", GOOD, GOOD, labels=["bye", "greet", "bye"]))


def test_missing_files_name_the_path(tmp_path):
    msg = _error(_write(tmp_path, GOOD))  # no test.jsonl
    assert str(tmp_path / "test.jsonl") in msg
    assert str(tmp_path / "nope") in _error(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty / "train.jsonl") in _error(empty)


def test_bad_test_file_names_test_jsonl(tmp_path):
    assert "test.jsonl:2: not valid JSON" in _error(_write(tmp_path, GOOD, json.dumps(GOOD[0]) + "\n{bad\n"))


# --------------------------------------------------------------------------- sources

def test_exactly_one_source(tmp_path):
    with pytest.raises(DataError, match="not both"):
        load_data(tmp_path, "banking77")
    with pytest.raises(ValueError):
        load_data(max_examples=0)


def test_hub_offline_is_a_data_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'banking77' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        load_data(dataset="banking77")
    assert "unreachable" in str(info.value) and "--data-dir" in str(info.value)


def test_hub_dataset_with_classlabel(monkeypatch):
    feats = datasets.Features({"sentence": datasets.Value("string"),
                               "intent": datasets.ClassLabel(names=["b", "a"])})
    dsd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": ["x y", "z"], "intent": [1, 0]}, features=feats),
        "validation": datasets.Dataset.from_dict({"sentence": ["w"], "intent": [0]}, features=feats),
    })
    monkeypatch.setattr(datasets, "load_dataset", lambda name, *a, **k: dsd)
    d = load_data(dataset="some/name", text_column="sentence", label_column="intent")
    assert d.label_names == ["b", "a"] and d.train["label"] == [1, 0] and d.test["text"] == ["w"]
    assert d.train["uid"] == [0, 1] and "some/name" in d.source
    with pytest.raises(DataError, match="no column 'text'"):
        load_data(dataset="some/name")


# --------------------------------------------------------------------------- synthetic

@pytest.fixture(scope="module")
def synthetic() -> NLUData:
    return load_data(seed=0)


def test_synthetic_shape_and_labels(synthetic):
    assert len(synthetic.label_names) >= 15 and synthetic.label_names == INTENTS
    assert 2000 <= len(synthetic.train) <= 6000 and len(synthetic.test) >= 500
    assert set(synthetic.train["label"]) == set(range(len(INTENTS)))
    assert set(synthetic.test["label"]) == set(range(len(INTENTS)))
    assert "SYNTHETIC" in synthetic.source
    assert synthetic.slot_names[0] == "O"
    assert "device" in synthetic.train.column_names and "device" not in synthetic.test.column_names


def test_synthetic_slots_aligned(synthetic):
    names = set(synthetic.slot_names)
    for split in (synthetic.train, synthetic.test):
        for text, toks, tags in zip(split["text"], split["tokens"], split["slots"]):
            assert text.split() == toks and len(toks) == len(tags)
            assert set(tags) <= names
            for prev, tag in zip(["O"] + tags, tags):  # I-x only continues x
                assert not tag.startswith("I-") or prev[2:] == tag[2:]
    assert sum(any(t != "O" for t in tags) for tags in synthetic.train["slots"]) > len(synthetic.train) / 2


def test_synthetic_deterministic_and_seeded():
    a, b, c = generate(50, seed=7), generate(50, seed=7), generate(50, seed=8)
    assert a.train == b.train and a.test == b.test
    assert a.train["text"] != c.train["text"]


def test_synthetic_heavy_tailed_devices(synthetic):
    sizes = np.bincount(np.asarray(synthetic.train["device"]), minlength=100)
    assert len(sizes) == 100 and sizes.min() >= 1
    assert sizes.max() >= 5 * np.median(sizes)


def test_synthetic_devices_have_habits(synthetic):
    # A device's intent mix is far more concentrated than the population's.
    dev = np.asarray(synthetic.train["device"])
    lab = np.asarray(synthetic.train["label"])
    big = [d for d in range(100) if (dev == d).sum() >= 40]
    top_share = np.mean([np.bincount(lab[dev == d]).max() / (dev == d).sum() for d in big])
    assert top_share > 2 * np.bincount(lab).max() / len(lab)


def test_synthetic_max_examples_keeps_device_column():
    d = load_data(max_examples=300, seed=0)
    assert len(d.train) == 300 and "device" in d.train.column_names
