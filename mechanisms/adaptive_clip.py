"""Adaptive clipping: the clip norm follows a quantile of the norms it clips (``--adaptive-clip-quantile``).

Andrew, Thakkar, McMahan & Ramaswamy 2021, "Differentially private learning with adaptive
clipping" (NeurIPS), Algorithm 1 and Theorem 1, used by three mechanisms:

* the aggregate placement (:mod:`mechanisms.aggregate`): C, the clip of each example's gradient;
  each device also counts its sampled examples whose gradient norm is at most C;
* DP-FedAvg (:mod:`mechanisms.dp_fedavg`): S, the clip of each device's update; the server
  counts the updates whose norm is at most S;
* local DP-SGD (:mod:`mechanisms.local_dpsgd`, via :func:`mechanisms.training.train_local`): C,
  moved by each device after every local step from its own noised count; the next round starts
  from the geometric mean of the devices' final C.

Each round, with the round's clip norm C_t and its quantile target gamma:

1. every clipped norm contributes b_i - 1/2 to a count, b_i = 1[norm_i <= C_t] (centred, so adding
   or removing one example or device changes the sum by at most 1/2);
2. the server adds N(0, sigma_b^2) to the sum and estimates the unclipped fraction as
   ``b = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / n + 1/2``, with n the round's public expected
   count (expected sampled examples, or the expected cohort m);
3. C_{t+1} = C_t exp(-eta_C (b - gamma)): the geometric update, which shrinks C when more than a
   gamma fraction of the norms were unclipped and grows it otherwise. Its fixed point is the
   gamma quantile of the norms. (The rule moves C on the *unclipped* fraction; the same rule on
   the clipped fraction diverges.)

Privacy (Theorem 1 of the paper; also dp-accounting's view of a vector-valued Gaussian query):
the clipped sum with noise std sigma_g C_t and the count with noise std sigma_b are one Gaussian
query on the same sampled examples (or devices) with L2 sensitivity sqrt(sigma_g^-2 +
(2 sigma_b)^-2) in units of their noise, i.e. ONE Gaussian mechanism of noise multiplier

    sigma = (sigma_g^-2 + (2 sigma_b)^-2)^(-1/2).

The ledger charges exactly that sigma (the run's ``noise_multiplier`` / ``device_noise_multiplier``,
calibrated for the target as without adaptive clipping), and the clipped sum's noise is drawn
with the larger sigma_g = (sigma^-2 - (2 sigma_b)^-2)^(-1/2) (:func:`gradient_noise_multiplier`).
C_t is a function of noised counts only: it is released (the ledger records it per event, the
devices receive it) at no further cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dp.secure_random import NoiseSource
from mechanisms.base import Calibration
from settings.config import ConfigError

#: The keys of a reply's ``clip`` record (:attr:`mechanisms.base.ReplySpec.clip`).
CLIP_COUNT = "centred-unclipped-count"
CLIP_NORM = "clip-norm"

#: sigma_b = COUNT_STDDEV_PER_SIGMA * sigma by default: (2 sigma_b)^-2 is then 1% of sigma^-2, so the
#: clipped sum's noise grows by 1/sqrt(0.99) (0.5%); Andrew et al. 2021 use sigma_b = m / 20, which is
#: the same 1% at m = 100 devices and sigma = 1.
COUNT_STDDEV_PER_SIGMA = 5.0


def count_stddev(cfg, sigma: float) -> float:
    """sigma_b: ``--clipped-count-stddev``, or :data:`COUNT_STDDEV_PER_SIGMA` times ``sigma`` (the accounted noise multiplier)."""
    if cfg.clipped_count_stddev is not None:
        return float(cfg.clipped_count_stddev)
    return COUNT_STDDEV_PER_SIGMA * float(sigma)


def gradient_noise_multiplier(sigma: float, sigma_b: float, flag: str = "--noise-multiplier") -> float:
    """sigma_g = (sigma^-2 - (2 sigma_b)^-2)^(-1/2), the clipped sum's noise multiplier when the count
    takes its share of the accounted sigma (Andrew et al. 2021, Theorem 1); ``sigma`` when it is 0
    (a zero-noise test run: nothing to share).

    Raises
    ------
    settings.config.ConfigError
        If 2 sigma_b <= sigma: the count alone would need more than the round's whole budget
        (the message names ``--clipped-count-stddev``).
    """
    if sigma <= 0:
        return float(sigma)
    if 2.0 * sigma_b <= sigma:
        raise ConfigError(f"--clipped-count-stddev {sigma_b:g} is too small for {flag} {sigma:g}: the count of "
                          f"unclipped norms would spend the whole round's privacy; give a value above {sigma / 2:g} "
                          f"(default: {COUNT_STDDEV_PER_SIGMA:g} sigma)")
    return float((sigma ** -2 - (2.0 * sigma_b) ** -2) ** -0.5)


@dataclass
class QuantileClip:
    """The clip norm C_t of a run with adaptive clipping, and its update (Andrew et al. 2021, Algorithm 1).

    Parameters
    ----------
    value : float
        C_t (gradient or update L2 norm), > 0.
    quantile : float
        gamma in (0, 1).
    learning_rate : float
        eta_C > 0.
    count_stddev : float
        sigma_b >= 0, the std of the noise on the centred count.

    Attributes
    ----------
    last_fraction : float or None
        The last noised unclipped fraction b (None before the first update).

    Notes
    -----
    n is the round's expected count, fixed before any reply (the DP estimate needs a public
    denominator): a device that fails or is rejected adds nothing to the count but stays in n,
    which pulls b towards 1/2, so with many failures and gamma far from 1/2 C settles somewhat
    off the gamma quantile (towards the median).
    """

    value: float
    quantile: float
    learning_rate: float
    count_stddev: float
    last_fraction: float | None = None

    def unclipped_fraction(self, centred_count: float, expected: float, noise: NoiseSource) -> float:
        """b = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / n + 1/2, with ``expected`` = n > 0 (public)."""
        noisy = float(centred_count)
        if self.count_stddev > 0:
            noisy += float(noise.normal_numpy((1,), self.count_stddev)[0])
        return noisy / max(float(expected), 1e-12) + 0.5

    def update(self, centred_count: float, expected: float, noise: NoiseSource) -> float:
        """C_{t+1} = C_t exp(-eta_C (b - gamma)) from the round's centred count; returns C_{t+1}.

        Parameters
        ----------
        centred_count : float
            sum_i (1[norm_i <= C_t] - 1/2) over the round's clipped norms (un-noised).
        expected : float
            n, the public expected number of norms (sampled examples, or devices m).
        noise : dp.secure_random.NoiseSource
            The run's secret source (the count's noise).
        """
        b = self.unclipped_fraction(centred_count, expected, noise)
        self.last_fraction = b
        # the exponent is bounded in practice; the clamp only keeps C finite if a count is absurd
        self.value = float(self.value * math.exp(max(-50.0, min(50.0, -self.learning_rate * (b - self.quantile)))))
        return self.value

    def state_dict(self) -> dict:
        """C_t and the last fraction (for resume)."""
        return {"value": self.value, "last_fraction": self.last_fraction}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (an empty dict keeps the starting value)."""
        if state:
            self.value = float(state["value"])
            self.last_fraction = state.get("last_fraction")


class ClipStateMixin:
    """``state_dict`` / ``load_state_dict`` of an aggregator whose ``clip`` attribute is a
    :class:`QuantileClip` or None (nothing to keep with a fixed clip norm)."""

    clip: QuantileClip | None = None

    def state_dict(self) -> dict:
        """The adaptive clip's state (none with a fixed clip norm)."""
        return {"clip": self.clip.state_dict()} if self.clip is not None else {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output."""
        if self.clip is not None:
            self.clip.load_state_dict((state or {}).get("clip") or {})


def quantile_clip(cfg, start: float, sigma: float) -> QuantileClip | None:
    """The run's :class:`QuantileClip` starting at ``start`` (None without ``--adaptive-clip-quantile``)."""
    if cfg.adaptive_clip_quantile is None:
        return None
    return QuantileClip(float(start), float(cfg.adaptive_clip_quantile), float(cfg.adaptive_clip_lr),
                        count_stddev(cfg, sigma))


def with_count_stddev(cfg, cal: Calibration, sigma_field: str) -> Calibration:
    """``cal`` plus adaptive clipping's sigma_b (``clipped_count_stddev``) for the accounted sigma of
    ``sigma_field`` (calibrated in ``cal`` or given), checked by
    :func:`mechanisms.adaptive_clip.gradient_noise_multiplier`; ``cal`` itself without adaptive clipping.

    Raises
    ------
    settings.config.ConfigError
        If sigma_b is too small for sigma.
    """
    if cfg.adaptive_clip_quantile is None:
        return cal
    sigma = cal.values.get(sigma_field, getattr(cfg, sigma_field))
    if sigma is None:
        return cal
    sigma_b = count_stddev(cfg, sigma)
    sigma_g = gradient_noise_multiplier(float(sigma), sigma_b, "--" + sigma_field.replace("_", "-"))
    if sigma_b == 0:  # a zero-noise test run (--allow-zero-noise): the count is not noised either; nothing to record
        return Calibration(cal.values, cal.notes + ("adaptive clipping with sigma = 0: the count of unclipped norms "
                                                    "is not noised (the run is not private)",))
    return Calibration({**cal.values, "clipped_count_stddev": sigma_b},
                       cal.notes + (f"adaptive clipping to the {cfg.adaptive_clip_quantile:g} quantile: count noise "
                                    f"std {sigma_b:.4g}, clipped sum's noise multiplier {sigma_g:.4f} (accounted: "
                                    f"{float(sigma):.4f})",))
