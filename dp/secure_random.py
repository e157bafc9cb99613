"""The secret randomness of DP: Gaussian noise and the sampling decisions the accountant assumes.

Every draw the privacy analysis treats as secret (the DP-SGD noise, the aggregate noise, the
device-level noise, Poisson batches, Poisson cohorts, example sampling in the aggregate
placement) comes from a :class:`NoiseSource`. By default it is a cryptographically secure
generator keyed by 256 bits of operating-system entropy (``os.urandom``) that is never
written anywhere: the ChaCha20 stream cipher (Bernstein 2008; RFC 8439) run over zeros gives
the random bits, through the ``cryptography`` package (OpenSSL). Nothing in a run directory,
a message or a log lets anyone regenerate it; in particular the run's ``--seed`` (which drives
partitioning, initialisation and splits) does not.

``NoiseSource(seed)`` with an integer seed is the reproducible variant (``--reproducible-noise``,
for tests and debugging): the key is derived from the seed, so the noise can be regenerated
and subtracted by anyone who knows it. A run using it is NOT private, and its report says so
in its first line.

Gaussian samples are made by the Box-Muller transform (Box & Muller 1958) from a 53-bit
uniform (radius) and a 32-bit uniform (angle), in float64, then rounded to the target dtype;
the largest magnitude it can produce is sqrt(-2 ln 2^-54) ~ 8.7 standard deviations. Floating-point attacks on the
low-order bits of Gaussian samples (Jin et al. 2021, "Are we there yet? Timing and
floating-point attacks on differential privacy systems") are not mitigated.
"""

from __future__ import annotations

import hashlib
import os
import struct

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_CHUNK = 1 << 20  # Gaussian pairs per keystream request (bounds the float64 temporaries)
_MASK53 = (1 << 53) - 1


class NoiseSource:
    """A source of secret random bits, Gaussian noise and Bernoulli decisions.

    Parameters
    ----------
    seed : int, optional
        None (default): secure, keyed by ``os.urandom(32)``, never recorded. An integer:
        reproducible from that seed (NOT private; for tests and debugging only).

    Notes
    -----
    One object may be used from one thread at a time. Every call reads a fresh part of the
    keystream (a new ChaCha20 nonce per call), so draws never repeat.
    """

    def __init__(self, seed: int | None = None):
        self.reproducible = seed is not None
        if seed is None:
            self._key = os.urandom(32)
        else:
            self._key = hashlib.sha256(f"dpfl reproducible noise {int(seed)}".encode()).digest()
        self._calls = 0

    def __repr__(self) -> str:  # never shows the key
        return f"NoiseSource(reproducible={self.reproducible})"

    def __reduce__(self):  # a secure source never travels (pickling would copy its key)
        raise TypeError("a NoiseSource cannot be pickled: its key must not leave the process")

    # ------------------------------------------------------------------ raw bits
    def bytes(self, n: int) -> bytes:
        """``n`` random bytes (the ChaCha20 keystream under a fresh nonce)."""
        self._calls += 1
        # 16-byte nonce of cryptography's ChaCha20: 4-byte block counter (0) + 12-byte nonce.
        nonce = b"\0\0\0\0" + struct.pack("<QI", self._calls, 0)
        enc = Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()
        return enc.update(bytes(n))

    def uniform(self, n: int) -> np.ndarray:
        """``n`` independent uniforms in the open interval (0, 1), float64 (53 random bits each)."""
        if n <= 0:
            return np.empty(0, dtype=np.float64)
        x = np.frombuffer(self.bytes(8 * n), dtype=np.uint64)
        return ((x >> np.uint64(11)).astype(np.float64) + 0.5) * (2.0**-53)

    def random(self, n: int) -> np.ndarray:
        """Alias of :meth:`uniform` (the ``numpy.random.Generator.random`` call the samplers make)."""
        return self.uniform(n)

    # ------------------------------------------------------------------ distributions
    def standard_normal(self, n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``n`` independent N(0, 1) samples as a tensor of ``dtype`` (Box-Muller, computed in float64).

        Each pair of samples uses a 53-bit uniform for the radius (the tails) and a 32-bit
        uniform for the angle: 12 keystream bytes per pair.
        """
        out = torch.empty(n, dtype=dtype)
        for start in range(0, n, 2 * _CHUNK):
            m = min(2 * _CHUNK, n - start)
            pairs = (m + 1) // 2
            buf = bytearray(self.bytes(12 * pairs))
            a = torch.frombuffer(buf, dtype=torch.int64, count=pairs)
            b = torch.frombuffer(buf, dtype=torch.int32, count=pairs, offset=8 * pairs)
            u1 = a.bitwise_and_(_MASK53).to(torch.float64).add_(0.5).mul_(2.0**-53)
            r = u1.log_().mul_(-2.0).sqrt_()
            theta = b.to(torch.float64).add_(2147483648.5).mul_(2.0 * np.pi / 4294967296.0)
            half = min(pairs, m)
            out[start : start + half] = r[:half] * torch.cos(theta[:half])
            if m > pairs:
                out[start + pairs : start + m] = r[: m - pairs] * torch.sin(theta[: m - pairs])
        return out

    def normal(self, shape, std: float, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """A tensor of ``shape`` with i.i.d. N(0, std^2) entries.

        Parameters
        ----------
        shape : tuple of int
        std : float
            Standard deviation (>= 0; 0 gives zeros).
        dtype : torch.dtype
        device : torch.device or str, optional
        """
        n = int(np.prod(shape)) if len(tuple(shape)) else 1
        if std == 0 or n == 0:
            return torch.zeros(shape, dtype=dtype, device=device)
        z = self.standard_normal(n, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        return z.mul_(float(std)).reshape(shape).to(dtype=dtype, device=device)

    def add_normal_(self, tensor: torch.Tensor, std: float) -> torch.Tensor:
        """Add i.i.d. N(0, std^2) noise to ``tensor`` in place; returns it."""
        if std > 0 and tensor.numel():
            tensor.add_(self.normal(tuple(tensor.shape), std, dtype=tensor.dtype, device=tensor.device))
        return tensor

    def normal_numpy(self, shape, std: float, dtype=np.float64) -> np.ndarray:
        """A numpy array of ``shape`` with i.i.d. N(0, std^2) entries."""
        n = int(np.prod(shape)) if len(tuple(shape)) else 1
        return (self.standard_normal(n).numpy() * float(std)).astype(dtype, copy=False).reshape(shape)

    def bernoulli(self, n: int, p: float | np.ndarray) -> np.ndarray:
        """``n`` independent decisions, True with probability ``p`` (a scalar or shape [n] array).

        Poisson sampling of examples, batches and cohorts (each included independently).
        """
        return self.uniform(n) < np.asarray(p, dtype=np.float64)


def noise_source(reproducible_seed: int | None) -> NoiseSource:
    """The run's noise source: secure unless ``--reproducible-noise`` (then seeded, NOT private)."""
    return NoiseSource(reproducible_seed)
