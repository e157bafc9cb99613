"""Data sets and device partitions (datasets only; no model code).

- :func:`load_data` -> :class:`NLUData`: JSONL files, a Hugging Face hub data set, or the
  built-in synthetic home-assistant set;
- :func:`partition`: device id -> row indices into ``NLUData.train``;
- :class:`DataError`: bad input data (the CLI exits with code 2).
"""

from partitions.errors import DataError
from partitions.loading import NLUData, load_data
from partitions.partitioners import PARTITIONERS, partition

__all__ = ["DataError", "NLUData", "PARTITIONERS", "load_data", "partition"]
