"""Rule for ``nn.Linear`` (inputs ``[B, d_in]`` or ``[B, T..., d_in]``)."""

from __future__ import annotations

import time
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn

from . import register_rule
from .base import Capture, Rule, _add, readers, shared


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """View ``[B, d]`` as ``[B, 1, d]`` and ``[B, T1, T2, ..., d]`` as ``[B, T, d]``."""
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


#: (T, d_in, d_out) -> True (ghost norm) / False (instantiation); filled by :func:`use_ghost_norm`.
_ROUTE: Dict[Tuple[int, int, int], bool] = {}
#: flop ratios outside [1/_MEASURE_BAND, _MEASURE_BAND] are decided by flops alone, without timing.
_MEASURE_BAND = 4.0


def _time_routes(T: int, d_in: int, d_out: int, B: int = 8, reps: int = 3) -> Tuple[float, float]:
    """Best-of-``reps`` seconds of the ghost norm and of instantiation on random float32 data."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(B, T, d_in, generator=g)
    G = torch.randn(B, T, d_out, generator=g)

    def ghost():
        aa = torch.bmm(A, A.transpose(1, 2))
        gg = torch.bmm(G, G.transpose(1, 2))
        return torch.bmm(aa.reshape(B, 1, T * T), gg.reshape(B, T * T, 1))

    def inst():
        return torch.linalg.vector_norm(torch.bmm(G.transpose(1, 2), A).reshape(B, -1), dim=1)

    best = [float("inf"), float("inf")]
    for _ in range(reps):  # interleaved, so load changes hit both alike
        for k, f in enumerate((ghost, inst)):
            t0 = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best[0], best[1]


def use_ghost_norm(T: int, d_in: int, d_out: int) -> bool:
    """Choose the ghost norm over instantiation for one Linear weight (cached per shape).

    Ghost norm (Li et al. 2022, "Large language models can be strong
    differentially private learners", ICLR 2022, Sec. 4) costs two grams,
    ``O(B T^2 (d_in + d_out))`` flops and ``O(B T^2)`` memory; instantiating the
    per-example gradients ``G_i^T A_i`` costs ``O(B T d_in d_out)`` flops and
    ``O(B d_in d_out)`` memory. This is the per-layer choice of Bu et al.'s
    "mixed ghost norm" (Bu et al. 2023, "Scalable and efficient training of large
    convolutional neural networks with differential privacy", NeurIPS 2022,
    Sec. 3). Flop counts decide when one route needs less than a quarter of the
    other's flops; in between, both routes are timed once on this machine (small
    random batch, best of 3, interleaved) and the faster one is kept. Both routes
    are exact, so the choice only affects speed and memory.

    Parameters
    ----------
    T : int
        Number of positions per example (product of the middle dimensions).
    d_in, d_out : int
        Input and output features.

    Returns
    -------
    bool
        True for the ghost norm, False for instantiation.
    """
    key = (T, d_in, d_out)
    route = _ROUTE.get(key)
    if route is None:
        ghost_flops, inst_flops = T * (d_in + d_out), d_in * d_out
        ratio = ghost_flops / inst_flops
        if ratio <= 1 / _MEASURE_BAND or ratio >= _MEASURE_BAND:
            route = ghost_flops < inst_flops
        else:
            with torch.no_grad():
                t_ghost, t_inst = _time_routes(T, d_in, d_out)
            route = t_ghost <= t_inst
        _ROUTE[key] = route
    return route


@register_rule(nn.Linear)
class LinearRule(Rule):
    """Per-example norms and clipped sums for ``y = x W^T + b``.

    With ``A_i`` ``[T, d_in]`` the input and ``G_i`` ``[T, d_out]`` the output
    gradient of example ``i``, the per-example gradients are
    ``dW_i = G_i^T A_i`` and ``db_i = G_i^T 1``.

    * ``T == 1`` (2-D input): ``||dW_i||_F^2 + ||db_i||^2 = ||g_i||^2 (||a_i||^2 + 1)``
      (Goodfellow 2015, "Efficient per-example gradient computations", arXiv:1510.01799).
    * ``T > 1``, ghost norm: ``||G_i^T A_i||_F^2 = <A_i A_i^T, G_i G_i^T>``
      (Li et al. 2022, Eq. 4). The bias is the weight of a constant input 1, so
      ``||dW_i||^2 + ||db_i||^2 = <A_i A_i^T + 1, G_i G_i^T>`` (1: the all-ones
      ``[T, T]`` matrix) with no separate bias reduction. The activation gram is
      computed once per input tensor and shared by all Linear layers that read it
      (query, key and value projections), then freed after its last reader.
    * ``T > 1``, small layers: instantiate ``G_i^T A_i`` (batched matmul) and
      take its norm, when cheaper (:func:`use_ghost_norm`).
    * Clipped sum (book-keeping, Bu et al. 2023, Alg. 1):
      ``sum_i c_i G_i^T A_i`` as one matmul over all ``B T`` rows, the same size
      as the ordinary weight-gradient matmul (which autograd does not compute:
      the engine asks it only for output gradients). The clip factors scale
      whichever operand is cheaper: the activation when it is narrower than the
      output gradient, or read by several layers (one scaled copy shared by
      query, key and value), else the output gradient.
      ``sum_i c_i db_i = (c repeated T times) @ G``, one matrix-vector product.
    """

    def capture(self, module, inputs, output, batch_size):
        return inputs[0], None

    def norm_sq(self, cap: Capture, grad_out, names, cache) -> Tuple[torch.Tensor, Any]:
        A = _as_3d(cap.activation)
        G = _as_3d(grad_out)
        B, T, d_in = A.shape
        d_out = G.shape[-1]
        w, b = "weight" in names, "bias" in names
        if not w:
            return (G.sum(1).pow(2).sum(1) if b else G.new_zeros(B)), None
        if T == 1:
            a2 = A.squeeze(1).pow(2).sum(1)
            return G.squeeze(1).pow(2).sum(1) * (a2 + 1 if b else a2), None
        if use_ghost_norm(T, d_in, d_out):
            aa = shared(cache, cap.activation, "gram", lambda: torch.bmm(A, A.transpose(1, 2)))  # [B, T, T]
            if b:
                aa = shared(cache, cap.activation, "gram+1", lambda: aa + 1)
            gg = torch.bmm(G, G.transpose(1, 2))  # [B, T, T]
            # <aa_i, gg_i> for all i as one batched dot product
            return torch.bmm(aa.reshape(B, 1, T * T), gg.reshape(B, T * T, 1)).reshape(B), None
        dW = torch.bmm(G.transpose(1, 2), A)  # [B, d_out, d_in]
        total = dW.reshape(B, -1).pow(2).sum(1)
        del dW
        if b:
            total = total + G.sum(1).pow(2).sum(1)
        return total, None

    def add_clipped(self, cap, grad_out, clip, state, names, sums, cache=None) -> None:
        A = _as_3d(cap.activation)
        G = _as_3d(grad_out)
        B, T, d_in = A.shape
        d_out = G.shape[-1]
        c = clip.to(G.dtype)
        G2 = G.reshape(B * T, d_out)
        cache = {} if cache is None else cache
        if "bias" in names:
            cw = c if T == 1 else c.repeat_interleave(T)
            _add(sums, "bias", torch.mv(G2.t(), cw))
        if "weight" in names:
            A2 = A.reshape(B * T, d_in)
            if ("scaled", id(cap.activation)) in cache or d_in / readers(cache, cap.activation) < d_out:
                # scale the (narrower or shared) activation, out of place: it may be the caller's tensor
                As = shared(cache, cap.activation, "scaled", lambda: (A * c.view(-1, 1, 1)).reshape(B * T, d_in))
                Gt = G2.t()
            else:
                As = A2
                Gt = (G * c.view(-1, 1, 1)).reshape(B * T, d_out).t()
            if sums.get("weight") is None:
                sums["weight"] = torch.mm(Gt, As)
            else:
                sums["weight"].addmm_(Gt, As)

    def per_example_grads(self, cap, grad_out, names) -> Dict[str, torch.Tensor]:
        A = _as_3d(cap.activation)
        G = _as_3d(grad_out)
        out = {}
        if "weight" in names:
            out["weight"] = torch.bmm(G.transpose(1, 2), A)
        if "bias" in names:
            out["bias"] = G.sum(1)
        return out
