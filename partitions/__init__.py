"""Data sets and device partitions (datasets only; no task model code).

- :func:`load_data` -> :class:`NLUData`: JSONL files, a Hugging Face hub data set, or the
  built-in synthetic home-assistant set;
- :func:`partition`: device id -> row indices into ``NLUData.train`` (iid, dirichlet,
  quantity, cluster, natural);
- :mod:`partitions.continual`: the continual setting, :func:`make_stream` (arrival round of
  every example), :func:`held_at` and :func:`activity_at` under a storage cap;
- :class:`DataError`: bad input data (the CLI exits with code 2).

The ``cluster`` partitioner embeds texts with MiniLM (loaded lazily, only for it) as a
feature extractor; see :mod:`partitions.embeddings`.
"""

from partitions.continual import Stream, activity_at, held_at, make_stream
from partitions.errors import DataError
from partitions.loading import NLUData, load_data
from partitions.partitioners import PARTITIONERS, partition

__all__ = ["DataError", "NLUData", "PARTITIONERS", "Stream", "activity_at", "held_at", "load_data", "make_stream",
           "partition"]
