"""The server's step on a round's proposal, and the released model average.

The round's replies become a proposal through the run's mechanism (its aggregator, in
mechanisms/: FedAvg's mean, DP-FedAvg's clipped and noised mean, the noisy sum of clipped
gradients); the proposal then goes through the strategy's server step (:class:`ServerStep`:
FedAvg and FedProx release it as is, FedAdam applies Flower's server optimizer to the
pseudo-gradient ``proposal - current``; Reddi et al. 2021, "Adaptive federated optimization",
Algorithm 2). :class:`ModelAverage` is the released average of the iterates (``--server-ema``).
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedProx

from protocol.arrays import record_from_numpy


class _AsReply:
    """Minimal reply view over a locally built message (Flower strategies read content/has_error)."""

    def __init__(self, msg: Message):
        self.content = msg.content
        self.metadata = msg.metadata

    def has_error(self) -> bool:
        return False


class ServerStep:
    """The strategy's server-side step on a round's proposal (Flower's strategies do the maths).

    FedAvg and FedProx release the proposal as is. Any other Flower strategy (FedAdam) gets
    the proposal as one reply of weight 1, so its ``aggregate_train`` computes the
    pseudo-gradient ``proposal - current`` against the arrays its ``configure_train`` recorded
    this round and applies its optimizer. Its state (FedAdam's moments ``m_t``, ``v_t``) is
    part of :meth:`state_dict`.

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        The run's strategy; its ``configure_train`` must have built this round's messages.
    """

    MOMENTS = ("m_t", "v_t")

    def __init__(self, strategy):
        self.strategy = strategy
        self.base_eta = getattr(strategy, "eta", None)

    @property
    def passthrough(self) -> bool:
        """True when the step releases the proposal unchanged (FedAvg, FedProx)."""
        return type(self.strategy) in (FedAvg, FedProx)

    def apply(self, round_: int, proposal: dict[str, np.ndarray], lr_factor: float = 1.0) -> ArrayRecord:
        """The released global arrays for ``proposal`` ({key: array}); FedAdam's step size is ``eta * lr_factor``."""
        record = record_from_numpy(proposal)
        if self.passthrough:
            return record
        if self.base_eta is not None:
            self.strategy.eta = self.base_eta * float(lr_factor)
        synthetic = RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 1})})
        new, _ = self.strategy.aggregate_train(round_, [_AsReply(Message(synthetic, dst_node_id=0, message_type="train"))])
        return record if new is None else new

    def state_dict(self) -> dict:
        """The strategy's optimizer state (picklable)."""
        return {k: getattr(self.strategy, k) for k in self.MOMENTS if getattr(self.strategy, k, None) is not None}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output into the strategy."""
        for k in self.MOMENTS:
            if k in (state or {}):
                setattr(self.strategy, k, state[k])


class ModelAverage:
    """An exponential moving average of the global models: the model the run releases.

    ``ema_t = d_t ema_{t-1} + (1 - d_t) w_t`` with ``d_t = min(decay, (1 + t) / (10 + t))`` (the
    warm-up of TensorFlow's ExponentialMovingAverage), over the floating arrays. Averaging the
    iterates of noisy training lowers the noise in the released model (Polyak & Juditsky 1992;
    De et al. 2022, "Unlocking high-accuracy differentially private image classification
    through scale", Sec. 3). It is post-processing of models that are released anyway (each
    round's ``w_t`` goes to the devices), so it costs no privacy. Devices keep computing at
    ``w_t``; evaluation and checkpoints use the average.

    Parameters
    ----------
    decay : float
        In (0, 1).
    """

    def __init__(self, decay: float):
        self.decay = float(decay)
        self.average: dict[str, np.ndarray] | None = None

    def update(self, round_: int, arrays: ArrayRecord) -> ArrayRecord:
        """Fold in round ``round_``'s global arrays; return the average (same keys and dtypes)."""
        new = {k: np.asarray(v.numpy()) for k, v in arrays.items()}
        if self.average is None:
            self.average = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in new.items()}
        else:
            d = min(self.decay, (1.0 + round_) / (10.0 + round_))
            for k, v in new.items():
                if v.dtype.kind == "f":
                    self.average[k] = d * self.average[k] + (1.0 - d) * v
                else:
                    self.average[k] = v
        return record_from_numpy({k: v.astype(new[k].dtype) for k, v in self.average.items()})

    def state_dict(self) -> dict:
        """The running average (picklable)."""
        return {"average": self.average}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output."""
        self.average = (state or {}).get("average")


def server_step_size(cfg) -> float:
    """The server SGD step a mechanism's aggregator applies: ``--server-learning-rate`` (resolved) with
    FedAvg / FedProx, 1 with FedAdam (Flower's optimizer then takes the step)."""
    return cfg.resolved_server_learning_rate() if cfg.resolved_strategy() in ("fedavg", "fedprox") else 1.0
