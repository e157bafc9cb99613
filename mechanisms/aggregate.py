"""Noise on the aggregate: central DP-SGD over the cohort (``--noise-at aggregate``, the default;
trusts the aggregator).

Each selected device includes each of its examples with probability p (``--sample-rate``,
Poisson), clips each included example's gradient at the global model to C with the batched
engine and replies with the sum of the clipped gradients and nothing else
(:func:`clipped_gradient_sum`). The server adds N(0, (sigma C)^2) once to the cohort's sum,
divides by the expected number of sampled examples and steps
(:class:`AggregateNoiseAggregator`). Accounted per example: ONE Poisson-subsampled Gaussian
(sigma, p) per round its device joined; device selection is not counted as amplification.

With ``--adaptive-clip-quantile`` the round's C is the server's current estimate of that quantile
of the examples' gradient norms (:mod:`mechanisms.adaptive_clip`): each device also replies with
its centred count of unclipped examples, the server noises the cohort's count and moves C; the
round's event stays (sigma, p), the clipped sum's noise multiplier is the larger sigma_g.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

from dp.accounting import SubsampledGaussianEvent
from dp.secure_random import NoiseSource
from mechanisms.adaptive_clip import CLIP_COUNT, ClipStateMixin, QuantileClip, gradient_noise_multiplier, quantile_clip, with_count_stddev
from mechanisms.correlated_noise import BandedNoise, correlated_noise, noised_sums
from mechanisms.base import (Aggregator, Calibration, DeviceReply, DeviceWork, Mechanism, ReplySpec, _numpy,
                             calibrate_example, floating_keys)
from mechanisms.registry import register
from mechanisms.training import clipping_engine
from nlu.data import Encoded
from nlu.model import trainable_state_keys
from nlu.tasks import Task


class AggregateNoiseAggregator(ClipStateMixin, Aggregator):
    """Noise on the aggregate: one noisy sum of the cohort's per-example-clipped gradients.

    Each accepted reply is a device's sum over its Poisson-sampled examples of their gradients,
    each clipped to ``max_grad_norm`` C (our engine, on the device). The server forms

        g = (sum_k s_k + N(0, (sigma C)^2 I)) / E[n],   E[n] = sum_{k in cohort} p_k n_k

    (:attr:`mechanisms.base.RoundPlan.expected_examples`: public counts, never the realised
    sample sizes) and proposes ``w - step_size * lr_factor * g`` (Abadi et al. 2016, Algorithm 1,
    with the cohort's Poisson-sampled examples as the lot). With the FedAvg / FedProx strategy
    ``step_size`` is the server learning rate (server SGD); with FedAdam it is 1 and Flower's
    FedAdam turns the pseudo-gradient ``-g`` into an Adam step. With no accepted reply the
    release is ``w - step_size * noise / E[n]`` (the round was accounted for every cohort member).

    Parameters
    ----------
    noise_multiplier : float
        sigma.
    max_grad_norm : float
        C.
    step_size : float
        See above.
    noise : dp.secure_random.NoiseSource
    clip : mechanisms.adaptive_clip.QuantileClip, optional
        Adaptive clipping: C is ``clip.value`` this round, ``noise_multiplier`` is then the
        clipped sum's sigma_g, and :meth:`result` moves C by the noised count of the replies'
        centred counts over E[n].
    correlated : mechanisms.correlated_noise.BandedNoise, optional
        Correlated noise across rounds (``--bands``): the sum's noise is sigma C times row t of C^-1 z
        instead of sigma C times a fresh z_t.
    """

    name = "aggregate-noise"

    def __init__(self, noise_multiplier: float, max_grad_norm: float, step_size: float, noise: NoiseSource,
                 clip: QuantileClip | None = None, correlated: BandedNoise | None = None):
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.step_size = float(step_size)
        self.noise = noise
        self.clip = clip
        self.correlated = correlated

    def begin(self, round_, current, plan):
        super().begin(round_, current, plan)
        self.total = {k: np.zeros_like(current[k], dtype=np.float64) for k in floating_keys(current)}
        self.replies = 0
        self.centred_count = 0.0
        if self.clip is not None:
            self.max_grad_norm = self.clip.value

    def add(self, arrays: Mapping[str, np.ndarray], weight: float, clip: float | None = None) -> None:
        for k in self.total:
            self.total[k] += _numpy(arrays[k])
        self.replies += 1
        if clip is not None:  # the device's centred count
            self.centred_count += float(clip)

    def noisy_gradient(self) -> dict[str, np.ndarray]:
        """g = (sum of clipped sums + N(0, (sigma C)^2 I)) / E[n] (float64), per floating array."""
        std = self.noise_multiplier * self.max_grad_norm
        denom = max(float(self.plan.expected_examples), 1e-12)
        return {k: s / denom for k, s in noised_sums(self.total, std, self.noise, self.correlated, self.round).items()}

    def result(self) -> dict[str, np.ndarray]:
        out = dict(self.current)
        for k, g in self.noisy_gradient().items():
            out[k] = (self.current[k] - self.step_size * self.plan.lr_factor * g).astype(self.current[k].dtype)
        if self.clip is not None:
            self.clip.update(self.centred_count, self.plan.expected_examples, self.noise)
        return out



@register
class AggregateNoise(Mechanism):
    """Clipped sums from the devices, N(0, (sigma C)^2) once on the cohort's sum at the server."""

    name = "aggregate"
    units = ("example",)
    holdout_noise_at = "aggregate"

    def __init__(self, cfg):
        super().__init__(cfg)
        adaptive = cfg.adaptive_clip_quantile is not None and self.units != ()
        #: with adaptive clipping the reply also holds the centred count of unclipped examples
        self.reply = ReplySpec("clipped-sum", privacy_record=False, info=False,
                               clip=CLIP_COUNT if adaptive else None)
        #: the server's adaptive clip (set by :meth:`aggregator`; None: C is ``--max-grad-norm``)
        self.clip: QuantileClip | None = None

    def round_params(self) -> dict:
        """``sample-rate``: the example sampling rate p of the round; with adaptive clipping ``max-grad-norm``,
        the round's C (a function of noised counts only)."""
        params = {"sample-rate": float(self.cfg.sample_rate)}
        if self.clip is not None:
            params["max-grad-norm"] = float(self.clip.value)
        return params

    def device_part(self, work: DeviceWork) -> DeviceReply:
        """The device's clipped gradient sum (no loss, no realised sample count, no timing); with adaptive
        clipping also its centred count sum_i (1[norm_i <= C] - 1/2) over the sampled examples, which the
        server only uses noised (the same trust as the clipped sum)."""
        cfg = self.cfg
        counted = self.reply.clip is not None
        out = clipped_gradient_sum(
            work.model, work.data, sample_rate=float(work.round_config["sample-rate"]),
            max_grad_norm=self.device_clip(work.round_config),
            physical_batch_size=cfg.physical_batch_size, noise=work.noise, dp_engine=cfg.dp_engine, task=work.task,
            teacher=work.teacher, return_centred_count=counted,
        )
        sums, count = out if counted else (out, None)
        return DeviceReply(sums, clip=count)

    def device_clip(self, round_config: Mapping | None = None) -> float:
        """C, the clip of each example's gradient on the device: the round's ``max-grad-norm`` (adaptive
        clipping), else ``--max-grad-norm``."""
        if round_config is not None and "max-grad-norm" in round_config:
            return float(round_config["max-grad-norm"])
        return float(self.cfg.max_grad_norm)

    def check_clip(self, value: float, num_examples: int) -> str | None:
        """A centred count is at most half the device's examples in absolute value (else the reply is rejected:
        one device must not move C by more than its examples can)."""
        if abs(value) > 0.5 * num_examples + 1e-9:
            return f"centred count {value:g} exceeds half the device's {num_examples} examples"
        return None

    def clip_norm(self, unit: str) -> float:
        """C of the round (the adaptive clip's current value, or ``--max-grad-norm``)."""
        if unit == "example" and self.clip is not None:
            return float(self.clip.value)
        return super().clip_norm(unit)

    def aggregator(self, noise: NoiseSource, step_size: float) -> Aggregator:
        """One noisy sum per round, then a server step of ``step_size``; with adaptive clipping the sum's
        noise multiplier is sigma_g and the aggregator moves C (:mod:`mechanisms.adaptive_clip`)."""
        sigma = float(self.cfg.noise_multiplier)
        self.clip = quantile_clip(self.cfg, self.cfg.max_grad_norm, sigma)
        if self.clip is None:
            return AggregateNoiseAggregator(sigma, self.cfg.max_grad_norm, step_size, noise,
                                            correlated=correlated_noise(self.cfg, noise))
        sigma_g = gradient_noise_multiplier(sigma, self.clip.count_stddev)
        return AggregateNoiseAggregator(sigma_g, self.clip.value, step_size, noise, clip=self.clip)

    def example_event(self, num_examples: int) -> SubsampledGaussianEvent:
        """ONE Poisson-subsampled Gaussian (sigma, p) per round joined, whatever the device holds.

        The example's presence changes the cohort's sum by at most C (add or remove one
        example), so the round is the subsampled Gaussian mechanism at rate p whatever the rest of
        the cohort holds. Device selection is NOT counted as amplification: an example's inclusion
        is correlated with its device's other examples, which can reveal that the device took part.
        """
        return SubsampledGaussianEvent(self.cfg.noise_multiplier, float(self.cfg.sample_rate), 1)

    def calibrate(self, planned: np.ndarray, delta: float, q_max) -> Calibration:
        """sigma for ``--target-epsilon`` over ``rounds`` events at rate p (the same for every device); with
        adaptive clipping also sigma_b (``clipped_count_stddev``), checked against sigma.

        Raises
        ------
        ValueError
            If the target cannot be met; settings.config.ConfigError if sigma_b is too small for sigma.
        """
        cal = calibrate_example(self.cfg, delta, {(float(self.cfg.sample_rate), 1)}, " or --sample-rate")
        return with_count_stddev(self.cfg, cal, "noise_multiplier")


def clipped_gradient_sum(
    model: nn.Module,
    data: Encoded,
    *,
    sample_rate: float,
    max_grad_norm: float,
    physical_batch_size: int,
    noise: NoiseSource,
    dp_engine: str = "dpfl",
    task: Task | None = None,
    teacher: torch.Tensor | None = None,
    return_centred_count: bool = False,
) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], float]:
    """The device's contribution in the aggregate placement: sum_i clip_C(grad l_i(w)), no noise.

    Each of the device's n examples is included independently with probability
    ``sample_rate`` p (Poisson, from ``noise``); each included example's gradient over all
    trainable parameters is clipped to L2 norm ``max_grad_norm`` C by the DP-SGD engine
    (batched, in physical micro-batches) and the clipped gradients are summed. The server adds
    N(0, (sigma C)^2) once to the cohort's sum (:class:`AggregateNoiseAggregator`); this function adds none.

    Parameters
    ----------
    model : torch.nn.Module
        The global model, trainable parameters as they should train; left unchanged
        (its ``.grad`` fields are cleared afterwards). The forward passes run in eval mode
        (no dropout).
    data : nlu.data.Encoded or nlu.slots.SlotEncoded
        The device's examples.
    sample_rate : float
        p in [0, 1].
    max_grad_norm : float
        C > 0.
    physical_batch_size : int
        Examples per forward/backward pass.
    noise : dp.secure_random.NoiseSource
    dp_engine : str
        "dpfl" (ours) or "opacus".
    task : nlu.tasks.Task, optional
    teacher : torch.Tensor [n, C], optional
        The previous release's logits (see :func:`mechanisms.training.train_local`): the clipped gradients are those
        of the loss with the focal distillation term.
    return_centred_count : bool
        Also return sum_i (1[||grad l_i|| <= C] - 1/2) over the sampled examples (adaptive clipping's
        count, :mod:`mechanisms.adaptive_clip`).

    Returns
    -------
    dict of str to torch.Tensor
        State-dict key of each trainable parameter -> the clipped sum, same shape (zeros when
        no example was sampled). The realised number of sampled examples is not returned (the
        centred count of adaptive clipping bounds it: |count| <= n_sampled / 2, within the trust this
        placement gives the server).
    float
        The centred count (only with ``return_centred_count``; 0.0 when no example was sampled).
    """
    idx = np.flatnonzero(noise.bernoulli(len(data), sample_rate)).astype(np.int64)
    by_name = dict(model.named_parameters(remove_duplicate=False))
    keys = trainable_state_keys(model)
    if len(idx) == 0:
        zeros = {k: torch.zeros_like(by_name[k]) for k in keys}
        return (zeros, 0.0) if return_centred_count else zeros
    centred = 0.0
    with clipping_engine(model, max_grad_norm, dp_engine, task, teacher) as (collate_fn, loss_fn, engine):
        for s in range(0, len(idx), physical_batch_size):
            norms = engine.accumulate(loss_fn(model, collate_fn(data, idx[s : s + physical_batch_size])))
            if return_centred_count:
                centred += float((norms <= max_grad_norm).sum().item()) - 0.5 * len(norms)
        engine.finalize()
        out = {k: by_name[k].grad.detach().clone() for k in keys}
    return (out, centred) if return_centred_count else out

