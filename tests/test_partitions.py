"""Device partitions: coverage, determinism, skew, heavy tails, speed, agreement with flwr-datasets."""

from __future__ import annotations

import time
from pathlib import Path

import datasets
import numpy as np
import pytest
from flwr_datasets.partitioner import IidPartitioner, NaturalIdPartitioner

from partitions import PARTITIONERS, load_data, partition

BANKING77 = Path("/work/shared/data/banking77")
needs_banking = pytest.mark.skipif(not (BANKING77 / "train.jsonl").is_file(), reason="BANKING77 files not present")


@pytest.fixture(scope="module")
def small() -> datasets.Dataset:
    rng = np.random.default_rng(0)
    return datasets.Dataset.from_dict({"text": ["x"] * 3000, "label": rng.integers(0, 20, 3000)})


@pytest.fixture(scope="module")
def banking_train() -> datasets.Dataset:
    return load_data(BANKING77).train


@pytest.fixture(scope="module")
def synthetic():
    return load_data(seed=0)


def _check_cover(parts, n, num_devices):
    assert len(parts) == num_devices
    assert all(p.dtype == np.int64 for p in parts)
    allrows = np.concatenate(parts)
    assert len(allrows) == n  # sizes sum to the data set
    assert np.array_equal(np.sort(allrows), np.arange(n))  # every row on exactly one device


@pytest.mark.parametrize("name", ["iid", "dirichlet", "quantity"])
def test_cover_and_determinism(small, name):
    a = partition(small, 50, name, seed=1)
    _check_cover(a, len(small), 50)
    b = partition(small, 50, name, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c = partition(small, 50, name, seed=2)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_matches_flwr_iid_partitioner_on_shuffled_rows(small):
    parts = partition(small, 7, "iid", seed=5)
    order = np.random.default_rng(5).permutation(len(small))
    p = IidPartitioner(7)
    p.dataset = datasets.Dataset.from_dict({"row": order})
    for i in range(7):
        assert np.array_equal(parts[i], np.sort(p.load_partition(i)["row"]))
    sizes = [len(x) for x in parts]
    assert max(sizes) - min(sizes) <= 1


def _mean_label_entropy(parts, labels):
    ents = []
    for p in parts:
        if len(p) == 0:
            continue
        q = np.bincount(labels[p]) / len(p)
        q = q[q > 0]
        ents.append(-(q * np.log(q)).sum())
    return float(np.mean(ents))


def test_dirichlet_skew_grows_as_alpha_shrinks(small):
    labels = np.asarray(small["label"])
    skewed = _mean_label_entropy(partition(small, 30, "dirichlet", dirichlet_alpha=0.1), labels)
    mild = _mean_label_entropy(partition(small, 30, "dirichlet", dirichlet_alpha=10.0), labels)
    iid = _mean_label_entropy(partition(small, 30, "iid"), labels)
    assert skewed < mild - 1.0
    assert mild <= iid + 0.05


def test_dirichlet_min_partition_size(small):
    parts = partition(small, 20, "dirichlet", dirichlet_alpha=1.0, min_partition_size=10)
    assert min(len(p) for p in parts) >= 10
    with pytest.raises(ValueError, match="min_partition_size"), pytest.warns(UserWarning):
        partition(small, 200, "dirichlet", dirichlet_alpha=0.01, min_partition_size=14)


def test_quantity_heavy_tailed(small):
    parts = partition(small, 100, "quantity", seed=0)
    _check_cover(parts, len(small), 100)
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() >= 5 * np.median(sizes)
    heavier = np.array([len(p) for p in partition(small, 100, "quantity", quantity_beta=0.8)])
    assert heavier.max() > sizes.max()
    floored = partition(small, 100, "quantity", min_partition_size=5)
    assert min(len(p) for p in floored) >= 5


def test_quantity_allows_more_devices_than_rows(small):
    tiny = small.select(range(40))
    parts = partition(tiny, 100, "quantity")
    _check_cover(parts, 40, 100)
    assert sum(len(p) == 0 for p in parts) >= 60


def test_errors(small):
    with pytest.raises(ValueError, match="iid, dirichlet, quantity, synthetic-natural"):
        partition(small, 10, "shards")
    with pytest.raises(ValueError, match="num_devices"):
        partition(small, 3001, "iid")
    with pytest.raises(ValueError, match="max_examples"):
        partition(small, 3001, "dirichlet")
    with pytest.raises(ValueError):
        partition(small, 0)
    with pytest.raises(ValueError, match="min_partition_size"):
        partition(small, 1000, "iid", min_partition_size=4)
    with pytest.raises(ValueError, match="synthetic"):
        partition(small, 10, "synthetic-natural")
    assert set(PARTITIONERS) == {"iid", "dirichlet", "quantity", "synthetic-natural"}


def test_synthetic_natural(synthetic):
    train = synthetic.train
    parts = partition(train, 100, "synthetic-natural")
    _check_cover(parts, len(train), 100)
    dev = np.asarray(train["device"])
    assert all(np.all(dev[p] == d) for d, p in enumerate(parts))
    nat = NaturalIdPartitioner(partition_by="device")
    nat.dataset = train
    for pid in (0, 5, 99):
        rows = nat.load_partition(pid)["uid"]
        natural_id = nat.partition_id_to_natural_id[pid]
        assert np.array_equal(parts[natural_id], rows)
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() >= 5 * np.median(sizes)
    with pytest.raises(ValueError, match="set num_devices to 100"):
        partition(train, 50, "synthetic-natural")
    more = partition(train, 120, "synthetic-natural")
    assert len(more) == 120 and all(len(p) == 0 for p in more[100:])


@needs_banking
def test_banking77_10k_devices_is_fast(banking_train):
    t = time.perf_counter()
    parts = partition(banking_train, 10_000, "iid", seed=0)
    took = time.perf_counter() - t
    _check_cover(parts, 10003, 10_000)
    assert {len(p) for p in parts} == {1, 2}
    assert took < 5.0, f"iid into 10,000 devices took {took:.1f}s"


@needs_banking
def test_banking77_10k_devices_dirichlet_and_quantity(banking_train):
    for name in ("dirichlet", "quantity"):
        t = time.perf_counter()
        parts = partition(banking_train, 10_000, name, seed=0)
        took = time.perf_counter() - t
        _check_cover(parts, 10003, 10_000)
        assert took < 20.0, f"{name} into 10,000 devices took {took:.1f}s"


@needs_banking
def test_max_examples_then_partition(banking_train):
    d = load_data(BANKING77, max_examples=2000)
    parts = partition(d.train, 20, "dirichlet", dirichlet_alpha=0.5)
    _check_cover(parts, 2000, 20)
    uids = np.asarray(d.train["uid"])
    assert uids[parts[0]].max() < 10003  # indices are rows of the capped set; uid maps back
