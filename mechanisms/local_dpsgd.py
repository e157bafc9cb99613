"""Local DP-SGD: the example-level noise on the device (``--noise-at device``; trusts nobody).

Each selected device trains the global model with DP-SGD (Abadi et al. 2016, Algorithm 1):
``steps = ceil(E n / B)`` steps on Poisson batches at rate q = min(1, B / n), each example's
gradient clipped to C, N(0, (sigma C)^2) added to every step's sum. It replies with the
trained weights, its (public) example count and the round's event. The server averages the
updates (FedAvg's mean: post-processing of noised updates). Accounted per example: one
Poisson-subsampled Gaussian (sigma, q, steps) per round the device joined.
"""

from __future__ import annotations

import numpy as np

from dp.accounting import SubsampledGaussianEvent
from dp.sampling import sample_rate_for, steps_for
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
    reply = ReplySpec("weights", privacy_record=True)
    holdout_noise_at = "device"

    def device_part(self, work: DeviceWork) -> DeviceReply:
        """DP-SGD on the device's examples; the reply holds the weights, ``num-examples`` and the event."""
        cfg = self.cfg
        result = local_round(cfg, work, dp=True)
        privacy = {"device-id": work.device_id, "round": work.round, "noise_multiplier": cfg.noise_multiplier,
                   "sample_rate": result.sample_rate, "steps": result.steps, "max_grad_norm": cfg.max_grad_norm}
        return DeviceReply(trainable_state(work.model), metrics={"num-examples": result.num_examples}, privacy=privacy)

    def aggregator(self, noise, step_size: float) -> Aggregator:
        """FedAvg's mean of the devices' noised weights."""
        return MeanAggregator()

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
        return calibrate_example(self.cfg, delta, {
            local_mechanism(int(a), self.cfg.batch_size, self.cfg.local_epochs) for a in np.ravel(planned) if a > 0
        }, " or --local-epochs, or raise --batch-size")

