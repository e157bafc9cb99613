"""Rule for ``nn.Embedding`` (including ids broadcast over the batch)."""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

from . import register_rule
from .base import Capture, Rule, _add


def _ids_grads_mask(cap: Capture, grad_out: torch.Tensor, module: nn.Embedding):
    """Return ``ids [B, T]``, ``G [B, T, d]`` and the mask of non-padding positions (or None)."""
    ids = cap.activation
    B = grad_out.shape[0]
    ids = ids.expand(B, *ids.shape[1:]).reshape(B, -1)
    G = grad_out.reshape(B, -1, module.embedding_dim)
    # nn.Embedding's backward gives the padding row no gradient.
    mask = None if module.padding_idx is None else ids != module.padding_idx
    return ids, G, mask


def _small_table(module: nn.Embedding, T: int) -> bool:
    """Instantiate per-example table gradients ``[B, V, d]`` when they are no bigger than ``G``."""
    return module.num_embeddings <= T


@register_rule(nn.Embedding)
class EmbeddingRule(Rule):
    """Per-example norms and clipped sums for an embedding lookup.

    Example ``i``'s gradient of the table ``W`` ``[V, d]`` has row
    ``v = sum_{t: id_it = v} G_i[t]``, so
    ``||dW_i||_F^2 = sum_{t,t'} [id_it = id_it'] <G_i[t], G_i[t']>``
    (the "equal ids -> gram of output gradients" form of Li et al. 2022, App. E /
    Opacus ``embedding_norm_sample.py``). It is computed here without the
    ``[B, T, T]`` gram: ``sum_t ||G_i[t]||^2`` (one reduction over ``G``) plus,
    for ids repeated within an example only, ``||sum_group G||^2 - sum_group ||G||^2``
    over the groups of equal ids, found by sorting each example's ids. Cost
    ``O(B T d)`` plus a sort of ``B T`` ids; only the repeated positions are
    gathered. Tables with no more rows than positions (token types) instantiate
    ``[B, V, d]`` instead, and keep it for the clipped sum.

    The clipped sum ``sum_i c_i dW_i`` is one ``index_add_`` of the clip-scaled
    output gradients into the table-shaped sum (book-keeping). Ids of shape
    ``[1, T]`` used with a batch of ``B > 1`` (Hugging Face BERT's default
    position ids) are handled: the engine expands the module output to
    ``[B, T, d]`` during the forward pass so that each example's output gradient
    is kept apart; the clipped sum then first contracts the ``B`` examples
    (``c @ G``) and adds only ``T`` rows.

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
        ids, G, mask = _ids_grads_mask(cap, grad_out, m)
        T = ids.shape[1]
        if _small_table(m, T):
            pe = self.per_example_grads(cap, grad_out, names)
            return pe["weight"].reshape(B, -1).pow(2).sum(1), pe
        sq = G.pow(2).sum(-1)  # [B, T]
        if mask is not None:
            sq = sq * mask.to(sq.dtype)
            # padding positions get distinct negative keys: never grouped with anything
            ids = torch.where(mask, ids, -1 - torch.arange(T, device=ids.device))
        total = sq.sum(1)
        if T < 2:
            return total, None
        sk, perm = ids.sort(dim=1)
        eq = sk[:, 1:] == sk[:, :-1]  # [B, T-1]: sorted position s equals s-1
        if not bool(eq.any()):
            return total, None
        grouped = torch.zeros_like(sk, dtype=torch.bool)
        grouped[:, 1:] |= eq
        grouped[:, :-1] |= eq
        starts = grouped.clone()
        starts[:, 1:] &= ~eq
        bi, si = grouped.nonzero(as_tuple=True)  # row-major: each group is contiguous
        ti = perm[bi, si]
        gid = starts[bi, si].long().cumsum(0) - 1
        rows = G[bi, ti]  # [n, d], repeated positions only
        gsum = rows.new_zeros(int(gid[-1]) + 1, rows.shape[1]).index_add_(0, gid, rows)
        gb = bi[starts[bi, si]]
        total.index_add_(0, gb, gsum.pow(2).sum(1))
        total.index_add_(0, bi, -sq[bi, ti])
        return total, None

    def add_clipped(self, cap, grad_out, clip, state, names, sums, cache=None) -> None:
        if "weight" not in names:
            return
        m: nn.Embedding = cap.module
        c = clip.to(grad_out.dtype)
        if state is not None:  # small table, per-example grads kept from the norm step
            _add(sums, "weight", torch.tensordot(c, state["weight"], dims=1))
            return
        ids, G, mask = _ids_grads_mask(cap, grad_out, m)
        B, T, d = G.shape
        if sums.get("weight") is None:
            sums["weight"] = torch.zeros_like(m.weight, memory_format=torch.contiguous_format).detach()
        ids0 = cap.activation
        if B > 1 and ids0.dim() >= 1 and ids0.shape[0] == 1:
            # broadcast ids: contract the examples first, then add T rows
            rows = torch.mv(G.reshape(B, T * d).t(), c).reshape(T, d)
            flat = ids[0]
            if mask is not None:
                rows = rows * mask[0].unsqueeze(1).to(rows.dtype)
            sums["weight"].index_add_(0, flat, rows)
            return
        scale = c.view(B, 1) if mask is None else c.view(B, 1) * mask.to(c.dtype)
        Gc = (G * scale.unsqueeze(-1)).reshape(B * T, d)  # padding positions scaled to 0
        sums["weight"].index_add_(0, ids.reshape(-1), Gc)

    def per_example_grads(self, cap, grad_out, names) -> Dict[str, torch.Tensor]:
        if "weight" not in names:
            return {}
        m: nn.Embedding = cap.module
        ids, G, mask = _ids_grads_mask(cap, grad_out, m)
        B, T = ids.shape
        if mask is not None:
            G = G * mask.unsqueeze(-1).to(G.dtype)
        out = G.new_zeros(B, m.num_embeddings, m.embedding_dim)
        out.scatter_add_(1, ids.unsqueeze(-1).expand(B, T, m.embedding_dim), G)
        return {"weight": out}
