"""DP-FedAvg: device-level DP (``--device-dp``; McMahan et al. 2018, "Learning differentially
private recurrent language models", Algorithm 1 with the fixed-denominator estimator).

Each selected device trains locally (with local DP-SGD when example-level DP is on as well,
plainly with ``--no-dp``) and replies with its trained weights. The server clips each update
``w_k - w`` to L2 norm S, sums, adds N(0, (sigma_u S)^2) once and divides by the expected
cohort size (:class:`DeviceDPAggregator`). Accounted per device, individually: one
Poisson-subsampled Gaussian (sigma_u, q_k(t)) per round for every device with q_k(t) > 0,
selected or not; the example-level events of the local DP-SGD, when on, as
:mod:`mechanisms.local_dpsgd` accounts them.

With ``--adaptive-clip-quantile`` S is the server's current estimate of that quantile of the
update norms (:mod:`mechanisms.adaptive_clip`, Andrew et al. 2021: the server counts the updates
it did not clip, noises the count and moves S); the device-level event stays (sigma_u, q_k), the
sum's noise multiplier is the larger sigma_g.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from dp.accounting import SubsampledGaussianEvent, calibrate_noise_multiplier
from dp.secure_random import NoiseSource
from mechanisms.adaptive_clip import ClipStateMixin, QuantileClip, gradient_noise_multiplier, quantile_clip, with_count_stddev
from mechanisms.base import (Aggregator, Calibration, DeviceReply, DeviceWork, Mechanism, ReplySpec, _numpy, floating_keys,
                             joinable_rounds)
from mechanisms.correlated_noise import BandedNoise, correlated_noise, noised_sums
from mechanisms.local_dpsgd import LocalDPSGD
from mechanisms.registry import register
from mechanisms.training import local_round
from nlu.model import trainable_state

#: sigma_u when device-level DP is on and neither --device-noise-multiplier nor --target-epsilon-device is given.
DEFAULT_DEVICE_NOISE_MULTIPLIER = 1.0


class DeviceDPAggregator(ClipStateMixin, Aggregator):
    """DP-FedAvg: clip each device's update to S, sum, add N(0, (sigma_u S)^2 I) once, divide by m.

    The proposal is ``w + eta * lr_factor * (sum_k clip_S(w_k - w) + N(0, (sigma_u S)^2 I)) / m``
    over the floating arrays (McMahan et al. 2018, Algorithm 1, with the fixed-denominator
    estimator), with m = :attr:`mechanisms.base.RoundPlan.expected_cohort` (a fixed
    denominator, as the Poisson-subsampled Gaussian analysis requires) and ``eta`` the server
    step size (1 for FedAvg; with FedAdam it is 1 and the strategy's optimizer takes the step).
    With no accepted reply the release is noise only (every device that could have been
    selected was accounted).

    Parameters
    ----------
    clip_norm : float
        S, the L2 bound on a device's whole update.
    noise_multiplier : float
        sigma_u.
    noise : dp.secure_random.NoiseSource
    step_size : float
        eta (see above).
    clip : mechanisms.adaptive_clip.QuantileClip, optional
        Adaptive clipping: S is ``clip.value`` this round, ``noise_multiplier`` is the sum's sigma_g,
        and :meth:`result` moves S by the noised centred count of unclipped updates over m.
    correlated : mechanisms.correlated_noise.BandedNoise, optional
        Correlated noise across rounds (``--bands``): the sum's noise is sigma_u S times row t of C^-1 z.
    """

    name = "device-dp"

    def __init__(self, clip_norm: float, noise_multiplier: float, noise: NoiseSource, step_size: float = 1.0,
                 clip: QuantileClip | None = None, correlated: BandedNoise | None = None):
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.noise = noise
        self.step_size = float(step_size)
        self.clip = clip
        self.correlated = correlated
        self.norms: list[float] = []

    def begin(self, round_, current, plan):
        super().begin(round_, current, plan)
        self.total = {k: np.zeros_like(current[k], dtype=np.float64) for k in floating_keys(current)}
        self.norms = []
        if self.clip is not None:
            self.clip_norm = self.clip.value

    def add(self, arrays: Mapping[str, np.ndarray], weight: float, clip: float | None = None) -> None:
        deltas = {k: _numpy(arrays[k]).astype(np.float64) - self.current[k] for k in self.total}
        norm = float(np.sqrt(sum(float((d * d).sum()) for d in deltas.values())))
        self.norms.append(norm)
        scale = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
        for k, d in deltas.items():
            self.total[k] += d * scale

    def result(self) -> dict[str, np.ndarray]:
        std = self.noise_multiplier * self.clip_norm
        out = dict(self.current)
        for k, s in noised_sums(self.total, std, self.noise, self.correlated, self.round).items():
            step = self.step_size * self.plan.lr_factor / self.plan.expected_cohort
            out[k] = (self.current[k] + step * s).astype(self.current[k].dtype)
        if self.clip is not None:
            centred = sum((1.0 if n <= self.clip_norm else 0.0) - 0.5 for n in self.norms)
            self.clip.update(centred, self.plan.expected_cohort, self.noise)
        return out



def calibrate_device_noise(cfg, q_max: float, delta: float) -> float:
    """sigma_u for device-level DP: the smallest that keeps a device selected with probability
    ``q_max`` (the largest q_k of the run) in each of ``cfg.rounds`` rounds (ceil(rounds / bands) under
    cyclic selection, :func:`mechanisms.base.joinable_rounds`) at or below
    ``cfg.target_epsilon_device`` (one Poisson-subsampled Gaussian per round; DP-FedAvg,
    McMahan et al. 2018). Every other device has q_k <= q_max and spends less.
    Without a target: :data:`DEFAULT_DEVICE_NOISE_MULTIPLIER`.

    Raises
    ------
    ValueError
        If the target cannot be met (the message names the settings to change).
    """
    if cfg.target_epsilon_device is None:
        return DEFAULT_DEVICE_NOISE_MULTIPLIER
    rounds = joinable_rounds(cfg)
    try:
        return calibrate_noise_multiplier(cfg.target_epsilon_device, delta, schedule=[(float(q_max), rounds)],
                                          accountant=cfg.accountant)
    except ValueError as exc:
        raise ValueError(
            f"--target-epsilon-device {cfg.target_epsilon_device:g} is unreachable for a device selected with "
            f"probability {q_max:.3g} in each of {rounds} rounds at delta {delta:g}: raise "
            f"--target-epsilon-device, lower --rounds or --cohort-size ({exc})"
        ) from exc


@register
class DPFedAvg(Mechanism):
    """Device-level DP-FedAvg on the server, over local DP-SGD (example-level DP on) or plain local training.

    Parameters
    ----------
    cfg : settings.config.RunConfig
        ``dp`` decides the devices' local training: local DP-SGD (:class:`LocalDPSGD`'s device part,
        reply and example-level events) or plain training whose reply holds ``num-examples`` alone.
    """

    name = "dp-fedavg"
    releases_on_empty_cohort = True

    def __init__(self, cfg):
        super().__init__(cfg)
        #: the example-level mechanism on the devices (None: plain local training)
        self.local = LocalDPSGD(cfg) if cfg.dp else None
        self.units = (*(self.local.units if self.local else ()), "device")
        self.reply = self.local.reply if self.local else ReplySpec("weights", privacy_record=False)
        self.holdout_noise_at = self.local.holdout_noise_at if self.local else "none"
        #: the server's adaptive clip of S (set by :meth:`aggregator`; None: S is ``--update-clip-norm``)
        self.clip: QuantileClip | None = None

    def device_part(self, work: DeviceWork) -> DeviceReply:
        """Local training; a device-level private reply carries no loss or timing."""
        if self.local is not None:
            return self.local.device_part(work)
        result = local_round(self.cfg, work, dp=False)
        return DeviceReply(trainable_state(work.model), metrics={"num-examples": result.num_examples})

    def aggregator(self, noise: NoiseSource, step_size: float) -> Aggregator:
        """Clip each update to S, one N(0, (sigma_u S)^2) on the sum, divide by m, step ``step_size``; with
        adaptive clipping the sum's noise multiplier is sigma_g and the aggregator moves S."""
        sigma = float(self.cfg.device_noise_multiplier)
        self.clip = quantile_clip(self.cfg, self.cfg.update_clip_norm, sigma)
        if self.clip is None:
            return DeviceDPAggregator(self.cfg.update_clip_norm, sigma, noise, step_size,
                                      correlated=correlated_noise(self.cfg, noise))
        sigma_g = gradient_noise_multiplier(sigma, self.clip.count_stddev, "--device-noise-multiplier")
        return DeviceDPAggregator(self.clip.value, sigma_g, noise, step_size, clip=self.clip)

    def clip_norm(self, unit: str) -> float:
        """S of the round at device level (the adaptive clip's current value, or ``--update-clip-norm``)."""
        if unit == "device" and self.clip is not None:
            return float(self.clip.value)
        return super().clip_norm(unit)

    def example_event(self, num_examples: int) -> SubsampledGaussianEvent:
        """The local DP-SGD's event (:meth:`LocalDPSGD.example_event`)."""
        if self.local is None:
            return super().example_event(num_examples)
        return self.local.example_event(num_examples)

    def device_event(self, q: float) -> SubsampledGaussianEvent:
        """One Poisson-subsampled Gaussian (sigma_u, q) per round."""
        return SubsampledGaussianEvent(self.cfg.device_noise_multiplier, q, 1)

    def calibrate(self, planned: np.ndarray, delta: float, q_max) -> Calibration:
        """The local DP-SGD's sigma (when on), and sigma_u for ``--target-epsilon-device`` unless
        ``--device-noise-multiplier`` is given (:func:`calibrate_device_noise`)."""
        local = self.local.calibrate(planned, delta, q_max) if self.local else Calibration()
        if self.cfg.device_noise_multiplier is not None:
            return with_count_stddev(self.cfg, local, "device_noise_multiplier")
        values, notes = dict(local.values), list(local.notes)
        target = self.cfg.target_epsilon_device
        q = q_max() if target is not None else float("nan")
        values["device_noise_multiplier"] = sigma_u = calibrate_device_noise(self.cfg, q, delta)
        if target is not None:
            notes.append(f"target device-level epsilon {target:g}: device noise multiplier calibrated to {sigma_u:.4f} "
                         f"(q_k <= {q:.3g})")
        return with_count_stddev(self.cfg, Calibration(values, tuple(notes)), "device_noise_multiplier")
