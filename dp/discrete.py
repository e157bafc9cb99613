"""Distributed discrete noise for secure aggregation: rotation, scaling, conditional rounding, Skellam
noise, modular wrap-around, and the Skellam mechanism's privacy bound.

A device turns each of its examples' clipped gradients g_i (L2 norm <= C, d floats) into an
integer vector, sums them, adds its share of Skellam noise and reduces mod 2^b; secure
aggregation (:mod:`mechanisms.secagg`) then reveals only the sum mod 2^b over the cohort, which the
server decodes (:func:`decode`). In order (Kairouz, Liu & Steinke 2021, "The Distributed Discrete
Gaussian Mechanism for Federated Learning with Secure Aggregation", Section 4; Agarwal, Kairouz &
Liu 2021, "The Skellam Mechanism for Differentially Private Federated Learning", Algorithm 1):

1. pad to D = 2^ceil(log2 d) and rotate with a randomised Walsh-Hadamard transform
   ``x -> H diag(s) x / sqrt(D)`` (s: public random signs, the same on every device in a round;
   orthogonal, so norms are kept), which spreads each vector over all coordinates;
2. scale by gamma (integer units per gradient unit), so that a clipped example has norm <= gamma C;
3. round each coordinate up or down at random (up with probability equal to its fractional part),
   redrawing the rounding of an example until its L2 norm is at most
   ``Delta_2 = sqrt((gamma C)^2 + D/4 + sqrt(2 ln(1/beta)) (gamma C + sqrt(D)/2))``
   (conditional randomised rounding; the bound holds with probability >= 1 - beta for one draw,
   Kairouz et al. 2021, Theorem 2 / Lemma 27), so that adding or removing one example changes the
   integer sum by at most Delta_2 in L2 (exactly, not with high probability) and at most
   ``Delta_1 = min(sqrt(D) Delta_2, Delta_2^2)`` in L1 (an integer vector has |v| <= v^2 per coordinate);
4. add Skellam noise Sk(v) = Poisson(v/2) - Poisson(v/2) (variance v per coordinate); a sum of
   independent Skellam variables is Skellam with the summed variance, so devices that each add
   mu / n_min give the surviving sum at least mu whenever at least n_min of them are in it;
5. reduce mod 2^b (b bits per coordinate on the wire).

Privacy (the integer sum before the modular reduction, which is post-processing): the Skellam
mechanism of per-coordinate variance mu on integer vectors of L2 / L1 sensitivity Delta_2 / Delta_1
is (alpha, eps(alpha))-RDP for every integer alpha > 1 with

    eps(alpha) <= alpha Delta_2^2 / (2 mu) + min(((2 alpha - 1) Delta_2^2 + 6 Delta_1) / (4 mu^2), 3 Delta_1 / (2 mu))

(Agarwal, Kairouz & Liu 2021, Theorem 3.5, with mu the variance). Its first branch is
(xi, rho)-zCDP at integer orders with rho = Delta_2^2 / (2 mu) + Delta_2^2 / (2 mu^2) and
xi = (6 Delta_1 - Delta_2^2) / (4 mu^2): :func:`skellam_event` returns that as a dp-accounting
``ZCDpEvent``, and :mod:`dp.accounting` composes a history holding one at integer orders only
(the theorem's orders). The variance added by the rounding's bias and the wrap-around only cost
utility: the modulus 2^b is chosen so that the sum's coordinates stay within it with a margin of
``k`` standard deviations (:func:`choose_scale`), and a wrapped coordinate is decoded wrongly, not
less privately.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dp.secure_random import NoiseSource

#: beta of the conditional rounding (Kairouz et al. 2021 and TensorFlow Federated's default, e^-1/2):
#: a draw exceeds the bound with probability at most beta, then is redrawn.
ROUNDING_BETA = math.exp(-0.5)
#: the most redraws of one example's rounding before giving up (each fails with probability <= beta)
MAX_ROUNDING_TRIES = 200


def padded_dimension(d: int) -> int:
    """D = 2^ceil(log2 d), the rotation's dimension (>= 1) for ``d`` coordinates."""
    if d < 1:
        raise ValueError(f"dimension must be >= 1, got {d}")
    return 1 << (int(d) - 1).bit_length()


def rotation_signs(seed: bytes, dimension: int) -> torch.Tensor:
    """The D random signs (+1 / -1, float64) of a round's rotation, from a public 32-byte ``seed``
    (the server draws it and sends it with the round; every device uses the same rotation).
    The signs come from SHAKE-256 of the seed, so they are the same on every machine."""
    import hashlib

    raw = np.frombuffer(hashlib.shake_256(b"dpfl rotation" + bytes(seed)).digest((dimension + 7) // 8), dtype=np.uint8)
    bits = np.unpackbits(raw)[:dimension]
    return torch.from_numpy(1.0 - 2.0 * bits.astype(np.float64))


def _hadamard(x: torch.Tensor) -> torch.Tensor:
    """The unnormalised Walsh-Hadamard transform of each row of ``x`` [B, D] (D a power of 2)."""
    b, dim = x.shape
    h = 1
    y = x.clone()
    while h < dim:
        y = y.view(b, dim // (2 * h), 2, h)
        a, c = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + c, a - c), dim=2).view(b, dim)
        h *= 2
    return y


def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``H diag(signs) x / sqrt(D)`` for each row of ``x`` [B, d] (zero-padded to D = len(signs)); [B, D] float64."""
    b, d = x.shape
    dim = signs.numel()
    padded = torch.zeros((b, dim), dtype=torch.float64)
    padded[:, :d] = x.to(torch.float64)
    return _hadamard(padded * signs) / math.sqrt(dim)


def unrotate(y: torch.Tensor, signs: torch.Tensor, d: int) -> torch.Tensor:
    """The inverse of :func:`rotate` for each row of ``y`` [B, D], truncated to ``d`` coordinates; [B, d] float64."""
    dim = signs.numel()
    return (_hadamard(y.to(torch.float64)) / math.sqrt(dim) * signs)[:, :d]


def rounded_l2_bound(scaled_norm: float, dimension: int, beta: float = ROUNDING_BETA) -> float:
    """Delta_2: the L2 norm a conditionally rounded vector of norm <= ``scaled_norm`` (gamma C) in
    ``dimension`` D coordinates may have: sqrt(c^2 + D/4 + sqrt(2 ln(1/beta)) (c + sqrt(D)/2))
    (Kairouz, Liu & Steinke 2021, Theorem 2)."""
    c, dim = float(scaled_norm), float(dimension)
    return math.sqrt(c * c + dim / 4.0 + math.sqrt(2.0 * math.log(1.0 / beta)) * (c + math.sqrt(dim) / 2.0))


def l1_bound(l2: float, dimension: int) -> float:
    """Delta_1 <= min(sqrt(D) Delta_2, Delta_2^2) for integer vectors of L2 norm <= Delta_2 in D coordinates."""
    return min(math.sqrt(dimension) * l2, l2 * l2)


def conditional_round(x: torch.Tensor, bound: float, noise: NoiseSource) -> torch.Tensor:
    """Randomised rounding of each row of ``x`` [B, D] (float64), each row redrawn until its L2 norm is
    <= ``bound`` (Kairouz et al. 2021, conditional randomised rounding); [B, D] int64.

    Raises
    ------
    RuntimeError
        If a row still exceeds the bound after :data:`MAX_ROUNDING_TRIES` draws (its norm before
        rounding must have exceeded the clip: a bug, since each draw fails with probability <= beta).
    """
    floor = torch.floor(x)
    frac = x - floor
    out = torch.empty_like(x, dtype=torch.int64)
    todo = torch.arange(x.shape[0])
    for _ in range(MAX_ROUNDING_TRIES):
        if todo.numel() == 0:
            return out
        u = torch.from_numpy(noise.uniform(todo.numel() * x.shape[1]).reshape(todo.numel(), x.shape[1]))
        r = floor[todo] + (u < frac[todo]).to(torch.float64)
        ok = torch.linalg.vector_norm(r, dim=1) <= bound
        out[todo[ok]] = r[ok].to(torch.int64)
        todo = todo[~ok]
    if todo.numel() == 0:
        return out
    raise RuntimeError(f"conditional rounding: {todo.numel()} rows exceed the norm bound {bound:g} after "
                       f"{MAX_ROUNDING_TRIES} draws (their norm before rounding exceeds the scaled clip)")


def skellam(shape: tuple[int, ...], variance: float, noise: NoiseSource) -> np.ndarray:
    """Skellam noise of per-coordinate ``variance`` v: Poisson(v/2) - Poisson(v/2), int64 of ``shape``.

    The Poisson draws are numpy's (PTRS, Hoermann 1993, in floating point: not an exact sampler) on a
    Philox stream keyed by 128 bits from the secure source ``noise`` (never recorded), so nobody can
    replay them; Philox is not a cryptographic generator, but no single device's draw is ever released
    (the server sees only the masked sum). ``variance`` 0 gives zeros.
    """
    if variance < 0 or not math.isfinite(variance):
        raise ValueError(f"Skellam variance must be finite and >= 0, got {variance!r}")
    if variance == 0:
        return np.zeros(shape, dtype=np.int64)
    key = np.frombuffer(noise.bytes(16), dtype=np.uint64)
    gen = np.random.Generator(np.random.Philox(key=key))
    lam = variance / 2.0
    return gen.poisson(lam, size=shape).astype(np.int64) - gen.poisson(lam, size=shape).astype(np.int64)


def choose_scale(max_grad_norm: float, dimension: int, max_examples: float, noise_multiplier: float,
                 bits: int, k: float = 4.0, noise_inflation: float = 1.0) -> float:
    """gamma, the scale (integer units per gradient unit), so that the decoded sum fits in 2^b.

    After rotation a coordinate of the round's sum has standard deviation at most
    ``sqrt((gamma N C)^2 / D + r mu + N / 4)`` (N C bounds the sum of N clipped examples in L2, the
    rotation spreads it evenly; mu = (sigma Delta_2)^2 is the calibrated noise variance and r =
    ``noise_inflation`` the most the survivors' noise can exceed it, n / n_min; N / 4 bounds the
    rounding's variance); gamma is the largest value with
    k of these standard deviations inside the half range 2^(b-1) (the k-stddev rule of Kairouz et al.
    2021, Section 5, and TensorFlow Federated's ``ddp_secure_aggregator``). Public inputs only.

    Parameters
    ----------
    max_grad_norm : float
        C.
    dimension : int
        D, the padded dimension.
    max_examples : float
        N, a public bound on the examples summed in one round.
    noise_multiplier : float
        sigma (the noise std over the L2 sensitivity).
    bits : int
        b, bits per coordinate (the modulus is 2^b).
    k : float
        Standard deviations of margin.

    Raises
    ------
    ValueError
        If the bits leave no room for the rounding (gamma C would be below sqrt(D)/2, the rounding
        error's scale): raise ``--secure-bits``.
    """
    n, dim, c = max(float(max_examples), 1.0), int(dimension), float(max_grad_norm)

    def half_range_needed(gamma: float) -> float:  # k standard deviations of a coordinate of the sum
        l2 = rounded_l2_bound(gamma * c, dim)
        return k * math.sqrt((gamma * n * c) ** 2 / dim + noise_inflation * (noise_multiplier * l2) ** 2 + n / 4.0)

    lo, hi = 0.0, 2.0 ** bits / c
    for _ in range(200):  # the margin grows with gamma: bisect for the largest gamma that fits
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if half_range_needed(mid) <= 2.0 ** (bits - 1) else (lo, mid)
    gamma = lo
    if gamma * c < math.sqrt(dim) / 2.0:
        raise ValueError(
            f"--secure-bits {bits} is too few for {dim} coordinates and up to {n:.0f} examples per round: the "
            f"scaled clip would be {gamma * c:.3g}, below the rounding error's scale {math.sqrt(dim) / 2:.3g}; "
            "raise --secure-bits")
    return gamma


def wrap(x: np.ndarray, bits: int) -> np.ndarray:
    """``x`` (integers) mod 2^b as uint32 (b <= 32)."""
    return (np.asarray(x, dtype=np.int64) & ((1 << bits) - 1)).astype(np.uint32)


def centred(x: np.ndarray, bits: int) -> np.ndarray:
    """The representative of ``x`` mod 2^b in [-2^(b-1), 2^(b-1)) as int64."""
    v = np.asarray(x, dtype=np.int64) & ((1 << bits) - 1)
    return np.where(v >= (1 << (bits - 1)), v - (1 << bits), v)


def skellam_event(l2: float, l1: float, variance: float):
    """The dp-accounting event of one Skellam release: ``ZCDpEvent(rho, xi)`` with
    rho = Delta_2^2 / (2 mu) + Delta_2^2 / (2 mu^2), xi = max(0, (6 Delta_1 - Delta_2^2) / (4 mu^2))
    (Agarwal, Kairouz & Liu 2021, Theorem 3.5, first branch; valid at integer RDP orders, which is how
    :mod:`dp.accounting` composes a history that holds it).

    Parameters
    ----------
    l2, l1 : float
        Delta_2 and Delta_1, the integer vectors' L2 and L1 sensitivities.
    variance : float
        mu, the per-coordinate variance of the noise in the sum (> 0).
    """
    from dp_accounting import dp_event

    if not variance > 0:
        raise ValueError(f"the Skellam variance must be > 0, got {variance!r}")
    mu = float(variance)
    rho = l2 * l2 / (2.0 * mu) + l2 * l2 / (2.0 * mu * mu)
    xi = max(0.0, (6.0 * l1 - l2 * l2) / (4.0 * mu * mu))
    return dp_event.ZCDpEvent(rho=float(rho), xi=float(xi))


def skellam_rdp(alpha: int, l2: float, l1: float, variance: float) -> float:
    """eps(alpha) of Theorem 3.5 of Agarwal, Kairouz & Liu 2021 (both branches), for tests and the report."""
    a, mu = float(alpha), float(variance)
    return a * l2 * l2 / (2 * mu) + min(((2 * a - 1) * l2 * l2 + 6 * l1) / (4 * mu * mu), 3 * l1 / (2 * mu))
