"""Device-level DP (DP-FedAvg) as a wrapper around any Flower strategy.

Each device's update Delta_k = w_k - w is clipped to L2 norm S (all arrays together), the
clipped updates are summed, Gaussian noise N(0, (sigma_u * S)^2 I) is added to the sum, and the
sum is divided by the *expected* cohort size m = sum_k q_k (a fixed denominator, which the
Poisson-subsampled Gaussian analysis requires; McMahan et al. 2018, "Learning differentially
private recurrent language models", Algorithm 1 with the fixed-denominator estimator f~_f).
The wrapped strategy then receives one synthetic reply holding ``w + noisy mean update``, so
FedAvg/FedProx release it as is and FedAdam applies its server optimizer to it.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict


def clip_and_noise(
    current: dict[str, np.ndarray],
    updates: list[dict[str, np.ndarray]],
    clip_norm: float,
    noise_multiplier: float,
    expected_cohort: float,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], list[float]]:
    """The DP-FedAvg estimate of the new global arrays.

    Parameters
    ----------
    current : dict of numpy.ndarray
        Global arrays w sent this round.
    updates : list of dict of numpy.ndarray
        Each replying device's returned arrays w_k (same keys and shapes as ``current``).
    clip_norm : float
        S, the L2 bound on each device's whole update.
    noise_multiplier : float
        sigma_u; the noise std on the sum is sigma_u * S.
    expected_cohort : float
        m = sum_k q_k, the denominator.
    rng : numpy.random.Generator

    Returns
    -------
    new_arrays : dict of numpy.ndarray
        w + (sum_k clip(Delta_k) + N(0, (sigma_u S)^2 I)) / m (floating arrays only; integer
        buffers are kept from ``current``).
    norms : list of float
        The pre-clip update norms ||Delta_k||.
    """
    keys = [k for k, v in current.items() if np.issubdtype(v.dtype, np.floating)]
    total = {k: np.zeros_like(current[k], dtype=np.float64) for k in keys}
    norms = []
    for upd in updates:
        deltas = {k: upd[k].astype(np.float64) - current[k] for k in keys}
        norm = float(np.sqrt(sum(float((d * d).sum()) for d in deltas.values())))
        norms.append(norm)
        scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
        for k in keys:
            total[k] += deltas[k] * scale
    std = noise_multiplier * clip_norm
    out = dict(current)
    for k in keys:
        noisy = total[k] + rng.normal(0.0, std, size=total[k].shape) if std > 0 else total[k]
        out[k] = (current[k] + noisy / expected_cohort).astype(current[k].dtype)
    return out, norms


class DeviceDPStrategy:
    """Wrap a Flower strategy with device-level clipping and noise (see module docstring).

    Parameters
    ----------
    inner : flwr.serverapp.strategy.Strategy
        The strategy whose ``configure_train`` builds the messages and whose
        ``aggregate_train`` receives the noisy aggregate.
    clip_norm : float
        S.
    noise_multiplier : float
        sigma_u.
    seed : int
        Seeds the server's noise.
    """

    def __init__(self, inner, clip_norm: float, noise_multiplier: float, seed: int):
        self.inner = inner
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.rng = np.random.default_rng([seed, 7])
        self.expected_cohort = 1.0
        self.current: dict[str, np.ndarray] | None = None

    def configure_train(self, server_round, arrays: ArrayRecord, config, grid):
        self.current = {k: v.numpy() for k, v in arrays.items()}
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: list[Message]):
        """Clip, sum, add noise, divide by m; hand the result to the inner strategy.

        Also used with an empty list of replies: the release is then noise only.
        """
        assert self.current is not None, "configure_train must run first"
        updates = [{k: v.numpy() for k, v in r.content["arrays"].items()} for r in replies]
        new, _ = clip_and_noise(self.current, updates, self.clip_norm, self.noise_multiplier, self.expected_cohort, self.rng)
        synthetic = RecordDict({"arrays": ArrayRecord(array_dict={k: Array(v) for k, v in new.items()}), "metrics": MetricRecord({"num-examples": 1})})
        msg = Message(synthetic, dst_node_id=0, message_type="train")
        arrays, _ = self.inner.aggregate_train(server_round, [_AsReply(msg)])
        return arrays, None


class _AsReply:
    """Minimal reply view over a locally built message (Flower strategies read content/has_error)."""

    def __init__(self, msg: Message):
        self.content = msg.content
        self.metadata = msg.metadata

    def has_error(self) -> bool:
        return False
