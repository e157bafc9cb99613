"""Device partitions: coverage, determinism, skew, heavy tails, speed, agreement with flwr-datasets."""

from __future__ import annotations

import time
from pathlib import Path

import datasets
import numpy as np
import pytest
from flwr_datasets.partitioner import IidPartitioner, NaturalIdPartitioner

from partitions import PARTITIONERS, load_data, partition

from conftest import BANKING77
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


@pytest.mark.parametrize("name", ["iid", "dirichlet", "quantity", "quantity-label"])
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


def test_quantity_label_has_both_skews(small):
    """quantity-label: the quantity partitioner's heavy-tailed sizes, with per-device label skew."""
    labels = np.asarray(small["label"])
    both = partition(small, 60, "quantity-label", seed=3, dirichlet_alpha=0.1)
    sizes_only = partition(small, 60, "quantity", seed=3)
    _check_cover(both, len(small), 60)
    assert [len(p) for p in both] == [len(p) for p in sizes_only]  # same power-law sizes
    assert _mean_label_entropy(both, labels) < _mean_label_entropy(sizes_only, labels) - 1.0
    mild = partition(small, 60, "quantity-label", seed=3, dirichlet_alpha=10.0)
    assert _mean_label_entropy(both, labels) < _mean_label_entropy(mild, labels) - 1.0


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
    with pytest.raises(ValueError, match="iid, dirichlet, quantity, quantity-label, cluster, natural"):
        partition(small, 10, "shards")
    with pytest.raises(ValueError, match="--num-devices"):
        partition(small, 3001, "iid")
    with pytest.raises(ValueError, match="--max-examples"):
        partition(small, 3001, "dirichlet")
    with pytest.raises(ValueError):
        partition(small, 0)
    with pytest.raises(ValueError, match="min_partition_size"):
        partition(small, 1000, "iid", min_partition_size=4)
    with pytest.raises(ValueError, match="--device-column"):
        partition(small, 10, "natural")
    assert set(PARTITIONERS) == {"iid", "dirichlet", "quantity", "quantity-label", "cluster", "natural"}


def test_synthetic_natural(synthetic):
    train = synthetic.train
    parts = partition(train, 100, "natural")
    old = partition(train, 100, "synthetic-natural")  # the old name still works
    assert all(np.array_equal(x, y) for x, y in zip(parts, old))
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
    with pytest.raises(ValueError, match="set --num-devices 100"):
        partition(train, 50, "natural")
    more = partition(train, 120, "natural")
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


def test_natural_by_string_column_matches_natural_id_partitioner():
    users = ["zoe", "adam", "mia", "adam", "zoe", "zoe", "bob", "mia"] * 5
    ds = datasets.Dataset.from_dict({"text": ["x"] * 40, "label": [0, 1] * 20, "user": users})
    parts = partition(ds, 4, "natural", device_column="user")
    _check_cover(parts, 40, 4)
    names = sorted(set(users))  # distinct ids, sorted -> devices 0..K-1
    u = np.asarray(users)
    assert all(np.all(u[p] == names[d]) for d, p in enumerate(parts))
    nat = NaturalIdPartitioner(partition_by="user")
    nat.dataset = ds.add_column("row", list(range(40)))
    for pid in range(4):
        assert np.array_equal(parts[pid], np.sort(nat.load_partition(pid)["row"]))
    with pytest.raises(ValueError, match="set --num-devices 4"):
        partition(ds, 3, "natural", device_column="user")
    with pytest.raises(ValueError, match="--device-column"):
        partition(ds, 4, "natural")  # no 'device' column


def test_jsonl_device_column_feeds_natural(tmp_path):
    import json

    rows = [{"text": f"hello {i}", "label": "a" if i % 2 else "b", "user_id": f"u{i % 3}"} for i in range(12)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "hi", "label": "a"}))
    d = load_data(tmp_path, device_column="user_id")
    assert d.train["user_id"][:3] == ["u0", "u1", "u2"]
    parts = partition(d.train, 3, "natural", device_column="user_id")
    assert [len(p) for p in parts] == [4, 4, 4]
    assert "user_id" not in load_data(tmp_path).train.column_names  # only kept when asked for
    rows[5].pop("user_id")
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(Exception, match="train.jsonl:6: missing field 'user_id'"):
        load_data(tmp_path, device_column="user_id")


def _fake_clustered_embeddings(num_clusters=5, per=120, dim=16, seed=0):
    """Texts whose fake embeddings form ``num_clusters`` tight blobs, and each text's blob."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_clusters, dim)) * 5
    blob = np.repeat(np.arange(num_clusters), per)
    rng.shuffle(blob)
    texts = [f"utterance {i}" for i in range(len(blob))]
    vecs = {t: centres[b] + rng.normal(scale=0.3, size=dim) for t, b in zip(texts, blob)}
    calls = []

    def embed(batch):
        calls.append(len(batch))
        return np.stack([vecs[t] for t in batch])

    # Labels independent of the blobs: cluster skew is feature skew, not label skew.
    ds = datasets.Dataset.from_dict({"text": texts, "label": rng.integers(0, 4, len(blob))})
    return ds, blob, embed, calls


def test_cluster_partitioner_feature_skew_and_determinism():
    ds, blob, embed, calls = _fake_clustered_embeddings()
    parts = partition(ds, 20, "cluster", num_clusters=5, dirichlet_alpha=0.1, seed=3, embed_fn=embed)
    assert calls == [len(ds)]  # one call with every text
    _check_cover(parts, len(ds), 20)
    again = partition(ds, 20, "cluster", num_clusters=5, dirichlet_alpha=0.1, seed=3, embed_fn=embed)
    assert all(np.array_equal(x, y) for x, y in zip(parts, again))
    skewed = _mean_label_entropy(parts, blob)  # entropy over the true blobs
    iid = _mean_label_entropy(partition(ds, 20, "iid", seed=3), blob)
    mild = _mean_label_entropy(partition(ds, 20, "cluster", num_clusters=5, dirichlet_alpha=100.0, seed=3,
                                         embed_fn=embed), blob)
    assert skewed < iid - 0.5
    assert mild > skewed + 0.5
    labels = np.asarray(ds["label"])  # labels stay roughly as mixed as under iid
    assert _mean_label_entropy(parts, labels) > 0.5 * _mean_label_entropy(partition(ds, 20, "iid"), labels)
    with pytest.raises(ValueError, match="num-clusters"):
        partition(ds, 20, "cluster", num_clusters=10_000, embed_fn=embed)


def test_cluster_ids_recover_blobs():
    from partitions.partitioners import cluster_ids

    ds, blob, embed, _ = _fake_clustered_embeddings()
    c = cluster_ids(ds, 5, seed=0, embed_fn=embed)
    # every k-means cluster is one blob (up to renaming)
    for k in range(5):
        assert len(set(blob[c == k])) == 1


def test_embedding_cache(tmp_path, monkeypatch):
    from partitions import embeddings

    monkeypatch.setenv("DPFL_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_minilm(texts):
        calls.append(len(texts))
        return np.arange(len(texts) * 3, dtype=np.float32).reshape(-1, 3)

    monkeypatch.setattr(embeddings, "minilm_embed", fake_minilm)
    a = embeddings.embed_texts(["a", "b"])
    b = embeddings.embed_texts(["a", "b"])
    assert calls == [2] and np.array_equal(a, b)
    assert len(list((tmp_path / "embeddings").glob("*.npy"))) == 1
    embeddings.embed_texts(["a", "c"])  # other texts, other key
    assert calls == [2, 2]
    assert embeddings.texts_key(["ab", "c"]) != embeddings.texts_key(["a", "bc"])
