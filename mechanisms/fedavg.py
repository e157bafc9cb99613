"""FedAvg without DP (McMahan et al. 2017): local training, the non-private reference of local
DP-SGD (``--no-dp --noise-at device``; ``--no-dp`` alone runs :mod:`mechanisms.fedsgd`).

Each device trains the global model on its examples (plain minibatches) and replies with the
trained weights, its example count and, since nothing here is private, its training loss and
timings. The server takes the example-weighted mean (:class:`MeanAggregator`). No privacy unit
is accounted.
"""

from __future__ import annotations

import os
import time
from typing import Mapping

import numpy as np

from mechanisms.base import Aggregator, DeviceReply, DeviceWork, Mechanism, _numpy
from mechanisms.registry import register
from mechanisms.training import local_round
from nlu.model import trainable_state


class MeanAggregator(Aggregator):
    """FedAvg: the ``weight``-weighted mean of the replies' arrays, folded in one reply at a time.

    Floating arrays are averaged (sums of ``n_k * w_k`` in the arrays' dtype, divided by
    ``sum n_k`` at the end); other arrays keep the global model's values.
    """

    name = "fedavg"

    def begin(self, round_, current, plan):
        super().begin(round_, current, plan)
        self.sums: dict[str, np.ndarray] = {}
        self.total = 0.0

    def add(self, arrays: Mapping[str, np.ndarray], weight: float, clip: float | None = None) -> None:
        w = float(weight)
        for k, a in arrays.items():
            v = _numpy(a)
            if v.dtype.kind != "f":
                continue
            if k not in self.sums:
                self.sums[k] = np.multiply(v, w, dtype=v.dtype)
            else:
                self.sums[k] += np.multiply(v, w, dtype=v.dtype)
        self.total += w

    def result(self) -> dict[str, np.ndarray] | None:
        if self.total <= 0:
            return None
        out = {}
        for k, v in self.current.items():
            if k in self.sums:
                acc = self.sums.pop(k)
                acc /= self.total
                out[k] = acc
            else:
                out[k] = np.asarray(v)
        return out


@register
class FedAvg(Mechanism):
    """FedAvg without DP: trained weights in, their example-weighted mean out; nothing accounted."""

    name = "fedavg"

    def device_part(self, work: DeviceWork) -> DeviceReply:
        """Plain local training; the reply may carry the loss and timings (a non-private run)."""
        result = local_round(self.cfg, work, dp=False)
        metrics = {"num-examples": result.num_examples, "train_loss": result.train_loss,
                   "train_seconds": result.seconds, "task_seconds": time.perf_counter() - work.started,
                   "pid": os.getpid()}
        return DeviceReply(trainable_state(work.model), metrics=metrics)

    def aggregator(self, noise, step_size: float) -> Aggregator:
        """FedAvg's mean (the strategy's server step then applies)."""
        return MeanAggregator()
