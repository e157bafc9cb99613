"""The device population of a run: the data set, device id -> its training rows, and (in the
continual setting) when each example arrives and is deleted.

Privacy-audit canaries (``canaries`` > 0 in the settings) are inserted here, after loading and
partitioning: :func:`partitions.canaries.make_canaries` draws M canaries (seeded from the run seed), each
included with probability 1/2; every included canary's ``canary_repeats`` copies are appended
to ``data.train`` (with their stable negative uids, :func:`partitions.canaries.canary_uid`) and to ONE
device's index array (a device that holds data). Excluded canaries are in no device's data.

Built once per process from the run settings (cached): the server uses it for activities,
selection and evaluation, each client process for its device's examples. Construction is
deterministic in the settings, so every process builds the same population.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from partitions.continual import Stream, activity_at, held_at, make_stream
from partitions.device_index import DeviceIndex
from partitions.loading import NLUData, load_data
from partitions.partitioners import partition


@dataclass(frozen=True)
class Population:
    """Devices and their examples.

    Attributes
    ----------
    data : NLUData
        Train/test splits and label names.
    devices : partitions.device_index.DeviceIndex
        ``devices[k]`` holds all train row indices (int64) that ever live on device k: one index
        for the population (offsets, and the rows unless each device's rows are a range), never an
        object per device.
    partitioner : str
        The partitioner actually used (``auto`` resolved).
    stream : partitions.continual.Stream or None
        Arrival rounds and storage cap in the continual setting; None when static.
    canaries : tuple of partitions.canaries.Canary
        All M audit canaries (included and excluded; labels are label NAMES); empty without
        ``--canaries``.
    canary_records : tuple of partitions.canaries.CanaryRecord
        The inserted copies (device id, uid) of the included canaries, in train-row order:
        record j is train row ``len(data.train) - len(canary_records) + j``.
    holdout : tuple[numpy.ndarray, ...]
        ``holdout[k]``: train rows device k keeps out of training (``--holdout-per-device``; see
        :func:`split_holdout`); empty arrays without a holdout. They are not in ``devices[k]``.
    """

    data: NLUData
    devices: DeviceIndex
    partitioner: str
    stream: Stream | None = None
    canaries: tuple = ()
    canary_records: tuple = ()
    holdout: tuple = ()

    def holdout_rows(self, device_id: int) -> np.ndarray:
        """Row indices (int64, into ``data.train``) that device ``device_id`` keeps out of training; empty without a holdout."""
        if not self.holdout:
            return np.zeros(0, dtype=np.int64)
        return self.holdout[device_id]

    def canary_device(self) -> dict[int, int]:
        """canary_id -> the device holding its copies (included canaries only)."""
        return {int(r.canary_id): int(r.device_id) for r in self.canary_records}

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def activity(self, round_: int = 1) -> np.ndarray:
        """a_k(t): examples each device holds at round ``round_``, shape [num_devices], int64."""
        if self.stream is None:
            return self.devices.sizes.copy()
        return activity_at(self.stream, self.devices, round_)

    def planned_activity(self, rounds: int) -> np.ndarray:
        """Activities the selection constant is calibrated on: [rounds, K] a_k(t) for t = 1..rounds
        in the continual setting (the arrival schedule), the static activities [K] otherwise."""
        if self.stream is None:
            return self.activity()
        return np.stack([self.activity(t) for t in range(1, rounds + 1)])

    def held(self, device_id: int, round_: int = 1) -> np.ndarray:
        """Train row indices device ``device_id`` holds at round ``round_`` (all of them when static)."""
        if self.stream is None:
            return self.devices[device_id]
        return held_at(self.stream, self.devices, device_id, round_)

    @cached_property
    def _uid_column(self) -> np.ndarray:
        return self.data.train_uids()

    def uids(self, rows: np.ndarray) -> np.ndarray:
        """Stable example ids (``uid`` column) of train rows (the column is read once per process)."""
        return self._uid_column[np.asarray(rows, dtype=np.int64)]


def population_key(cfg) -> tuple:
    """The settings that determine the population (hashable, for caching): the ``data`` setting
    group (:meth:`settings.config.RunConfig.group`) and the few others that shape it.

    Returns
    -------
    tuple
        ``(data group, seed, rounds, canaries, canary_repeats, holdout_per_device)``.
    """
    return (
        cfg.group("data"),
        cfg.seed,
        cfg.rounds,
        int(getattr(cfg, "canaries", 0) or 0),
        int(getattr(cfg, "canary_repeats", 1) or 1),
        float(getattr(cfg, "holdout_per_device", 0.0) or 0.0),
    )


@lru_cache(maxsize=2)
def population_for_key(key: tuple) -> Population:
    """Build the population for a :func:`population_key` (cached per process)."""
    data_group, seed, rounds, n_canaries, canary_repeats, holdout_fraction = key
    d = dict(data_group)
    data_dir, dataset, partitioner, device_column = d["data_dir"], d["dataset"], d["partitioner"], d["device_column"]
    num_devices = d["num_devices"]
    data = load_data(
        data_dir=data_dir,
        dataset=dataset,
        text_column=d["text_column"],
        label_column=d["label_column"],
        max_examples=d["max_examples"],
        seed=seed,
        synthetic_devices=num_devices,
        device_column=device_column if (data_dir or dataset) and partitioner == "natural" else None,
    )
    if d.get("oos_label") or (d.get("oos_holdout_intents") or 0) > 0:
        from partitions.out_of_scope import split_out_of_scope

        data = split_out_of_scope(data, d.get("oos_label"), float(d.get("oos_holdout_intents") or 0.0),
                                  int(d.get("oos_split_seed") or 0))
    if partitioner == "auto":
        partitioner = "natural" if device_column in data.train_columns else "iid"
    generated = data.generated_train
    if generated is not None and partitioner == "natural" and device_column == "device":
        devices = generated.index  # the synthetic set's natural devices: rows grouped by device, nothing to build
    else:
        devices = DeviceIndex.from_arrays(partition(
            data.train,
            num_devices,
            partitioner,
            seed=seed,
            dirichlet_alpha=d["dirichlet_alpha"],
            quantity_beta=d["quantity_beta"],
            device_column=device_column,
            num_clusters=d["num_clusters"],
        ))
    holdout: tuple = ()
    if holdout_fraction > 0:
        train, holdout = split_holdout(tuple(devices), holdout_fraction, seed, data.train_uids())
        devices = DeviceIndex.from_arrays(train)
    canaries, records = (), ()
    if n_canaries:
        data, devices, canaries, records = insert_canaries(data, tuple(devices), n_canaries, canary_repeats, seed)
        devices = DeviceIndex.from_arrays(devices)
    stream = None
    if d["setting"] == "continual":
        stream = make_stream(devices, rounds, seed=seed, storage_cap=d["storage_cap"])
    return Population(data=data, devices=devices, partitioner=partitioner, stream=stream,
                      canaries=canaries, canary_records=records, holdout=holdout)


#: Offset mixed into the run seed for the holdout split.
HOLDOUT_SEED_OFFSET = 0x401D


def split_holdout(devices: tuple, fraction: float, seed: int, uids: np.ndarray | None = None) -> tuple[tuple, tuple]:
    """Split each device's rows into training rows and holdout rows: each example is in the holdout
    with probability ``fraction``, independently, decided by a keyed hash of (run seed, its uid).

    Membership depends on nothing but the example's id and the seed: every process, a resumed
    run and ``dpfl retrain`` see the same split, and, as long as the ids are stable labels of the
    examples, adding or removing one example changes no other example's membership. (JSONL data
    gets ``uid`` = its line's position in the file, which is stable while the file's other lines
    stay where they are.) So a holdout example is read only by the holdout evaluation and a
    training example only by training (neighbouring data sets differ in one of the two). The
    accountant treats nothing about the split as secret. Canaries are inserted after the split
    and always train. A device whose every example lands in the holdout trains on nothing
    (activity 0) and is never selected.

    Parameters
    ----------
    devices : tuple of int64 arrays
        Each device's train rows.
    fraction : float
        F in [0, 1).
    seed : int
    uids : numpy.ndarray, optional
        Stable id of every train row (``uid`` column); default: the row index.

    Returns
    -------
    (train, holdout) : two tuples of int64 arrays, one per device, each in the original row order.

    Raises
    ------
    ValueError
        If ``fraction`` is not in [0, 1).
    """
    import hashlib

    if not 0 <= fraction < 1:
        raise ValueError(f"--holdout-per-device: must be in [0, 1), got {fraction}")
    key = hashlib.blake2b(f"{int(seed)}:{HOLDOUT_SEED_OFFSET}".encode(), digest_size=16).digest()

    def held_out(uid: int) -> bool:
        h = hashlib.blake2b(str(int(uid)).encode(), digest_size=8, key=key).digest()
        return int.from_bytes(h, "big") / 2.0**64 < fraction

    train, hold = [], []
    for rows in devices:
        rows = np.asarray(rows, dtype=np.int64)
        ids = rows if uids is None else np.asarray(uids)[rows]
        mask = np.fromiter((held_out(u) for u in ids), dtype=bool, count=len(rows))
        train.append(rows[~mask])
        hold.append(rows[mask])
    return tuple(train), tuple(hold)


#: Offset mixed into the run seed for the canary draw, so it does not repeat the partition's draws.
CANARY_SEED_OFFSET = 0x5EED


def insert_canaries(data: NLUData, devices: tuple, n_canaries: int, repeats: int, seed: int):
    """Append M audit canaries' records to ``data.train`` and to their devices' index arrays.

    Canaries are drawn by :func:`partitions.canaries.make_canaries` (labels: the data's label names;
    candidate devices: those holding at least one example, all devices if none does; random
    assignment; inclusion probability 1/2; seed ``seed + CANARY_SEED_OFFSET``). Appended rows
    have ``text``, ``label`` (class id), ``uid`` (negative, stable), ``tokens``/``slots`` (all
    "O") when the data has slots, and a neutral value (-1 or "") in any other column.

    Returns
    -------
    (data, devices, canaries, records)
        The new NLUData, the new device index arrays (copies of the included canaries appended
        to their device's array), all canaries, and the inserted records.
    """
    import datasets

    from partitions.canaries import make_canaries

    names = list(data.label_names)
    with_data = [k for k, d in enumerate(devices) if len(d)] or list(range(len(devices)))
    canaries, records = make_canaries(
        n_canaries, names, with_data, repeats=repeats, seed=int(seed) + CANARY_SEED_OFFSET
    )
    if not records:
        return data, devices, tuple(canaries), ()
    label_id = {n: i for i, n in enumerate(names)}
    train = data.train
    feats = train.features
    cols: dict[str, list] = {}
    for name, feat in feats.items():
        if name == "text":
            cols[name] = [r.text for r in records]
        elif name == "label":
            cols[name] = [label_id[r.label] for r in records]
        elif name == "uid":
            cols[name] = [r.uid for r in records]
        elif name == "tokens":
            cols[name] = [r.text.split() for r in records]
        elif name == "slots":
            cols[name] = [["O"] * len(r.text.split()) for r in records]
        else:
            dtype = getattr(feat, "dtype", "string")
            cols[name] = [-1 if dtype.startswith("int") else "" for _ in records]
    extra = datasets.Dataset.from_dict(cols, features=feats)
    n0 = len(train)
    new_train = datasets.concatenate_datasets([train, extra])
    rows_of: dict[int, list[int]] = {}
    for j, r in enumerate(records):
        rows_of.setdefault(int(r.device_id), []).append(n0 + j)
    new_devices = tuple(
        np.concatenate([d, np.asarray(rows_of[k], dtype=np.int64)]) if k in rows_of else d
        for k, d in enumerate(devices)
    )
    return data.with_train(new_train), new_devices, tuple(canaries), tuple(records)


def build_population(cfg) -> Population:
    """Build (or return this process's cached) population for a RunConfig-like ``cfg``.

    Raises
    ------
    partitions.errors.DataError
        For unreadable or malformed data (names file and line).
    ValueError
        For impossible partition settings.
    """
    return population_for_key(population_key(cfg))
