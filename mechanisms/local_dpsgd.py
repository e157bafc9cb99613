"""Local DP-SGD: the example-level noise on the device (``--noise-at device``; trusts nobody).

Each selected device trains the global model with DP-SGD (Abadi et al. 2016, Algorithm 1):
``steps = ceil(E n / B)`` steps on Poisson batches at rate q = min(1, B / n), each example's
gradient clipped to C, N(0, (sigma C)^2) added to every step's sum. It replies with the
trained weights, its (public) example count and the round's event. The server averages the
updates (FedAvg's mean: post-processing of noised updates). Accounted per example: one
Poisson-subsampled Gaussian (sigma, q, steps) per round the device joined.

With ``--adaptive-clip-quantile`` (and no ``--device-dp``, which adapts S instead) each device moves
C after every local step by its noised centred count (:mod:`mechanisms.adaptive_clip`; each step
stays one Gaussian of the accounted sigma, the clipped sum's share being sigma_g) and replies with
the C it ended at, a function of noised counts only; the next round starts from the geometric mean
of the replies' C (:class:`AdaptiveMeanAggregator`).
"""

from __future__ import annotations

import numpy as np

from dp.accounting import SubsampledGaussianEvent
from dp.sampling import sample_rate_for, steps_for
from mechanisms.adaptive_clip import CLIP_NORM, with_count_stddev
from mechanisms.base import Aggregator, Calibration, DeviceReply, DeviceWork, Mechanism, ReplySpec, calibrate_example
from mechanisms.fedavg import MeanAggregator
from mechanisms.registry import register
from mechanisms.training import local_round
from nlu.model import trainable_state


def local_mechanism(num_examples: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """(sample_rate, steps) of one round of DP-SGD on a device holding ``num_examples``."""
    return sample_rate_for(num_examples, batch_size), steps_for(num_examples, batch_size, local_epochs)


@register
class LocalDPSGD(Mechanism):
    """DP-SGD on each device; FedAvg's mean of the noised updates on the server."""

    name = "local-dpsgd"
    units = ("example",)
    holdout_noise_at = "device"

    def __init__(self, cfg):
        super().__init__(cfg)
        #: adaptive clipping of C on the devices (with --device-dp the adapted clip is S, on the server)
        self.adaptive = cfg.adaptive_clip_quantile is not None and not cfg.device_dp
        self.reply = ReplySpec("weights", privacy_record=True, clip=CLIP_NORM if self.adaptive else None)
        #: the server's aggregator when adaptive (holds the next round's starting C)
        self.adaptive_mean: AdaptiveMeanAggregator | None = None

    def round_params(self) -> dict:
        """With adaptive clipping ``max-grad-norm``: the C the devices start the round from."""
        return {"max-grad-norm": self.clip_norm("example")} if self.adaptive_mean is not None else {}

    def device_part(self, work: DeviceWork) -> DeviceReply:
        """DP-SGD on the device's examples; the reply holds the weights, ``num-examples`` and the event (and,
        with adaptive clipping, the device's final C)."""
        cfg = self.cfg
        result = local_round(cfg, work, dp=True, adaptive=self.adaptive)
        start = float(work.round_config.get("max-grad-norm", cfg.max_grad_norm)) if self.adaptive else cfg.max_grad_norm
        privacy = {"device-id": work.device_id, "round": work.round, "noise_multiplier": cfg.noise_multiplier,
                   "sample_rate": result.sample_rate, "steps": result.steps, "max_grad_norm": start}
        return DeviceReply(trainable_state(work.model), metrics={"num-examples": result.num_examples}, privacy=privacy,
                           clip=result.clip_norm if self.adaptive else None)

    def aggregator(self, noise, step_size: float) -> Aggregator:
        """FedAvg's mean of the devices' noised weights (with adaptive clipping, also of their final C)."""
        if not self.adaptive:
            return MeanAggregator()
        self.adaptive_mean = AdaptiveMeanAggregator(float(self.cfg.max_grad_norm))
        return self.adaptive_mean

    def clip_norm(self, unit: str) -> float:
        """C the round starts from (adaptive clipping), else ``--max-grad-norm``."""
        if unit == "example" and self.adaptive_mean is not None:
            return float(self.adaptive_mean.clip_norm)
        return super().clip_norm(unit)

    def example_event(self, num_examples: int) -> SubsampledGaussianEvent:
        """``ceil(E n / B)`` Poisson-subsampled Gaussian steps at rate min(1, B / n), noise multiplier sigma."""
        q, steps = local_mechanism(num_examples, self.cfg.batch_size, self.cfg.local_epochs)
        return SubsampledGaussianEvent(self.cfg.noise_multiplier, q, steps)

    def calibrate(self, planned: np.ndarray, delta: float, q_max) -> Calibration:
        """sigma for ``--target-epsilon`` (default 8 without ``--noise-multiplier``), for a device that joins every round.

        Each distinct local mechanism (q, steps) over the planned activities is repeated
        ``rounds`` times; the answer is the largest sigma any of them needs. In the continual
        setting this assumes a device's rounds are no worse than its worst round repeated; pair
        it with ``--max-epsilon``, which enforces the composed value from the ledger.
        """
        cal = calibrate_example(self.cfg, delta, {
            local_mechanism(int(a), self.cfg.batch_size, self.cfg.local_epochs) for a in np.ravel(planned) if a > 0
        }, " or --local-epochs, or raise --batch-size")
        return with_count_stddev(self.cfg, cal, "noise_multiplier") if self.adaptive else cal


class AdaptiveMeanAggregator(MeanAggregator):
    """FedAvg's mean of the noised weights, and the geometric mean of the replies' final clip norms as the
    next round's starting C (post-processing: each device's C is a function of its noised counts).

    Parameters
    ----------
    clip_norm : float
        C of the first round (``--max-grad-norm``).
    """

    name = "mean-adaptive-clip"

    def __init__(self, clip_norm: float):
        super().__init__()
        self.clip_norm = float(clip_norm)
        self._logs: list[float] = []

    def begin(self, round_, current, plan):
        super().begin(round_, current, plan)
        self._logs = []

    def add(self, arrays, weight: float, clip: float | None = None) -> None:
        super().add(arrays, weight)
        if clip is not None and clip > 0:
            self._logs.append(float(np.log(clip)))

    def result(self):
        out = super().result()
        if self._logs:
            self.clip_norm = float(np.exp(np.mean(self._logs)))
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "clip": {"value": self.clip_norm}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if (state or {}).get("clip"):
            self.clip_norm = float(state["clip"]["value"])

