"""The continual setting: examples arrive on their device over the rounds, and a device
with a storage cap deletes its oldest examples.

Given the static partition (``devices[k]``: device k's row indices) and the number of rounds R,
:func:`make_stream` gives every example an **arrival round** in ``1 .. R``:

- a share ``initial_fraction`` of each device's examples (rounded up, at least one for a
  device that has any) is there at round 1, so round 1 has data on every non-empty device;
  which ones is a seeded random choice;
- each remaining example arrives at ``ceil(1 + (R - 1) * U)`` with ``U`` uniform in (0, 1],
  independently, i.e. in rounds ``2 .. R``. Uniform arrival times are exactly the arrival
  times of a Poisson process of constant rate conditioned on its count, so device k's
  examples form a Poisson stream of rate ``(n_k - m_k) / (R - 1)`` per round, proportional
  to its size: heavy users produce more per round. Every example has arrived by round R.
- ``R = 1``: everything arrives at round 1 (the static setting).

A device holds at most ``storage_cap`` examples (``None``: no cap): at round t it holds the
newest ``storage_cap`` of the examples that arrived at rounds ``<= t``. Examples arriving in
the same round arrive in row order (a lower row index is older), so "oldest first" is
well defined. Because holdings only ever move forward in this order, a deleted example is
never held again: this is a first-in first-out buffer.

Activity: ``a_k(t) = min(storage_cap, #{examples of k arrived at rounds <= t})``, the number of
examples device k holds at round t (:func:`activity_at`, vectorised over devices).

Determinism: the stream is a function of ``(sizes of devices, rounds, seed, initial_fraction)``
only (numpy ``default_rng([seed, 0xC0471])``, a stream of its own, so it does not move with
the partition's random numbers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Stream", "activity_at", "deleted_at", "held_at", "make_stream"]

_STREAM_SALT = 0xC0471


@dataclass(frozen=True, eq=False)
class Stream:
    """When every example arrives on its device, and the per-device storage cap.

    Attributes
    ----------
    arrival : list of numpy.ndarray
        ``arrival[k][i]``: the round (int64, 1-based) at which row ``devices[k][i]`` arrives
        on device k; aligned with ``devices[k]``.
    storage_cap : int or None
        Most examples a device holds at once (``None``: unlimited).
    """

    arrival: list
    storage_cap: int | None
    # Derived, for activity_at: per-device offsets into one sorted key array
    # key = device * stride + arrival, sorted (device-major, then arrival).
    _offsets: np.ndarray = field(init=False, repr=False, compare=False)
    _keys: np.ndarray = field(init=False, repr=False, compare=False)
    _stride: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.storage_cap is not None and (int(self.storage_cap) != self.storage_cap or self.storage_cap < 1):
            raise ValueError(f"storage_cap must be a positive integer or None, got {self.storage_cap}")
        sizes = np.array([len(a) for a in self.arrival], dtype=np.int64)
        flat = (np.concatenate([np.asarray(a, dtype=np.int64) for a in self.arrival]) if len(sizes)
                else np.zeros(0, np.int64))
        stride = int(flat.max()) + 2 if len(flat) else 2
        dev = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
        keys = np.sort(dev * stride + flat)
        object.__setattr__(self, "_offsets", np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
        object.__setattr__(self, "_keys", keys)
        object.__setattr__(self, "_stride", stride)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Stream):
            return NotImplemented
        return self.storage_cap == other.storage_cap and len(self.arrival) == len(other.arrival) and all(
            np.array_equal(a, b) for a, b in zip(self.arrival, other.arrival))

    __hash__ = None  # type: ignore[assignment]  # holds arrays

    @property
    def num_devices(self) -> int:
        return len(self.arrival)

    @property
    def rounds(self) -> int:
        """The last arrival round (the R the stream was made for, when any example arrives at R)."""
        return max((int(a.max()) for a in self.arrival if len(a)), default=1)


def make_stream(
    devices: list,
    rounds: int,
    *,
    seed: int,
    storage_cap: int | None,
    initial_fraction: float = 0.2,
) -> Stream:
    """Give every example of every device an arrival round in ``1 .. rounds``.

    Parameters
    ----------
    devices : list of numpy.ndarray
        ``devices[k]``: device k's row indices (from :func:`partitions.partition`).
    rounds : int
        R, the number of rounds (>= 1).
    seed : int
        Same seed (and device sizes), same stream.
    storage_cap : int or None
        Most examples a device holds (>= 1), or None for no cap.
    initial_fraction : float
        Share of each device's examples present at round 1, in (0, 1]; rounded up, so a
        non-empty device has at least one. 1.0 makes the stream static.

    Returns
    -------
    Stream

    Raises
    ------
    ValueError
        ``rounds < 1``, ``storage_cap < 1`` or ``initial_fraction`` outside (0, 1].
    """
    if int(rounds) != rounds or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds}")
    if not 0.0 < initial_fraction <= 1.0:
        raise ValueError(f"initial_fraction must be in (0, 1], got {initial_fraction}")
    if storage_cap is not None and (int(storage_cap) != storage_cap or storage_cap < 1):
        raise ValueError(f"storage_cap must be a positive integer or None, got {storage_cap}")
    rounds = int(rounds)
    sizes = np.array([len(d) for d in devices], dtype=np.int64)
    total = int(sizes.sum())
    rng = np.random.default_rng([int(seed) % (2**63), _STREAM_SALT])
    dev = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if len(sizes) else np.zeros(0, np.int64)
    # A random rank of each example within its device: the m_k lowest ranks are there at round 1.
    order = np.lexsort((rng.random(total), dev))
    rank = np.empty(total, dtype=np.int64)
    rank[order] = np.arange(total, dtype=np.int64) - np.repeat(starts, sizes)
    initial = np.where(sizes > 0, np.clip(np.ceil(initial_fraction * sizes - 1e-9), 1, sizes), 0).astype(np.int64)
    u = 1.0 - rng.random(total)  # uniform in (0, 1]
    later = np.ceil(1.0 + (rounds - 1) * u - 1e-12).astype(np.int64)
    arrival = np.where(rank < np.repeat(initial, sizes), 1, np.clip(later, min(2, rounds), rounds))
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return Stream(arrival=[arrival[bounds[k]:bounds[k + 1]] for k in range(len(sizes))], storage_cap=storage_cap)


def _ordered(stream: Stream, devices: list, device_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Device's rows and arrivals, oldest first (by arrival, ties by row index)."""
    rows = np.asarray(devices[device_id], dtype=np.int64)
    arr = np.asarray(stream.arrival[device_id], dtype=np.int64)
    if len(rows) != len(arr):
        raise ValueError(f"device {device_id}: {len(rows)} rows but {len(arr)} arrival rounds; "
                         "the stream was made for another partition")
    o = np.lexsort((rows, arr))
    return rows[o], arr[o]


def held_at(stream: Stream, devices: list, device_id: int, round_: int) -> np.ndarray:
    """Row indices device ``device_id`` holds at round ``round_``, oldest first.

    The examples that arrived at rounds ``<= round_``, of which the newest ``storage_cap``
    (ordered by arrival round, ties by row index). Round 0 (before the first round): none.
    """
    rows, arr = _ordered(stream, devices, device_id)
    n = int(np.searchsorted(arr, round_, side="right"))
    lo = 0 if stream.storage_cap is None else max(0, n - int(stream.storage_cap))
    return rows[lo:n]


def deleted_at(stream: Stream, devices: list, device_id: int) -> tuple[np.ndarray, np.ndarray]:
    """When each example of device ``device_id`` is deleted: ``(rows, round)``, oldest first.

    ``round[i]`` is the first round at which ``rows[i]`` is no longer held (it was pushed out
    by the cap), or 0 if it is never deleted.
    """
    rows, arr = _ordered(stream, devices, device_id)
    out = np.zeros(len(rows), dtype=np.int64)
    cap = stream.storage_cap
    if cap is not None and len(rows) > cap:
        out[: len(rows) - cap] = arr[cap:]  # pushed out when the cap-th newer example arrives
    return rows, out


def activity_at(stream: Stream, devices: list, round_: int) -> np.ndarray:
    """a_k(t) for every device: examples held at round ``round_`` (int64, shape [K]).

    ``min(storage_cap, examples arrived at rounds <= round_)``; O(K log N), a few
    milliseconds for 10,000 devices. ``devices`` is checked only for its length.
    """
    k = stream.num_devices
    if len(devices) != k:
        raise ValueError(f"the stream has {k} devices but {len(devices)} were given")
    t = int(np.clip(round_, 0, stream._stride - 1))
    ids = np.arange(k, dtype=np.int64)
    arrived = np.searchsorted(stream._keys, ids * stream._stride + t, side="right") - stream._offsets[:-1]
    if stream.storage_cap is not None:
        arrived = np.minimum(arrived, int(stream.storage_cap))
    return arrived.astype(np.int64)
