"""Poisson sampling of local batches (the sampling the accountants assume).

Each step includes every example independently with probability ``sample_rate``, so batch
sizes vary and may be zero; the DP-SGD update divides by the *expected* batch size
``sample_rate * n``, never by the realised one (Abadi et al. 2016, Sec. 3.1; the
add/remove-one analysis of the subsampled Gaussian assumes exactly this).
"""

from __future__ import annotations

import math

import numpy as np


def sample_rate_for(num_examples: int, expected_batch_size: float) -> float:
    """Poisson inclusion probability q = min(1, B / n) for an expected batch of B examples out of n.

    Raises
    ------
    ValueError
        If ``num_examples`` < 1 or ``expected_batch_size`` <= 0.
    """
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    if expected_batch_size <= 0:
        raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
    return min(1.0, float(expected_batch_size) / float(num_examples))


def steps_for(num_examples: int, expected_batch_size: float, epochs: float) -> int:
    """Number of Poisson steps that make ``epochs`` passes in expectation: ceil(E * n / B), >= 1 if E > 0."""
    if epochs <= 0:
        return 0
    return max(1, math.ceil(epochs * num_examples / float(expected_batch_size)))


def poisson_batches(num_examples: int, sample_rate: float, steps: int, rng: np.random.Generator):
    """Yield ``steps`` Poisson-sampled batches of row indices.

    Parameters
    ----------
    num_examples : int
        n, the examples the device holds.
    sample_rate : float
        q in [0, 1].
    steps : int
        Number of batches.
    rng : numpy.random.Generator
        Source of randomness (seeded by the caller).

    Yields
    ------
    numpy.ndarray, shape [B_t], int64
        Indices of the examples in batch t; B_t ~ Binomial(n, q), possibly 0.
    """
    for _ in range(steps):
        mask = rng.random(num_examples) < sample_rate
        yield np.flatnonzero(mask).astype(np.int64)
