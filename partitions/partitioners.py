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
``"synthetic-natural"``
    The built-in synthetic set's own devices (its ``device`` column): device ``d`` gets the
    rows whose ``device`` is ``d``. This is ``flwr_datasets.partitioner.NaturalIdPartitioner``
    (partition_by="device") indexed by the natural id, computed with numpy (that partitioner
    loops in Python behind a progress bar); a test checks both agree.

Devices with zero examples: possible with ``"dirichlet"`` and ``"quantity"`` when
``min_partition_size`` is 0 (the default), with ``"quantity"`` when ``num_devices`` exceeds
the rows, and with ``"synthetic-natural"`` when ``max_examples`` removed all of a device's
rows or ``num_devices`` exceeds the natural devices. They are returned as empty arrays;
the server skips them (with a warning).
"""

from __future__ import annotations

import numpy as np

__all__ = ["PARTITIONERS", "partition", "pareto_sizes"]

PARTITIONERS: tuple[str, ...] = ("iid", "dirichlet", "quantity", "synthetic-natural")

_ROW = "__row"


def _column(train, name: str) -> np.ndarray:
    """One column as a numpy array (``np.asarray(ds[name])`` iterates row by row in datasets 4)."""
    return np.asarray(train.select_columns([name]).with_format("numpy")[:][name])


def _index_dataset(train, columns: tuple[str, ...] = (), order: np.ndarray | None = None):
    """A small Dataset of original row numbers (optionally permuted) plus the needed columns."""
    import datasets

    n = len(train)
    rows = np.arange(n, dtype=np.int64) if order is None else order.astype(np.int64)
    cols = {_ROW: rows}
    for c in columns:
        cols[c] = _column(train, c)[rows]
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
        raise ValueError(f"min_partition_size={min_size} times num_devices={num_devices} exceeds the "
                         f"{n} training examples: lower min_partition_size or num_devices")
    w = rng.pareto(beta, num_devices) + 1.0  # classical Pareto, x_min = 1, tail index beta
    share = w / w.sum() * rest
    sizes = np.floor(share).astype(np.int64)
    short = rest - int(sizes.sum())
    if short:
        sizes[np.argsort(-(share - sizes), kind="stable")[:short]] += 1
    return sizes + min_size


def partition(
    train,
    num_devices: int,
    partitioner: str = "iid",
    *,
    seed: int = 0,
    dirichlet_alpha: float = 0.5,
    quantity_beta: float = 1.5,
    min_partition_size: int = 0,
) -> list[np.ndarray]:
    """Assign every training row to exactly one device.

    Parameters
    ----------
    train : datasets.Dataset
        The training split (needs ``label`` for ``"dirichlet"``, ``device`` for
        ``"synthetic-natural"``).
    num_devices : int
        Number of devices (>= 1).
    partitioner : {"iid", "dirichlet", "quantity", "synthetic-natural"}
        See the module docstring.
    seed : int
        Same seed, same partition.
    dirichlet_alpha : float
        Dirichlet concentration for ``"dirichlet"`` (> 0; smaller = more label skew).
    quantity_beta : float
        Pareto tail index for ``"quantity"`` (> 0; smaller = heavier tail).
    min_partition_size : int
        Minimum examples per device for ``"iid"`` (checked), ``"dirichlet"`` (resampled up to
        10 times by flwr-datasets) and ``"quantity"`` (guaranteed). 0 allows empty devices.

    Returns
    -------
    list of numpy.ndarray
        ``result[d]``: sorted int64 row indices of device ``d``; ``len(result) == num_devices``.

    Raises
    ------
    ValueError
        Unknown partitioner (names the valid ones); ``num_devices < 1``; ``num_devices`` larger
        than the training rows for ``"iid"`` or ``"dirichlet"`` (says to lower num_devices or
        raise max_examples); a bad alpha/beta/min_partition_size; ``"synthetic-natural"`` on
        data without a ``device`` column or with fewer ``num_devices`` than natural devices;
        ``"dirichlet"`` that cannot meet ``min_partition_size``.
    """
    if partitioner not in PARTITIONERS:
        raise ValueError(f"unknown partitioner {partitioner!r}; valid: {', '.join(PARTITIONERS)}")
    if int(num_devices) != num_devices or num_devices < 1:
        raise ValueError(f"num_devices must be a positive integer, got {num_devices}")
    if min_partition_size < 0:
        raise ValueError(f"min_partition_size must be >= 0, got {min_partition_size}")
    num_devices = int(num_devices)
    n = len(train)
    rng = np.random.default_rng(seed)

    if partitioner in ("iid", "dirichlet") and num_devices > n:
        raise ValueError(
            f"num_devices={num_devices} is larger than the {n} training examples, so the {partitioner!r} "
            f"partitioner cannot give every device an example: lower num_devices, raise max_examples "
            f"(or drop the cap), or use partitioner='quantity', which allows empty devices"
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
        from flwr_datasets.partitioner import DirichletPartitioner

        if not dirichlet_alpha > 0:
            raise ValueError(f"dirichlet_alpha must be > 0, got {dirichlet_alpha}")
        if "label" not in train.column_names:
            raise ValueError("the 'dirichlet' partitioner needs a 'label' column")
        p = DirichletPartitioner(num_partitions=num_devices, partition_by="label", alpha=float(dirichlet_alpha),
                                 min_partition_size=min_partition_size, self_balancing=False, shuffle=True,
                                 seed=seed)
        try:
            parts = _indices_from(p, _index_dataset(train, ("label",)), num_devices, "_partition_id_to_indices")
        except ValueError as exc:
            if "attempts" in str(exc):
                raise ValueError(f"the Dirichlet partition (alpha={dirichlet_alpha}) left a device below "
                                 f"min_partition_size={min_partition_size} in 10 tries: lower min_partition_size "
                                 f"or num_devices, or raise dirichlet_alpha") from exc
            raise
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
    else:  # synthetic-natural
        if "device" not in train.column_names:
            raise ValueError("the 'synthetic-natural' partitioner needs the built-in synthetic data set "
                             "(a 'device' column); use 'iid', 'dirichlet' or 'quantity' for other data")
        devices = _column(train, "device").astype(np.int64)
        needed = int(devices.max()) + 1 if n else 0
        if num_devices < needed:
            raise ValueError(f"the synthetic data set has {needed} natural devices but num_devices={num_devices}: "
                             f"set num_devices to {needed} (or generate fewer with synthetic_devices)")
        # == NaturalIdPartitioner(partition_by="device") keyed by the natural id instead of its
        # rank (a test checks it): grouped with numpy, as the flwr-datasets one loops in Python
        # behind a tqdm progress bar.
        order = np.argsort(devices, kind="stable")
        bounds = np.searchsorted(devices[order], np.arange(num_devices + 1))
        parts = [order[bounds[d]:bounds[d + 1]] for d in range(num_devices)]
    return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]
