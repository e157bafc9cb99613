"""The device population of a run: the data set, and device id -> its training rows.

Built once per process from the run settings (cached): the server uses it for activities
and evaluation, each client process for its device's examples. Construction is
deterministic in the settings, so every process builds the same population.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

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
        ``devices[k]`` holds the train row indices (int64) on device k.
    partitioner : str
        The partitioner actually used (``auto`` resolved).
    """

    data: NLUData
    devices: tuple
    partitioner: str

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def activity(self) -> np.ndarray:
        """a_k: the number of training examples each device holds, shape [num_devices], int64."""
        return np.array([len(d) for d in self.devices], dtype=np.int64)


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
    )


@lru_cache(maxsize=2)
def population_for_key(key: tuple) -> Population:
    """Build the population for a :func:`population_key` (cached per process)."""
    (data_dir, dataset, text_col, label_col, max_examples, seed, num_devices, partitioner, alpha, beta) = key
    data = load_data(
        data_dir=data_dir,
        dataset=dataset,
        text_column=text_col,
        label_column=label_col,
        max_examples=max_examples,
        seed=seed,
        synthetic_devices=num_devices,
    )
    if partitioner == "auto":
        partitioner = "natural" if "device" in data.train.column_names else "iid"
    devices = partition(
        data.train,
        num_devices,
        "synthetic-natural" if partitioner == "natural" else partitioner,
        seed=seed,
        dirichlet_alpha=alpha,
        quantity_beta=beta,
    )
    return Population(data=data, devices=tuple(np.asarray(d, dtype=np.int64) for d in devices), partitioner=partitioner)


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
