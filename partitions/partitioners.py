"""Splitting a training set over simulated devices: :func:`partition`.

The result is ``device id -> int64 array of row indices into train`` (each array sorted
ascending). Every row is on exactly one device and the result is a function of
``(train, num_devices, partitioner, seed, parameters)`` only.

Partitioners (flwr-datasets does the assignment wherever it has one):

``"iid"``
    Rows shuffled with the seed, then cut into ``num_devices`` contiguous shards of sizes
    ``n // num_devices`` or one more: exactly ``flwr_datasets.partitioner.IidPartitioner``
    (``Dataset.shard(contiguous=True)``) applied to the shuffled rows. Loading 10,000
    partitions one by one through IidPartitioner takes ~5 s for BANKING77, so the shard
    boundaries are computed directly with the same arithmetic (milliseconds); a test checks
    that both agree.
``"dirichlet"``
    Label skew: ``flwr_datasets.partitioner.DirichletPartitioner(partition_by="label",
    alpha=dirichlet_alpha, min_partition_size=min_partition_size, self_balancing=False,
    seed=seed)``; the indices are read from the partitioner after one ``load_partition``
    call (about a second for 10,000 devices). Smaller alpha -> each device sees fewer labels.
``"quantity"``
    Quantity skew with power-law (Pareto) device sizes: each device draws a weight
    ``w ~ Pareto(quantity_beta)`` (tail index; smaller = heavier tail, 1.5 by default),
    sizes are ``min_partition_size`` plus the rest split in proportion to the weights
    (largest-remainder rounding, so they sum to ``len(train)``), and
    ``flwr_datasets.partitioner.SizePartitioner`` assigns the seeded-shuffled rows. Labels
    are i.i.d. within a device.
``"quantity-label"``
    Quantity and label skew together: the ``"quantity"`` power-law sizes, and within each
    device labels drawn from its own Dirichlet(``dirichlet_alpha``) over the labels:
    ``flwr_datasets.partitioner.InnerDirichletPartitioner(partition_sizes=sizes,
    partition_by="label", alpha=dirichlet_alpha, seed=seed)`` (Acar et al. 2021, FedDyn's
    split). A few heavy devices with many examples of few intents, many light ones.
``"cluster"``
    Feature skew: every training text is embedded (mean-pooled all-MiniLM-L6-v2 sentence
    embeddings by default, cached on disk, see :mod:`partitions.embeddings`; tests inject an
    ``embed_fn``), the L2-normalised embeddings are clustered with scikit-learn k-means
    (``num_clusters``, seeded), and ``DirichletPartitioner(partition_by=<cluster column>,
    alpha=dirichlet_alpha)`` spreads each cluster over the devices. Smaller alpha -> each
    device's utterances come from fewer regions of the embedding space (kinds of wording and
    topics), whatever their labels.
``"natural"``
    The data's own devices (users): a device/user id column (``device_column``, default
    ``"device"``; the built-in synthetic set has one, JSONL and hub data sets may). The
    distinct ids, sorted, become devices ``0 .. K-1``; device ``d`` gets every row with the
    ``d``-th id. This is ``flwr_datasets.partitioner.NaturalIdPartitioner(partition_by=
    device_column)`` (same sorted-id numbering), computed with numpy because that partitioner
    loops in Python behind a progress bar; a test checks both agree. ``num_devices`` must be
    at least K (else a ``ValueError`` says to set ``--num-devices K``); a larger
    ``num_devices`` leaves devices ``K .. num_devices-1`` empty. That is allowed on purpose:
    ``max_examples`` can remove every row of a small synthetic device, and the run keeps the
    device count it was asked for. ``"synthetic-natural"``, the old name, is still accepted.

Devices with zero examples: possible with ``"dirichlet"``, ``"cluster"`` and ``"quantity"``
when ``min_partition_size`` is 0 (the default), with ``"quantity"`` when ``num_devices``
exceeds the rows, and with ``"natural"`` when ``num_devices`` exceeds the distinct ids. They
are returned as empty arrays; the server skips them (with a warning).
"""

from __future__ import annotations

import numpy as np

__all__ = ["PARTITIONERS", "cluster_ids", "natural_ids", "partition", "pareto_sizes"]

PARTITIONERS: tuple[str, ...] = ("iid", "dirichlet", "quantity", "quantity-label", "cluster", "natural")

#: Old names still accepted by :func:`partition` (not listed in PARTITIONERS).
ALIASES: dict[str, str] = {"synthetic-natural": "natural"}

_ROW = "__row"


def _column(train, name: str) -> np.ndarray:
    """One column as a numpy array (``np.asarray(ds[name])`` iterates row by row in datasets 4)."""
    return np.asarray(train.select_columns([name]).with_format("numpy")[:][name])


def _index_dataset(train, columns: tuple[str, ...] = (), order: np.ndarray | None = None,
                   extra: dict[str, np.ndarray] | None = None):
    """A small Dataset of original row numbers (optionally permuted) plus the needed columns.

    ``extra``: computed columns (one value per row of ``train``), e.g. cluster ids.
    """
    import datasets

    n = len(train)
    rows = np.arange(n, dtype=np.int64) if order is None else order.astype(np.int64)
    cols = {_ROW: rows}
    for c in columns:
        cols[c] = _column(train, c)[rows]
    for c, values in (extra or {}).items():
        cols[c] = np.asarray(values)[rows]
    # Arrow format: flwr-datasets reads whole columns with np.array(ds[col]), which iterates row by
    # row for the default (python) format in datasets 4 but is one copy for an Arrow column.
    return datasets.Dataset.from_dict(cols).with_format("arrow")


def _indices_from(partitioner, index_ds, num_devices: int, attr: str) -> list[np.ndarray]:
    """Row indices per partition, read from the partitioner's own index lists.

    The flwr-datasets partitioners compute every partition on the first ``load_partition``
    call and keep ``partition id -> positions`` (``attr``); reading it avoids building 10,000
    Dataset objects. Falls back to ``load_partition`` one by one if the attribute is gone.
    """
    partitioner.dataset = index_ds
    partitioner.load_partition(0)
    rows = _column(index_ds, _ROW).astype(np.int64)
    mapping = getattr(partitioner, attr, None)
    if not isinstance(mapping, dict) or len(mapping) != num_devices:  # pragma: no cover - library changed
        return [np.asarray(partitioner.load_partition(i)[_ROW], dtype=np.int64) for i in range(num_devices)]
    return [rows[np.asarray(mapping[i], dtype=np.int64)] for i in range(num_devices)]


def pareto_sizes(n: int, num_devices: int, beta: float, rng: np.random.Generator, min_size: int = 0) -> np.ndarray:
    """Heavy-tailed sizes summing to ``n``: ``min_size`` each plus a Pareto(beta)-weighted share.

    Raises
    ------
    ValueError
        ``beta <= 0`` or ``min_size * num_devices > n``.
    """
    if not beta > 0:
        raise ValueError(f"quantity_beta must be > 0, got {beta}")
    rest = n - min_size * num_devices
    if rest < 0:
        raise ValueError(f"--num-devices {num_devices} devices of at least min_partition_size={min_size} examples "
                         f"each need more than the {n} training examples: lower --num-devices or min_partition_size")
    w = rng.pareto(beta, num_devices) + 1.0  # classical Pareto, x_min = 1, tail index beta
    share = w / w.sum() * rest
    sizes = np.floor(share).astype(np.int64)
    short = rest - int(sizes.sum())
    if short:
        sizes[np.argsort(-(share - sizes), kind="stable")[:short]] += 1
    return sizes + min_size


def natural_ids(train, device_column: str = "device") -> tuple[np.ndarray, np.ndarray]:
    """The natural device of every row: ``(ids, device)``.

    ``ids`` are the distinct values of ``device_column``, sorted (as NaturalIdPartitioner
    numbers them); ``device[i]`` is the index into ``ids`` of row ``i`` (int64).

    Raises
    ------
    ValueError
        The column is missing (names the columns there are) or has missing values.
    """
    if device_column not in train.column_names:
        raise ValueError(
            f"the 'natural' partitioner needs a device/user id column {device_column!r}, which the training "
            f"data does not have (columns: {', '.join(train.column_names)}); set --device-column to the "
            "column that holds the device or user id, or use iid, dirichlet, quantity or cluster"
        )
    col = train.data.column(device_column)
    if col.null_count:
        raise ValueError(f"column {device_column!r}: {col.null_count} rows have no device id")
    ids, device = np.unique(_column(train, device_column), return_inverse=True)
    return ids, device.astype(np.int64).reshape(-1)


def cluster_ids(train, num_clusters: int = 10, *, seed: int = 0, embed_fn=None) -> np.ndarray:
    """k-means cluster (0 .. num_clusters-1, int64) of every training text's sentence embedding.

    Parameters
    ----------
    train : datasets.Dataset
        Needs a ``text`` column.
    num_clusters : int
        k of k-means (>= 1, at most the number of rows).
    seed : int
        Seed of k-means (k-means++ initialisation, 4 restarts).
    embed_fn : callable, optional
        ``list[str] -> array [n, dim]``. Default: mean-pooled all-MiniLM-L6-v2 embeddings,
        cached on disk (:func:`partitions.embeddings.embed_texts`).

    Raises
    ------
    ValueError
        ``num_clusters < 1`` or more clusters than rows; embeddings of the wrong shape.
    """
    from sklearn.cluster import KMeans

    from partitions.embeddings import embed_texts

    n = len(train)
    if int(num_clusters) != num_clusters or num_clusters < 1:
        raise ValueError(f"num_clusters must be a positive integer, got {num_clusters}")
    if num_clusters > n:
        raise ValueError(f"num_clusters={num_clusters} exceeds the {n} training examples: lower --num-clusters")
    texts = [str(t) for t in train["text"]]
    emb = np.asarray(embed_texts(texts, embed_fn=embed_fn), dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] != n:
        raise ValueError(f"the embedding function returned shape {emb.shape}, expected ({n}, dim)")
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)  # cosine geometry
    km = KMeans(n_clusters=int(num_clusters), n_init=4, random_state=int(seed) % (2**32))
    return km.fit_predict(emb).astype(np.int64)


def _dirichlet(train, num_devices, by, alpha, min_partition_size, seed, extra=None) -> list[np.ndarray]:
    from flwr_datasets.partitioner import DirichletPartitioner

    if not alpha > 0:
        raise ValueError(f"dirichlet_alpha must be > 0, got {alpha}")
    p = DirichletPartitioner(num_partitions=num_devices, partition_by=by, alpha=float(alpha),
                             min_partition_size=min_partition_size, self_balancing=False, shuffle=True,
                             seed=seed)
    cols = () if extra else (by,)
    try:
        return _indices_from(p, _index_dataset(train, cols, extra=extra), num_devices, "_partition_id_to_indices")
    except ValueError as exc:
        if "attempts" in str(exc):
            raise ValueError(f"the Dirichlet partition (alpha={alpha}) left a device below "
                             f"min_partition_size={min_partition_size} in 10 tries: lower min_partition_size "
                             f"or num_devices, or raise dirichlet_alpha") from exc
        raise


def partition(
    train,
    num_devices: int,
    partitioner: str = "iid",
    *,
    seed: int = 0,
    dirichlet_alpha: float = 0.5,
    quantity_beta: float = 1.5,
    min_partition_size: int = 0,
    device_column: str = "device",
    num_clusters: int = 10,
    embed_fn=None,
) -> list[np.ndarray]:
    """Assign every training row to exactly one device.

    Parameters
    ----------
    train : datasets.Dataset
        The training split (needs ``label`` for ``"dirichlet"``, ``text`` for ``"cluster"``,
        ``device_column`` for ``"natural"``).
    num_devices : int
        Number of devices (>= 1).
    partitioner : {"iid", "dirichlet", "quantity", "quantity-label", "cluster", "natural"}
        See the module docstring (``"synthetic-natural"`` is an old name of ``"natural"``).
    seed : int
        Same seed, same partition.
    dirichlet_alpha : float
        Dirichlet concentration for ``"dirichlet"`` and ``"quantity-label"`` (over labels) and
        ``"cluster"`` (over clusters); > 0, smaller = more skew.
    quantity_beta : float
        Pareto tail index for ``"quantity"`` and ``"quantity-label"`` (> 0; smaller = heavier tail).
    min_partition_size : int
        Minimum examples per device for ``"iid"`` (checked), ``"dirichlet"``/``"cluster"``
        (resampled up to 10 times by flwr-datasets) and ``"quantity"`` (guaranteed). 0 allows
        empty devices.
    device_column : str
        The device/user id column of ``"natural"``.
    num_clusters : int
        k of the k-means of ``"cluster"``.
    embed_fn : callable, optional
        ``list[str] -> array [n, dim]`` for ``"cluster"`` (default: cached MiniLM embeddings).

    Returns
    -------
    list of numpy.ndarray
        ``result[d]``: sorted int64 row indices of device ``d``; ``len(result) == num_devices``.

    Raises
    ------
    ValueError
        Unknown partitioner (names the valid ones); ``num_devices < 1``; ``num_devices`` larger
        than the training rows for ``"iid"``, ``"dirichlet"`` or ``"cluster"`` (says to lower
        num_devices or raise max_examples); a bad alpha/beta/min_partition_size/num_clusters;
        ``"natural"`` on data without ``device_column`` or with fewer ``num_devices`` than
        distinct ids (says to set --num-devices K); ``"dirichlet"``/``"cluster"`` that cannot
        meet ``min_partition_size``.
    """
    partitioner = ALIASES.get(partitioner, partitioner)
    if partitioner not in PARTITIONERS:
        raise ValueError(f"unknown partitioner {partitioner!r}; valid: {', '.join(PARTITIONERS)}")
    if int(num_devices) != num_devices or num_devices < 1:
        raise ValueError(f"num_devices must be a positive integer, got {num_devices}")
    if min_partition_size < 0:
        raise ValueError(f"min_partition_size must be >= 0, got {min_partition_size}")
    num_devices = int(num_devices)
    n = len(train)
    rng = np.random.default_rng(seed)

    if partitioner in ("iid", "dirichlet", "cluster") and num_devices > n:
        raise ValueError(
            f"--num-devices {num_devices} is larger than the {n} training examples, so the {partitioner!r} "
            f"partitioner cannot give every device an example: lower --num-devices, raise --max-examples "
            f"(or drop the cap), or use --partitioner quantity, which allows empty devices"
        )

    if partitioner == "iid":
        if min_partition_size > n // num_devices:
            raise ValueError(f"iid shards hold {n // num_devices} or more examples, less than "
                             f"min_partition_size={min_partition_size}: lower num_devices or min_partition_size")
        order = rng.permutation(n).astype(np.int64)
        # == IidPartitioner(num_devices) on the shuffled rows: Dataset.shard(contiguous=True)
        # gives shard i the range [div*i + min(i, mod), ... + div + (i < mod)), as array_split does.
        parts = np.array_split(order, num_devices)
    elif partitioner == "dirichlet":
        if not dirichlet_alpha > 0:
            raise ValueError(f"dirichlet_alpha must be > 0, got {dirichlet_alpha}")
        if "label" not in train.column_names:
            raise ValueError("the 'dirichlet' partitioner needs a 'label' column")
        parts = _dirichlet(train, num_devices, "label", dirichlet_alpha, min_partition_size, seed)
    elif partitioner == "cluster":
        if not dirichlet_alpha > 0:
            raise ValueError(f"dirichlet_alpha must be > 0, got {dirichlet_alpha}")
        clusters = cluster_ids(train, num_clusters, seed=seed, embed_fn=embed_fn)
        parts = _dirichlet(train, num_devices, "cluster", dirichlet_alpha, min_partition_size, seed,
                           extra={"cluster": clusters})
    elif partitioner == "quantity":
        from flwr_datasets.partitioner import SizePartitioner

        sizes = pareto_sizes(n, num_devices, quantity_beta, rng, min_partition_size)
        order = rng.permutation(n).astype(np.int64)
        nonempty = np.flatnonzero(sizes > 0)
        p = SizePartitioner([int(s) for s in sizes[nonempty]])  # it rejects zero sizes
        got = _indices_from(p, _index_dataset(train, order=order), len(nonempty), "partition_id_to_indices")
        parts = [np.empty(0, dtype=np.int64)] * num_devices
        for dev, rows in zip(nonempty, got):
            parts[dev] = rows
    elif partitioner == "quantity-label":
        from flwr_datasets.partitioner import InnerDirichletPartitioner

        if not dirichlet_alpha > 0:
            raise ValueError(f"dirichlet_alpha must be > 0, got {dirichlet_alpha}")
        if "label" not in train.column_names:
            raise ValueError("the 'quantity-label' partitioner needs a 'label' column")
        sizes = pareto_sizes(n, num_devices, quantity_beta, rng, min_partition_size)
        nonempty = np.flatnonzero(sizes > 0)
        p = InnerDirichletPartitioner(partition_sizes=[int(s) for s in sizes[nonempty]], partition_by="label",
                                      alpha=float(dirichlet_alpha), shuffle=True, seed=seed)
        got = _indices_from(p, _index_dataset(train, ("label",)), len(nonempty), "_partition_id_to_indices")
        parts = [np.empty(0, dtype=np.int64)] * num_devices
        for dev, rows in zip(nonempty, got):
            parts[dev] = rows
    else:  # natural
        ids, devices = natural_ids(train, device_column)
        k = len(ids)
        if num_devices < k:
            raise ValueError(f"the data has {k} natural devices (distinct values of column {device_column!r}) "
                             f"but --num-devices is {num_devices}: set --num-devices {k}"
                             + (" (or generate fewer with synthetic_devices)" if device_column == "device" else ""))
        # == NaturalIdPartitioner(partition_by=device_column) (a test checks it): grouped with
        # numpy, as the flwr-datasets one loops in Python behind a tqdm progress bar.
        order = np.argsort(devices, kind="stable")
        bounds = np.searchsorted(devices[order], np.arange(num_devices + 1))
        parts = [order[bounds[d]:bounds[d + 1]] for d in range(num_devices)]
    return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]
