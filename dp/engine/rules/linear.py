"""Rule for ``nn.Linear`` (inputs ``[B, d_in]`` or ``[B, T..., d_in]``)."""

from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import torch
import torch.nn as nn

from . import register_rule
from .base import Capture, Rule, _add


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """View ``[B, d]`` as ``[B, 1, d]`` and ``[B, T1, T2, ..., d]`` as ``[B, T, d]``."""
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def use_ghost_norm(T: int, d_in: int, d_out: int) -> bool:
    """Choose the ghost norm over instantiation for one Linear weight.

    Ghost norm (Li et al. 2022, "Large language models can be strong
    differentially private learners", ICLR 2022, Sec. 4) costs two grams,
    ``O(B T^2 (d_in + d_out))`` flops and ``O(B T^2)`` memory; instantiating the
    per-example gradients ``G_i^T A_i`` costs ``O(B T d_in d_out)`` flops and
    ``O(B d_in d_out)`` memory. This is the per-layer choice of Bu et al.'s
    "mixed ghost norm" (Bu et al. 2023, "Scalable and efficient training of large
    convolutional neural networks with differential privacy", NeurIPS 2022,
    Sec. 3: ghost if ``2 T^2 < d_in d_out``), written in flop terms.

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
    return T * (d_in + d_out) < d_in * d_out


@register_rule(nn.Linear)
class LinearRule(Rule):
    """Per-example norms and clipped sums for ``y = x W^T + b``.

    With ``A_i`` ``[T, d_in]`` the input and ``G_i`` ``[T, d_out]`` the output
    gradient of example ``i``, the per-example gradients are
    ``dW_i = G_i^T A_i`` and ``db_i = G_i^T 1``.

    * ``T == 1`` (2-D input): ``||dW_i||_F^2 = ||g_i||^2 ||a_i||^2`` (Goodfellow
      2015, "Efficient per-example gradient computations", arXiv:1510.01799).
    * ``T > 1``, ghost norm: ``||G_i^T A_i||_F^2 = <A_i A_i^T, G_i G_i^T>``
      (Li et al. 2022, Eq. 4). The activation gram ``A_i A_i^T`` is computed once
      per input tensor and shared by all Linear layers that read it (query, key
      and value projections).
    * ``T > 1``, small layers: instantiate ``G_i^T A_i`` (batched matmul) and
      take its norm, when cheaper (:func:`use_ghost_norm`).
    * Clipped sum (book-keeping, Bu et al. 2023, Alg. 1):
      ``sum_i c_i G_i^T A_i = (c * G)^T A`` as one matmul over all ``B T`` rows,
      the same size as the ordinary weight-gradient matmul.
    """

    def capture(self, module, inputs, output, batch_size):
        return inputs[0], None

    def norm_sq(self, cap: Capture, grad_out, names, cache) -> Tuple[torch.Tensor, Any]:
        A = _as_3d(cap.activation)
        G = _as_3d(grad_out)
        B, T, d_in = A.shape
        d_out = G.shape[-1]
        total = G.new_zeros(B)
        bias_pe = None
        if "weight" in names:
            if T == 1:
                total = total + G.squeeze(1).pow(2).sum(1) * A.squeeze(1).pow(2).sum(1)
            elif use_ghost_norm(T, d_in, d_out):
                key = ("gram", id(cap.activation))
                aa = cache.get(key)
                if aa is None:
                    aa = torch.bmm(A, A.transpose(1, 2))  # [B, T, T]
                    cache[key] = aa
                gg = torch.bmm(G, G.transpose(1, 2))  # [B, T, T]
                # <aa_i, gg_i> for all i as one batched dot product
                total = total + torch.bmm(aa.reshape(B, 1, T * T), gg.reshape(B, T * T, 1)).reshape(B)
            else:
                dW = torch.bmm(G.transpose(1, 2), A)  # [B, d_out, d_in]
                total = total + dW.pow(2).flatten(1).sum(1)
        if "bias" in names:
            bias_pe = G.sum(1)  # [B, d_out], kept for the clipped sum
            total = total + bias_pe.pow(2).sum(1)
        return total, bias_pe

    def add_clipped(self, cap, grad_out, clip, state, names, sums) -> None:
        A = _as_3d(cap.activation)
        G = _as_3d(grad_out)
        d_in, d_out = A.shape[-1], G.shape[-1]
        c = clip.to(G.dtype)
        if "bias" in names:
            bias_pe = state if state is not None else G.sum(1)
            _add(sums, "bias", c @ bias_pe)
        if "weight" in names:
            # clip factors folded into G, in place: the engine owns grad_out and drops it after this call
            Gc2 = G.mul_(c.view(-1, 1, 1)).reshape(-1, d_out)
            A2 = A.reshape(-1, d_in)
            if sums.get("weight") is None:
                sums["weight"] = torch.mm(Gc2.t(), A2)
            else:
                sums["weight"].addmm_(Gc2.t(), A2)

    def per_example_grads(self, cap, grad_out, names) -> Dict[str, torch.Tensor]:
        A = _as_3d(cap.activation)
        G = _as_3d(grad_out)
        out = {}
        if "weight" in names:
            out["weight"] = torch.bmm(G.transpose(1, 2), A)
        if "bias" in names:
            out["bias"] = G.sum(1)
        return out
