"""Rule for ``nn.Embedding`` (including ids broadcast over the batch)."""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

from . import register_rule
from .base import Capture, Rule


def _flat_ids_and_grads(cap: Capture, grad_out: torch.Tensor, module: nn.Embedding):
    """Return ``ids [B, T]`` and ``G [B, T, d]`` with padding positions dropped (mask)."""
    ids = cap.activation
    B = grad_out.shape[0]
    d = module.embedding_dim
    ids = ids.expand(B, *ids.shape[1:]).reshape(B, -1)
    G = grad_out.reshape(B, -1, d)
    mask = None
    if module.padding_idx is not None:
        # nn.Embedding's backward gives the padding row no gradient.
        mask = ids != module.padding_idx
    return ids, G, mask


@register_rule(nn.Embedding)
class EmbeddingRule(Rule):
    """Per-example norms and clipped sums for an embedding lookup.

    Example ``i``'s gradient of the table ``W`` ``[V, d]`` has row
    ``v = sum_{t: id_it = v} G_i[t]``, so
    ``||dW_i||_F^2 = sum_{t,t'} [id_it = id_it'] <G_i[t], G_i[t']>``
    (the "equal ids -> gram of output gradients" form of Li et al. 2022, App. E /
    Opacus ``embedding_norm_sample.py``). It is computed here without the
    ``[B, T, T]`` gram, by sparse row sums: the ``(example, id)`` pairs are made
    unique (``torch.unique``), the output gradients are summed per pair with one
    ``index_add_``, and the squared row norms are summed per example. Cost
    ``O(B T d)`` plus a sort of ``B T`` keys.

    The clipped sum ``sum_i c_i dW_i`` is one ``index_add_`` of the clip-scaled
    output gradients into the table-shaped sum (book-keeping).

    Ids of shape ``[1, T]`` used with a batch of ``B > 1`` (Hugging Face BERT's
    default position ids) are handled: the engine expands the module output to
    ``[B, T, d]`` during the forward pass so that each example's output gradient
    is kept apart.

    ``padding_idx`` rows get no gradient, as in ``nn.Embedding``.
    """

    def check(self, module: nn.Embedding) -> None:
        if module.max_norm is not None:
            raise ValueError(f"Embedding with max_norm (in-place renormalisation) is not supported: {module}")
        if module.scale_grad_by_freq:
            raise ValueError(f"Embedding with scale_grad_by_freq is not supported: {module}")

    def capture(self, module, inputs, output, batch_size):
        ids = inputs[0]
        if batch_size is not None and ids.dim() >= 1 and ids.shape[0] == 1 and batch_size > 1:
            # ids broadcast over the batch: give every example its own output rows.
            return ids, output.expand(batch_size, *output.shape[1:])
        return ids, None

    def norm_sq(self, cap: Capture, grad_out, names, cache):
        m: nn.Embedding = cap.module
        B = grad_out.shape[0]
        if "weight" not in names or B == 0:
            return grad_out.new_zeros(B), None
        ids, G, mask = _flat_ids_and_grads(cap, grad_out, m)
        T = ids.shape[1]
        V = m.num_embeddings
        ex = torch.arange(B, device=ids.device).unsqueeze(1).expand(B, T)
        key = ex * V + ids  # unique per (example, id)
        Gf = G.reshape(B * T, -1)
        key = key.reshape(-1)
        if mask is not None:
            keep = mask.reshape(-1)
            key = key[keep]
            Gf = Gf[keep]
        uniq, inv = torch.unique(key, return_inverse=True)
        rows = Gf.new_zeros(uniq.shape[0], Gf.shape[1]).index_add_(0, inv, Gf)
        total = Gf.new_zeros(B).index_add_(0, torch.div(uniq, V, rounding_mode="floor"), rows.pow(2).sum(1))
        return total, None

    def add_clipped(self, cap, grad_out, clip, state, names, sums) -> None:
        if "weight" not in names:
            return
        m: nn.Embedding = cap.module
        ids, G, mask = _flat_ids_and_grads(cap, grad_out, m)
        Gc = G.mul_(clip.to(G.dtype).view(-1, 1, 1)).reshape(-1, G.shape[-1])  # engine-owned, scaled in place
        flat = ids.reshape(-1)
        if mask is not None:
            keep = mask.reshape(-1)
            flat, Gc = flat[keep], Gc[keep]
        if sums.get("weight") is None:
            sums["weight"] = torch.zeros_like(m.weight, memory_format=torch.contiguous_format).detach()
        sums["weight"].index_add_(0, flat, Gc)

    def per_example_grads(self, cap, grad_out, names) -> Dict[str, torch.Tensor]:
        if "weight" not in names:
            return {}
        m: nn.Embedding = cap.module
        ids, G, mask = _flat_ids_and_grads(cap, grad_out, m)
        B, T = ids.shape
        if mask is not None:
            G = G * mask.unsqueeze(-1).to(G.dtype)
        out = G.new_zeros(B, m.num_embeddings, m.embedding_dim)
        out.scatter_add_(1, ids.unsqueeze(-1).expand(B, T, m.embedding_dim), G)
        return {"weight": out}
