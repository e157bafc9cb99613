"""The device population of a run: the data set, device id -> its training rows, and (in the
continual setting) when each example arrives and is deleted.

Built once per process from the run settings (cached): the server uses it for activities,
selection and evaluation, each client process for its device's examples. Construction is
deterministic in the settings, so every process builds the same population.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from partitions.continual import Stream, activity_at, held_at, make_stream
from partitions.loading import NLUData, load_data
from partitions.partitioners import partition


@dataclass(frozen=True)
class Population:
    """Devices and their examples.

    Attributes
    ----------
    data : NLUData
        Train/test splits and label names.
    devices : tuple[numpy.ndarray, ...]
        ``devices[k]`` holds all train row indices (int64) that ever live on device k.
    partitioner : str
        The partitioner actually used (``auto`` resolved).
    stream : partitions.continual.Stream or None
        Arrival rounds and storage cap in the continual setting; None when static.
    """

    data: NLUData
    devices: tuple
    partitioner: str
    stream: Stream | None = None

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def activity(self, round_: int = 1) -> np.ndarray:
        """a_k(t): examples each device holds at round ``round_``, shape [num_devices], int64."""
        if self.stream is None:
            return np.array([len(d) for d in self.devices], dtype=np.int64)
        return activity_at(self.stream, list(self.devices), round_)

    def held(self, device_id: int, round_: int = 1) -> np.ndarray:
        """Train row indices device ``device_id`` holds at round ``round_`` (all of them when static)."""
        if self.stream is None:
            return self.devices[device_id]
        return held_at(self.stream, list(self.devices), device_id, round_)

    def uids(self, rows: np.ndarray) -> np.ndarray:
        """Stable example ids (``uid`` column) of train rows."""
        col = self.data.train.select_columns(["uid"]).with_format("numpy")[:]["uid"]
        return np.asarray(col)[np.asarray(rows, dtype=np.int64)]


def population_key(cfg) -> tuple:
    """The settings that determine the population (hashable, for caching)."""
    return (
        cfg.data_dir,
        cfg.dataset,
        cfg.text_column,
        cfg.label_column,
        cfg.max_examples,
        cfg.seed,
        cfg.num_devices,
        cfg.partitioner,
        cfg.dirichlet_alpha,
        cfg.quantity_beta,
        cfg.device_column,
        cfg.num_clusters,
        cfg.setting,
        cfg.storage_cap,
        cfg.rounds,
    )


@lru_cache(maxsize=2)
def population_for_key(key: tuple) -> Population:
    """Build the population for a :func:`population_key` (cached per process)."""
    (
        data_dir,
        dataset,
        text_col,
        label_col,
        max_examples,
        seed,
        num_devices,
        partitioner,
        alpha,
        beta,
        device_column,
        num_clusters,
        setting,
        storage_cap,
        rounds,
    ) = key
    data = load_data(
        data_dir=data_dir,
        dataset=dataset,
        text_column=text_col,
        label_column=label_col,
        max_examples=max_examples,
        seed=seed,
        synthetic_devices=num_devices,
        device_column=device_column if (data_dir or dataset) and partitioner == "natural" else None,
    )
    if partitioner == "auto":
        partitioner = "natural" if device_column in data.train.column_names else "iid"
    devices = partition(
        data.train,
        num_devices,
        partitioner,
        seed=seed,
        dirichlet_alpha=alpha,
        quantity_beta=beta,
        device_column=device_column,
        num_clusters=num_clusters,
    )
    devices = tuple(np.asarray(d, dtype=np.int64) for d in devices)
    stream = None
    if setting == "continual":
        stream = make_stream(list(devices), rounds, seed=seed, storage_cap=storage_cap)
    return Population(data=data, devices=devices, partitioner=partitioner, stream=stream)


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
