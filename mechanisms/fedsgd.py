"""FedSGD without DP: the noise-on-the-aggregate algorithm with neither clipping nor noise
(``--no-dp`` with ``--noise-at aggregate``, the default placement): the non-private reference of
the default private run.

Each selected device Poisson-samples its examples at rate p (``--sample-rate``) and replies with
the sum of their gradients at the global model, unclipped; the server divides the cohort's sum by
the expected number of sampled examples and takes the same server step as the private run
(FedAdam by default): exactly :mod:`mechanisms.aggregate` with C = infinity and sigma = 0
(McMahan et al. 2017, "Communication-efficient learning of deep networks from decentralized
data": FedSGD, here with Poisson-sampled examples and a server optimizer). Nothing is accounted.
FedAvg of local training is ``--no-dp --noise-at device`` (:mod:`mechanisms.fedavg`).
"""

from __future__ import annotations

import math

import numpy as np

from dp.secure_random import NoiseSource
from mechanisms.aggregate import AggregateNoise, AggregateNoiseAggregator
from mechanisms.base import Aggregator, Calibration
from mechanisms.registry import register


@register
class FedSGD(AggregateNoise):
    """Gradient sums (unclipped) in, their mean over the expected sampled examples out; nothing accounted."""

    name = "fedsgd"
    units = ()
    holdout_noise_at = "none"
    releases_on_empty_cohort = False

    def device_clip(self, round_config=None) -> float:
        """No clipping: the device sums its sampled examples' gradients as they are (C = infinity)."""
        return math.inf

    def aggregator(self, noise: NoiseSource, step_size: float) -> Aggregator:
        """The mean gradient over the expected sampled examples, no noise, then a server step of ``step_size``."""
        return AggregateNoiseAggregator(0.0, 0.0, step_size, noise)

    def example_event(self, num_examples: int):
        """Nothing is accounted (a non-private run).

        Raises
        ------
        NotImplementedError
            Always.
        """
        raise NotImplementedError("FedSGD without DP accounts no privacy unit")

    def calibrate(self, planned: np.ndarray, delta: float, q_max) -> Calibration:
        """Nothing to calibrate."""
        return Calibration()
