"""Device id -> its training rows, as one index (not one object per device).

A population of a million devices is a million small arrays if each device holds its own: about
100 bytes of object overhead each before a single row. :class:`DeviceIndex` holds the rows of
every device in one flat int64 array with offsets (compressed sparse rows), or, when each
device's rows are one contiguous range (the built-in synthetic set, whose rows are grouped by
device), the offsets alone: 8 bytes per device.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["DeviceIndex"]


class DeviceIndex(Sequence):
    """``index[k]``: device k's train row indices (int64 array, a read-only view).

    Parameters
    ----------
    offsets : numpy.ndarray
        Shape [K + 1], non-decreasing, ``offsets[0] == 0``: device k's rows are
        ``rows[offsets[k]:offsets[k + 1]]``.
    rows : numpy.ndarray, optional
        Shape [offsets[-1]], int64. None: device k's rows are ``offsets[k] .. offsets[k + 1] - 1``.

    Raises
    ------
    ValueError
        If the offsets are not a non-decreasing sequence from 0, or ``rows`` has the wrong length.
    """

    def __init__(self, offsets: np.ndarray, rows: np.ndarray | None = None):
        offsets = np.asarray(offsets, dtype=np.int64)
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
            raise ValueError("device offsets must be a non-decreasing sequence starting at 0")
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64)
            if rows.shape != (int(offsets[-1]),):
                raise ValueError(f"device rows: expected {int(offsets[-1])} row indices, got shape {rows.shape}")
            rows.setflags(write=False)
        offsets.setflags(write=False)
        self.offsets = offsets
        self.rows = rows

    @classmethod
    def from_arrays(cls, arrays: Iterable) -> "DeviceIndex":
        """The index of a list of per-device row arrays (their order kept)."""
        arrays = [np.asarray(a, dtype=np.int64).reshape(-1) for a in arrays]
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(a) for a in arrays])
        rows = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        return cls(offsets, rows)

    @classmethod
    def ranges(cls, sizes: np.ndarray) -> "DeviceIndex":
        """Devices whose rows are consecutive ranges of the given sizes ([K] int64), in device order."""
        offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(np.asarray(sizes, dtype=np.int64))
        return cls(offsets)

    @property
    def sizes(self) -> np.ndarray:
        """Rows per device, shape [K] int64."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, k: int) -> np.ndarray:
        k = int(k)
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(f"device {k} is not in a population of {len(self)}")
        lo, hi = int(self.offsets[k]), int(self.offsets[k + 1])
        if self.rows is None:
            return np.arange(lo, hi, dtype=np.int64)
        return self.rows[lo:hi]

    def __iter__(self):
        return (self[k] for k in range(len(self)))

    def nbytes(self) -> int:
        """Bytes the index holds."""
        return int(self.offsets.nbytes + (0 if self.rows is None else self.rows.nbytes))
