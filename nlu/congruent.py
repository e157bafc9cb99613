"""Positive-congruent training: the focal distillation term towards a previous release.

Yan et al. 2021, "Positive-congruent training: towards regression-free model updates" (CVPR),
Sec. 4, Eq. 3: the new model is trained with

    L(x, y) = CE(f_new(x), y) + lambda * (alpha + beta * 1[argmax f_old(x) = y]) * D(f_new(x), f_old(x))

with D the KL divergence of the new model's softened prediction from the old one's
(temperature T, scaled by T^2 as in Hinton et al. 2015 so that gradients keep their size). dpfl
uses alpha = 0, beta = 1: the term acts only on the examples the old release got right, the ones
whose flip would be a negative flip. The old model's logits are constants (no gradient); the new
model's logits come from the same forward pass as its cross-entropy, so the term is part of the
one per-example loss that DP-SGD clips and it costs no privacy of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["TEACHER_KEY", "focal_distillation"]

#: Batch key of the previous release's logits [B, C] (added to a collated batch by the device).
TEACHER_KEY = "teacher_logits"


def focal_distillation(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """Per-example focal distillation term, shape [B] (Yan et al. 2021, Eq. 3, alpha 0, beta 1).

    ``1[argmax teacher_i = y_i] * T^2 * KL(softmax(teacher_i / T) || softmax(logits_i / T))``.

    Parameters
    ----------
    logits : torch.Tensor [B, C]
        The model being trained (gradients flow through these).
    teacher_logits : torch.Tensor [B, C]
        The previous release's logits on the same examples (treated as constants).
    labels : torch.Tensor [B] of int
    temperature : float
        T > 0.

    Raises
    ------
    ValueError
        If the shapes disagree or T <= 0.
    """
    if logits.shape != teacher_logits.shape or logits.shape[:1] != labels.shape:
        raise ValueError(f"focal distillation needs logits [B, C], teacher logits [B, C] and labels [B]; got "
                         f"{tuple(logits.shape)}, {tuple(teacher_logits.shape)}, {tuple(labels.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = float(temperature)
    teacher = teacher_logits.detach().to(logits.dtype)
    focus = (teacher.argmax(-1) == labels).to(logits.dtype)
    log_p_new = F.log_softmax(logits / t, dim=-1)
    log_p_old = F.log_softmax(teacher / t, dim=-1)
    kl = (log_p_old.exp() * (log_p_old - log_p_new)).sum(-1)
    return focus * kl * (t * t)
