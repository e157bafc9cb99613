"""Correlated noise across rounds: banded matrix factorization (``--bands`` b > 1).

The server's noisy sum of round t is ``x_t + sigma * clip * (C^-1 z)_t`` instead of
``x_t + sigma * clip * z_t``, with z_t ~ N(0, I) fresh from the run's secure source each round
and C the column-normalised b-banded lower-triangular Toeplitz strategy whose coefficients
jax-privacy optimises for the prefix sums of the run's T rounds
(``jax_privacy.matrix_factorization.toeplitz.optimize_banded_toeplitz``, mean squared error);
jax-privacy's streaming inverse (``toeplitz.inverse_as_streaming_matrix``, Algorithm 9 of
Choquette-Choo et al. 2023) computes the rows of C^-1 z one round at a time. The releases are
a post-processing of ``C x + sigma * clip * z`` (multiply by C), the matrix mechanism
(Denisov et al. 2022; Choquette-Choo et al. 2023, "(Amplified) Banded Matrix Factorization",
arXiv:2306.08153).

Privacy: every column of C has L2 norm at most 1 and is zero outside rows j .. j + b - 1, so
under cyclic selection (:class:`server.selection.ActivitySelector` with ``bands``: two rounds a
unit can take part in are at least b apart) the columns of different participations do not
overlap and each participation is one Gaussian mechanism of noise multiplier sigma on the unit's
clipped contribution; with the Poisson sampling inside the round's group, a unit's rounds compose
as DP-SGD's over the ceil(T / b) rounds it can join (Theorem 4 of arXiv:2306.08153;
``jax_privacy.experimental.accounting.amplified_bandmf_event``). The ledger charges exactly those
rounds, so its epsilon is that event's.

The stream's state (the last b - 1 noise rows) is secret: with it, the noise of released rounds
could be subtracted. It lives only in the server's memory and is never written to the run
directory; a resumed run starts a new stream at its first round (the strategy becomes
block-diagonal, still b-banded with columns of norm at most 1: the same privacy, less noise
cancellation across the restart). A round with no release (an empty cohort) still advances the
stream, so that participations stay b releases apart.
"""

from __future__ import annotations

import functools
import logging
from typing import Mapping

import numpy as np

from dp.secure_random import NoiseSource

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=8)
def banded_strategy(bands: int, rounds: int) -> tuple[float, ...]:
    """The b Toeplitz coefficients (c_0 .. c_{b-1}, L2 norm 1, non-negative, non-increasing) of the
    b-banded strategy C that jax-privacy optimises for the mean squared error of the prefix sums
    of ``rounds`` releases (``toeplitz.optimize_banded_toeplitz``; b = 1 is DP-SGD, C = I).

    Raises
    ------
    ValueError
        If ``bands`` is not in [1, rounds].
    """
    if not 1 <= bands <= rounds:
        raise ValueError(f"bands must be in [1, rounds = {rounds}], got {bands}")
    if bands == 1:
        return (1.0,)
    import jax
    from jax_privacy.matrix_factorization import toeplitz

    with jax.enable_x64(True):
        coef = np.asarray(toeplitz.optimize_banded_toeplitz(n=int(rounds), bands=int(bands)), dtype=np.float64)
    return tuple(float(c) for c in coef)


def strategy_matrix(coef, n: int) -> np.ndarray:
    """C [n, n]: the column-normalised banded Toeplitz strategy of ``coef`` over ``n`` releases
    (jax-privacy's ``inverse_as_streaming_matrix(coef, column_normalize_for_n=n)`` inverted; for tests
    and the report)."""
    return np.linalg.inv(_inverse_stream(tuple(coef), n).materialize_numpy(n))


class _inverse_stream:
    """jax-privacy's streaming C^-1 for ``coef`` over ``n`` releases, in float64."""

    def __init__(self, coef: tuple[float, ...], n: int):
        import jax
        import jax.numpy as jnp
        from jax_privacy.matrix_factorization import toeplitz

        self._jax, self._jnp = jax, jnp
        with jax.enable_x64(True):
            self.matrix = toeplitz.inverse_as_streaming_matrix(jnp.asarray(coef, dtype=jnp.float64),
                                                               column_normalize_for_n=int(n))
        self.state = None

    def next(self, z: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        jax, jnp = self._jax, self._jnp
        with jax.enable_x64(True):
            value = {k: jnp.asarray(v, dtype=jnp.float64) for k, v in z.items()}
            if self.state is None:
                self.state = self.matrix.init_multiply(value)
            out, self.state = self.matrix.multiply_next(value, self.state)
            return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}

    def materialize_numpy(self, n: int) -> np.ndarray:
        with self._jax.enable_x64(True):
            return np.asarray(self.matrix.materialize(n), dtype=np.float64)


class BandedNoise:
    """The server's noise rows (C^-1 z)_t over a run's rounds (see the module docstring).

    Parameters
    ----------
    bands : int
        b >= 2.
    rounds : int
        T, the run's planned rounds (the strategy is optimised for T; a stream that starts at round
        r > 1, after a resume, covers the T - r + 1 rounds left).
    noise : dp.secure_random.NoiseSource
        The run's secret source of z.

    Attributes
    ----------
    coef : tuple of float
        The strategy's Toeplitz coefficients (:func:`banded_strategy`).
    first_round : int or None
        The round the stream started at (None before the first draw).
    """

    def __init__(self, bands: int, rounds: int, noise: NoiseSource):
        self.bands, self.rounds, self.noise = int(bands), int(rounds), noise
        self.coef = banded_strategy(self.bands, self.rounds)
        self.first_round: int | None = None
        self._next_round = None
        self._stream: _inverse_stream | None = None

    def draw(self, round_: int, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        """Row ``round_`` of C^-1 z, one array per key of ``shapes`` (float64, unit variance scale: the caller
        multiplies by sigma times the clip norm). Rounds skipped since the last draw (no release) are drawn
        and discarded, so the rows stay aligned with the rounds.

        Raises
        ------
        ValueError
            If ``round_`` was drawn already or lies beyond the planned rounds.
        """
        round_ = int(round_)
        if self._stream is None:
            if not 1 <= round_ <= self.rounds:
                raise ValueError(f"round {round_} is outside the run's {self.rounds} rounds")
            self.first_round = self._next_round = round_
            self._stream = _inverse_stream(self.coef, self.rounds - round_ + 1)
            if round_ > 1:
                log.info("correlated noise (BandMF, %d bands) starts a new stream at round %d: the noise of earlier "
                         "rounds is never stored, so it does not carry over a resume", self.bands, round_)
        if round_ < self._next_round or round_ > self.rounds:
            raise ValueError(f"round {round_}'s correlated noise cannot be drawn (next round {self._next_round}, "
                             f"{self.rounds} planned): each round's row is drawn once, in order")
        while True:
            z = {k: self.noise.normal_numpy(tuple(shape), 1.0) for k, shape in shapes.items()}
            row = self._stream.next(z)
            self._next_round += 1
            if self._next_round > round_:
                return row


def noised_sums(totals: Mapping[str, np.ndarray], std: float, noise: NoiseSource, correlated: BandedNoise | None,
                round_: int) -> dict[str, np.ndarray]:
    """``totals`` ({key: sum array}) plus the round's server noise of scale ``std`` (sigma times the clip norm):
    ``std`` times row ``round_`` of C^-1 z with ``correlated``, else a fresh N(0, std^2) per array from
    ``noise``; unchanged when ``std`` is 0."""
    if std <= 0:
        return dict(totals)
    if correlated is not None:
        rows = correlated.draw(round_, {k: v.shape for k, v in totals.items()})
        return {k: s + std * rows[k] for k, s in totals.items()}
    return {k: s + noise.normal_numpy(s.shape, std) for k, s in totals.items()}


def correlated_noise(cfg, noise: NoiseSource) -> BandedNoise | None:
    """The run's :class:`BandedNoise` when ``cfg.bands`` > 1, else None (independent noise each round; also with
    ``cfg.bands_noise == "independent"``, cyclic selection without the correlation)."""
    if int(getattr(cfg, "bands", 1)) <= 1 or getattr(cfg, "bands_noise", "correlated") != "correlated":
        return None
    return BandedNoise(cfg.bands, cfg.rounds, noise)
