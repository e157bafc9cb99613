"""Membership inference metrics and a loss-based membership score.

Scores follow one convention throughout: higher = more likely a member (for a
loss-based attack, score = -loss; Yeom et al. 2018, "Privacy Risk in Machine
Learning: Analyzing the Connection to Overfitting"). Low-FPR reporting follows
Carlini et al. 2022, "Membership Inference Attacks From First Principles" (TPR at
1% and 0.1% FPR rather than AUC alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score, roc_curve as _sk_roc_curve

__all__ = [
    "auc",
    "roc_curve",
    "tpr_at_fpr",
    "MembershipMetrics",
    "membership_metrics",
    "per_example_loss",
    "loss_scores",
]


def _prep(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=float).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in shape")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    if y.all() or (~y).all():
        raise ValueError("need at least one member (label 1) and one non-member (label 0)")
    return s, y


def auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve (sklearn ``roc_auc_score``; ties count 1/2).

    Parameters
    ----------
    scores : array_like, shape [n]
        Higher = more likely member. Finite.
    labels : array_like of {0, 1} or bool, shape [n]
        1 = member.

    Returns
    -------
    float
        AUC in [0, 1]; 0.5 = chance, 1 = perfect.

    Raises
    ------
    ValueError
        If shapes differ, scores are not finite, or only one class is present.
    """
    s, y = _prep(scores, labels)
    return float(roc_auc_score(y, s))


def roc_curve(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve arrays (sklearn ``roc_curve`` with ``drop_intermediate=False``).

    Returns
    -------
    fpr, tpr : ndarray, shape [k]
        Non-decreasing, starting at (0, 0) and ending at (1, 1).
    thresholds : ndarray, shape [k]
        Predict member when score >= threshold; the first is +inf.

    Raises
    ------
    ValueError
        As :func:`auc`.
    """
    s, y = _prep(scores, labels)
    fpr, tpr, thr = _sk_roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr, thr


def tpr_at_fpr(
    scores: Sequence[float], labels: Sequence[int], fpr: float, method: str = "step"
) -> float:
    """True-positive rate at a target false-positive rate.

    ``method="step"`` (default, conservative): the largest TPR among ROC points with
    FPR <= target, i.e. what a single deterministic threshold achieves without
    exceeding the target FPR (as in Carlini et al. 2022). ``method="interp"``: linear
    interpolation of the ROC curve at the target FPR (``np.interp`` on the points with
    ties in FPR resolved to the highest TPR), which is achievable by randomising
    between two thresholds. With n non-members, FPR below 1/n can only be met by
    the all-negative threshold (step) or interpolation toward (0, 0).

    Parameters
    ----------
    scores, labels : array_like, shape [n]
        As :func:`auc`.
    fpr : float
        Target FPR in [0, 1] (e.g. 0.01, 0.001).
    method : {"step", "interp"}

    Returns
    -------
    float
        TPR in [0, 1].

    Raises
    ------
    ValueError
        As :func:`auc`, or on fpr outside [0, 1] or an unknown method.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    f, t, _ = roc_curve(scores, labels)
    if method == "step":
        return float(t[f <= fpr].max())
    if method == "interp":
        uf = np.unique(f)
        ut = np.array([t[f == x].max() for x in uf])
        return float(np.interp(fpr, uf, ut))
    raise ValueError(f"method must be 'step' or 'interp', got {method!r}")


@dataclass(frozen=True)
class MembershipMetrics:
    """AUC and low-FPR TPRs (step method) of a membership attack."""

    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_0_1pct_fpr: float
    n_members: int
    n_nonmembers: int


def membership_metrics(scores: Sequence[float], labels: Sequence[int]) -> MembershipMetrics:
    """AUC, TPR@1% FPR and TPR@0.1% FPR (``method="step"``) in one call.

    Raises
    ------
    ValueError
        As :func:`auc`.
    """
    s, y = _prep(scores, labels)
    return MembershipMetrics(
        auc(s, y), tpr_at_fpr(s, y, 0.01), tpr_at_fpr(s, y, 0.001), int(y.sum()), int((~y).sum())
    )


_MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


@torch.no_grad()
def per_example_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of each example under a HF sequence classifier, in eval mode.

    Independent of the data pipeline: ``batch`` holds tensors ``input_ids`` [B, L]
    (long), ``attention_mask`` [B, L], ``labels`` [B] (long class indices), and
    optionally ``token_type_ids`` / ``position_ids`` [B, L]; other keys are ignored.
    The model is put in eval mode (no dropout) for the call and its previous mode
    restored. Tensors are moved to the model's device.

    Parameters
    ----------
    model : torch.nn.Module
        Returns an object with ``.logits`` [B, num_labels] (e.g.
        ``AutoModelForSequenceClassification``).
    batch : mapping of str to Tensor

    Returns
    -------
    Tensor, shape [B], float32, on CPU
        Per-example loss in nats. Membership score = ``-loss``.

    Raises
    ------
    KeyError
        If ``input_ids``, ``attention_mask`` or ``labels`` is missing.
    """
    dev = next(model.parameters()).device
    kwargs = {k: batch[k].to(dev) for k in _MODEL_KEYS if k in batch}
    for k in ("input_ids", "attention_mask"):
        if k not in kwargs:
            raise KeyError(f"batch lacks {k!r}")
    labels = batch["labels"].to(dev)
    was_training = model.training
    model.eval()
    try:
        logits = model(**kwargs).logits
    finally:
        model.train(was_training)
    return F.cross_entropy(logits.float(), labels, reduction="none").cpu()


def loss_scores(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    label_ids: Sequence[int],
    batch_size: int = 128,
    max_length: int = 128,
) -> np.ndarray:
    """Membership scores ``-loss`` for raw texts (tokenised here, padded per batch).

    Parameters
    ----------
    model : HF sequence classifier
    tokenizer : HF tokenizer
    texts : sequence of str, length n
    label_ids : sequence of int, length n
        Class indices.
    batch_size, max_length : int

    Returns
    -------
    ndarray, shape [n], float64
        ``-per_example_loss`` (higher = more likely member).

    Raises
    ------
    ValueError
        If lengths differ.
    """
    if len(texts) != len(label_ids):
        raise ValueError("texts and label_ids differ in length")
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i : i + batch_size]), padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        enc = dict(enc)
        enc["labels"] = torch.as_tensor(list(label_ids[i : i + batch_size]), dtype=torch.long)
        out.append(per_example_loss(model, enc))
    return -torch.cat(out).double().numpy() if out else np.zeros(0)
