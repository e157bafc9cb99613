"""Rule for ``nn.LayerNorm``."""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register_rule
from .base import Capture, Rule, _add


@register_rule(nn.LayerNorm)
class LayerNormRule(Rule):
    """Per-example gradients of LayerNorm's affine parameters, instantiated.

    With ``xhat`` the normalised input (``F.layer_norm`` without affine) and
    ``G`` the output gradient, both ``[B, ..., *normalized_shape]``:
    ``dgamma_i = sum_t G_i[t] * xhat_i[t]`` and ``dbeta_i = sum_t G_i[t]``
    (chain rule on ``y = gamma * xhat + beta``; the same formula as Opacus'
    ``grad_sample/layer_norm.py``). These are only ``[B, *normalized_shape]``, so
    instantiation is the cheapest route; they are kept from the norm step and
    reused for the clipped sum ``sum_i c_i dgamma_i``.
    """

    def capture(self, module, inputs, output, batch_size):
        return inputs[0], None

    def per_example_grads(self, cap: Capture, grad_out, names) -> Dict[str, torch.Tensor]:
        m = cap.module
        k = len(m.normalized_shape)
        B = grad_out.shape[0]
        G = grad_out.reshape(B, -1, *m.normalized_shape)
        out = {}
        if "weight" in names:
            xhat = F.layer_norm(cap.activation, m.normalized_shape, eps=m.eps)
            out["weight"] = (G * xhat.reshape(G.shape)).sum(1)
        if "bias" in names:
            out["bias"] = G.sum(1)
        del k
        return out

    def norm_sq(self, cap, grad_out, names, cache):
        pe = self.per_example_grads(cap, grad_out, names)
        total = grad_out.new_zeros(grad_out.shape[0])
        for g in pe.values():
            total = total + g.pow(2).flatten(1).sum(1)
        return total, pe

    def add_clipped(self, cap, grad_out, clip, state, names, sums, cache=None) -> None:
        pe = state if state is not None else self.per_example_grads(cap, grad_out, names)
        for name in names:
            g = pe[name]
            _add(sums, name, torch.tensordot(clip.to(g.dtype), g, dims=1))
