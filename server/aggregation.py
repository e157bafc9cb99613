"""Aggregators: how one round's replies become the next global model.

The round loop (server/round.py) hands every accepted reply to the round's aggregator as it
arrives and asks for the result once the round's replies are in::

    agg.begin(t, current, plan)        # the round's global arrays and what the server expects
    agg.add(reply_arrays, weight)      # per accepted reply, as it arrives (folded in, then dropped)
    proposal = agg.result()            # the new global arrays (None: keep the current model)

Each aggregator holds at most a running sum and one reply, whatever the cohort size. The
proposal then goes through the strategy's server step (:class:`ServerStep`: FedAvg and
FedProx release it as is, FedAdam applies Flower's server optimizer to the pseudo-gradient
``proposal - current``; Reddi et al. 2021, "Adaptive federated optimization", Algorithm 2).

Aggregators:

* :class:`MeanAggregator`: FedAvg's example-weighted mean of the trained weights (McMahan et
  al. 2017), the non-private and the noise-on-the-device placements.
* :class:`DeviceDPAggregator`: DP-FedAvg (McMahan et al. 2018, Algorithm 1 with the
  fixed-denominator estimator): each update clipped to L2 norm S, summed, N(0, (sigma_u S)^2)
  added once, divided by the expected cohort size.
* :class:`AggregateNoiseAggregator`: noise on the aggregate (central DP-SGD over the cohort):
  the devices' sums of per-example-clipped gradients are summed, N(0, (sigma C)^2) is added
  once, the result is divided by the expected number of sampled examples and is the gradient
  of one server step (Abadi et al. 2016, Algorithm 1, with the cohort's Poisson-sampled
  examples as the lot).

The noise comes from a :class:`dp.secure_random.NoiseSource` (secret, never recorded).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedProx

from dp.secure_random import NoiseSource
from protocol.arrays import array_view, record_from_numpy


@dataclass(frozen=True)
class RoundPlan:
    """What the server expects of a round, fixed before any reply arrives (public quantities only).

    Attributes
    ----------
    round : int
    expected_cohort : float
        m = sum_k q_k(t), the expected number of devices (device-level DP's denominator).
    expected_examples : float
        sum over the cohort of p_k n_k, the expected number of sampled examples (the
        aggregate placement's denominator; n_k are the public example counts).
    lr_factor : float
        The server learning-rate schedule's factor this round (``--server-lr-schedule``).
    """

    round: int
    expected_cohort: float = 1.0
    expected_examples: float = 1.0
    lr_factor: float = 1.0


def _floating(current: dict[str, np.ndarray]) -> list[str]:
    return [k for k, v in current.items() if np.issubdtype(v.dtype, np.floating)]


class Aggregator:
    """Interface (see the module docstring). ``state_dict`` / ``load_state_dict`` resume it."""

    name = "aggregator"

    def begin(self, round_: int, current: dict[str, np.ndarray], plan: RoundPlan) -> None:
        """Start round ``round_`` from the global arrays ``current`` ({key: array})."""
        self.round, self.current, self.plan = round_, current, plan

    def add(self, arrays: ArrayRecord, weight: float) -> None:  # pragma: no cover - interface
        """Fold in one accepted reply's arrays (``weight``: its ``num-examples``, where it has one)."""
        raise NotImplementedError

    def result(self) -> dict[str, np.ndarray] | None:  # pragma: no cover - interface
        """The round's proposal for the new global arrays, or None to keep ``current``."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Picklable state to resume (none by default)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output."""


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

    def add(self, arrays: ArrayRecord, weight: float) -> None:
        w = float(weight)
        for k, a in arrays.items():
            v = array_view(a)
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


class DeviceDPAggregator(Aggregator):
    """DP-FedAvg: clip each device's update to S, sum, add N(0, (sigma_u S)^2 I) once, divide by m.

    The proposal is ``w + eta * lr_factor * (sum_k clip_S(w_k - w) + N(0, (sigma_u S)^2 I)) / m``
    over the floating arrays (McMahan et al. 2018, "Learning differentially private recurrent
    language models", Algorithm 1, with the fixed-denominator estimator), with m =
    :attr:`RoundPlan.expected_cohort` (a fixed denominator, as the Poisson-subsampled Gaussian
    analysis requires) and ``eta`` the server step size (1 for FedAvg; with FedAdam it is 1
    and the strategy's optimizer takes the step). With no accepted reply the release is noise
    only (every device that could have been selected was accounted).

    Parameters
    ----------
    clip_norm : float
        S, the L2 bound on a device's whole update.
    noise_multiplier : float
        sigma_u.
    noise : dp.secure_random.NoiseSource
    step_size : float
        eta (see above).
    """

    name = "device-dp"

    def __init__(self, clip_norm: float, noise_multiplier: float, noise: NoiseSource, step_size: float = 1.0):
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.noise = noise
        self.step_size = float(step_size)
        self.norms: list[float] = []

    def begin(self, round_, current, plan):
        super().begin(round_, current, plan)
        self.total = {k: np.zeros_like(current[k], dtype=np.float64) for k in _floating(current)}
        self.norms = []

    def add(self, arrays: ArrayRecord, weight: float) -> None:
        deltas = {k: array_view(arrays[k]).astype(np.float64) - self.current[k] for k in self.total}
        norm = float(np.sqrt(sum(float((d * d).sum()) for d in deltas.values())))
        self.norms.append(norm)
        scale = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
        for k, d in deltas.items():
            self.total[k] += d * scale

    def result(self) -> dict[str, np.ndarray]:
        std = self.noise_multiplier * self.clip_norm
        out = dict(self.current)
        for k, s in self.total.items():
            if std > 0:
                s = s + self.noise.normal_numpy(s.shape, std)
            step = self.step_size * self.plan.lr_factor / self.plan.expected_cohort
            out[k] = (self.current[k] + step * s).astype(self.current[k].dtype)
        return out


class AggregateNoiseAggregator(Aggregator):
    """Noise on the aggregate: one noisy sum of the cohort's per-example-clipped gradients.

    Each accepted reply is a device's sum over its Poisson-sampled examples of their gradients,
    each clipped to ``max_grad_norm`` C (our engine, on the device). The server forms

        g = (sum_k s_k + N(0, (sigma C)^2 I)) / E[n],   E[n] = sum_{k in cohort} p_k n_k

    (:attr:`RoundPlan.expected_examples`: public counts, never the realised sample sizes) and
    proposes ``w - step_size * lr_factor * g`` (:attr:`RoundPlan.lr_factor`). With the FedAvg / FedProx strategy ``step_size`` is the
    server learning rate (server SGD); with FedAdam it is 1 and Flower's FedAdam turns the
    pseudo-gradient ``-g`` into an Adam step. With no accepted reply the release is
    ``w - step_size * noise / E[n]`` (the round was accounted for every cohort member).

    Parameters
    ----------
    noise_multiplier : float
        sigma.
    max_grad_norm : float
        C.
    step_size : float
        See above.
    noise : dp.secure_random.NoiseSource
    """

    name = "aggregate-noise"

    def __init__(self, noise_multiplier: float, max_grad_norm: float, step_size: float, noise: NoiseSource):
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.step_size = float(step_size)
        self.noise = noise

    def begin(self, round_, current, plan):
        super().begin(round_, current, plan)
        self.total = {k: np.zeros_like(current[k], dtype=np.float64) for k in _floating(current)}
        self.replies = 0

    def add(self, arrays: ArrayRecord, weight: float) -> None:
        for k in self.total:
            self.total[k] += array_view(arrays[k])
        self.replies += 1

    def noisy_gradient(self) -> dict[str, np.ndarray]:
        """g = (sum of clipped sums + N(0, (sigma C)^2 I)) / E[n] (float64), per floating array."""
        std = self.noise_multiplier * self.max_grad_norm
        denom = max(float(self.plan.expected_examples), 1e-12)
        out = {}
        for k, s in self.total.items():
            if std > 0:
                s = s + self.noise.normal_numpy(s.shape, std)
            out[k] = s / denom
        return out

    def result(self) -> dict[str, np.ndarray]:
        out = dict(self.current)
        for k, g in self.noisy_gradient().items():
            out[k] = (self.current[k] - self.step_size * self.plan.lr_factor * g).astype(self.current[k].dtype)
        return out


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


def make_aggregator(cfg, noise: NoiseSource) -> Aggregator:
    """The aggregator of a run: device-level DP, noise on the aggregate, or FedAvg's mean.

    ``cfg`` is the RunConfig (``device_dp``, ``noise_at``, ``dp``, noise settings,
    ``strategy``, ``resolved_server_learning_rate()``). Device-level DP and the aggregate placement
    together are refused by config validation.
    """
    sgd = cfg.resolved_strategy() in ("fedavg", "fedprox")
    step = cfg.resolved_server_learning_rate() if sgd else 1.0
    if cfg.device_dp:
        return DeviceDPAggregator(cfg.update_clip_norm, cfg.device_noise_multiplier, noise, step)
    if cfg.dp and cfg.noise_at == "aggregate":
        return AggregateNoiseAggregator(cfg.noise_multiplier, cfg.max_grad_norm, step, noise)
    return MeanAggregator()
