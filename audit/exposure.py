"""Canary exposure (Carlini, Liu, Erlingsson, Kos, Song 2019, "The Secret Sharer:
Evaluating and Testing Unintended Memorization in Neural Networks", USENIX Security).

For a canary with secret s among a candidate space R (all 10**d digit codes), rank
every candidate r by the model's loss on the canary's *label* when the canary text
carries r (lower loss = better rank; rank 1 = best). Their Definition 4:

.. math::

    \\mathrm{exposure}(s) = \\log_2 |R| - \\log_2 \\mathrm{rank}(s).

Exposure lies in [0, log2 |R|]; log2(10**4) = 13.29 bits for 4-digit codes. For a
secret the model never saw, the rank is uniform on 1..N (N = |R|) and the expected
exposure is (see :func:`expected_exposure_uniform`)

.. math::

    E[\\log_2 N - \\log_2 R] = \\log_2 N - \\frac{\\log_2 N!}{N}
        \\approx \\frac{1}{\\ln 2} - \\frac{\\ln(2\\pi N)}{2 N \\ln 2}
        \\to 1/\\ln 2 \\approx 1.4427 \\text{ bits},

by Stirling's formula (1.4420 bits for N = 10**4).

Scoring is batched: the candidate texts differ only in the digit tokens, so the
input_ids are built once and the digit positions substituted (one token per digit,
checked by :func:`audit.canaries.secret_token_layout`). On 2 CPU cores all 10**4
candidates of a ~10-token canary take tens of seconds under all-MiniLM-L6-v2.
"""

from __future__ import annotations

import math
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .canaries import Canary, label_index, secret_token_layout

__all__ = [
    "expected_exposure_uniform",
    "all_codes",
    "exposure_from_losses",
    "sampled_exposure",
    "candidate_losses",
    "canary_exposure",
    "exposures",
]


def expected_exposure_uniform(n_candidates: int) -> float:
    """Expected exposure (bits) when the rank is uniform on 1..N: log2 N - log2(N!)/N.

    Parameters
    ----------
    n_candidates : int
        N >= 1.

    Returns
    -------
    float
        Bits; 0 for N = 1, tends to 1/ln 2 ~= 1.4427 as N grows.

    Raises
    ------
    ValueError
        If N < 1.
    """
    if n_candidates < 1:
        raise ValueError("n_candidates must be >= 1")
    n = float(n_candidates)
    return (math.log(n) - math.lgamma(n + 1.0) / n) / math.log(2.0)


def all_codes(n_digits: int) -> np.ndarray:
    """All 10**d codes as digits: int64 array [10**d, d], row k = the digits of k.

    Raises
    ------
    ValueError
        If n_digits < 1 or > 7 (10**7 candidates is beyond what we score).
    """
    if not 1 <= n_digits <= 7:
        raise ValueError("n_digits must be in 1..7")
    k = np.arange(10**n_digits, dtype=np.int64)
    powers = 10 ** np.arange(n_digits - 1, -1, -1, dtype=np.int64)
    return (k[:, None] // powers[None, :]) % 10


def exposure_from_losses(losses: Sequence[float], true_index: int) -> float:
    """Exposure of candidate ``true_index`` given every candidate's loss.

    rank = 1 + #{r : loss_r < loss_true} + (#{r != true : loss_r == loss_true}) / 2
    (ties share the mid-rank, so a constant scorer gives the chance value ~1 bit
    rather than the maximum); exposure = log2 N - log2 rank (Carlini et al. 2019,
    Definition 4).

    Parameters
    ----------
    losses : array_like, shape [N]
        Loss (nats or any monotone unit) of each candidate; lower = more likely.
    true_index : int
        Index of the real secret in ``losses`` (for digit codes: int(secret)).

    Returns
    -------
    float
        Exposure in bits, in [0, log2 N].

    Raises
    ------
    ValueError
        If losses is empty or not finite.
    IndexError
        If true_index is out of range.
    """
    x = np.asarray(losses, dtype=float).reshape(-1)
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError("losses must be a non-empty finite array")
    if not 0 <= true_index < x.size:
        raise IndexError(f"true_index {true_index} out of range for {x.size} candidates")
    t = x[true_index]
    rank = 1.0 + float((x < t).sum()) + 0.5 * float((x == t).sum() - 1)
    return math.log2(x.size) - math.log2(rank)


@torch.no_grad()
def candidate_losses(
    model: torch.nn.Module,
    tokenizer,
    prefix: str,
    label_id: int,
    n_digits: int = 4,
    suffix: str = "",
    batch_size: int = 1024,
    indices: Sequence[int] | None = None,
) -> np.ndarray:
    """Loss of ``label_id`` for every digit code in the canary's secret slot.

    Builds ``[CLS] prefix d1 .. dn suffix [SEP]`` for all 10**n codes by substituting
    digit token ids into one tokenised template, then runs the model (eval mode,
    no grad; mode restored) in batches.

    Parameters
    ----------
    model : HF sequence classifier
        Called as ``model(input_ids=, attention_mask=, token_type_ids=).logits``
        -> [B, num_labels].
    tokenizer : HF tokenizer with one token per digit (BERT wordpiece).
    prefix : str
        Text before the secret.
    label_id : int
        Class index of the canary's label.
    n_digits : int, default 4
    suffix : str, default ""
        Text after the secret (with its leading space).
    batch_size : int, default 1024
    indices : sequence of int, optional
        Score only these codes (integers in [0, 10**n_digits)); default all.

    Returns
    -------
    ndarray, shape [10**n_digits] (or [len(indices)]), float64
        Cross-entropy (nats) of ``label_id``; entry k is the code with digits of k
        (zero-padded), so the secret "0042" is entry 42 (with ``indices``, entry j
        is code ``indices[j]``).

    Raises
    ------
    ValueError
        If the tokenizer does not give one token per digit (see
        :func:`audit.canaries.secret_token_layout`).
    """
    base, positions, digit_ids = secret_token_layout(tokenizer, prefix, suffix, n_digits)
    dev = next(model.parameters()).device
    codes = torch.from_numpy(all_codes(n_digits))
    if indices is not None:
        codes = codes[torch.as_tensor(np.asarray(indices, dtype=np.int64))]
    digit_tok = torch.tensor(digit_ids, dtype=torch.long)
    base_t = torch.tensor(base, dtype=torch.long)
    pos = torch.tensor(positions, dtype=torch.long)
    out = np.empty(codes.shape[0], dtype=np.float64)
    was_training = model.training
    model.eval()
    try:
        for i in range(0, codes.shape[0], batch_size):
            c = codes[i : i + batch_size]
            ids = base_t.unsqueeze(0).repeat(c.shape[0], 1)
            ids[:, pos] = digit_tok[c]
            ids = ids.to(dev)
            logits = model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                token_type_ids=torch.zeros_like(ids),
            ).logits
            target = torch.full((ids.shape[0],), int(label_id), dtype=torch.long, device=dev)
            out[i : i + c.shape[0]] = F.cross_entropy(logits.float(), target, reduction="none").cpu().numpy()
    finally:
        model.train(was_training)
    return out


def canary_exposure(
    model: torch.nn.Module,
    tokenizer,
    canary: Canary,
    label2id: Mapping[Hashable, int] | None = None,
    batch_size: int = 1024,
    n_samples: int | None = None,
    seed: int = 0,
) -> float:
    """Exposure (bits) of one canary's secret among all 10**d codes.

    Parameters as :func:`exposures`.

    Raises
    ------
    KeyError
        If the canary's label cannot be mapped (see :func:`audit.canaries.label_index`).
    ValueError
        As :func:`candidate_losses`.
    """
    return float(exposures(model, tokenizer, [canary], label2id, batch_size, n_samples, seed)[0])


def sampled_exposure(losses_others: Sequence[float], true_loss: float, n_candidates: int) -> float:
    """Exposure estimated from a uniform sample of the other candidates.

    rank_hat = 1 + (N - 1) * (#{sampled loss < true} + #{sampled loss == true} / 2) / S,
    an unbiased estimate of the exact (mid-)rank for S candidates sampled without
    replacement from the N - 1 others; exposure_hat = log2 N - log2 rank_hat. It
    resolves exposures up to about log2(N / S) reliably; when no sampled candidate
    beats the secret it returns the maximum log2 N (an over-estimate in that case).
    (Carlini et al. 2019, Section 4.2, also estimate rank from samples.)

    Raises
    ------
    ValueError
        If the sample is empty or N < 2.
    """
    x = np.asarray(losses_others, dtype=float).reshape(-1)
    if x.size == 0 or n_candidates < 2:
        raise ValueError("need a non-empty sample and n_candidates >= 2")
    frac = (float((x < true_loss).sum()) + 0.5 * float((x == true_loss).sum())) / x.size
    rank = 1.0 + (n_candidates - 1) * frac
    return math.log2(n_candidates) - math.log2(rank)


def exposures(
    model: torch.nn.Module,
    tokenizer,
    canaries: Sequence[Canary],
    label2id: Mapping[Hashable, int] | None = None,
    batch_size: int = 1024,
    n_samples: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Exposure (bits) of each canary.

    Exact (``n_samples=None``): all 10**d codes are scored, shared between canaries
    with the same (prefix, suffix, label, n_digits); ~1 min per distinct key for
    all-MiniLM-L6-v2 on 2 CPU cores. Estimated (``n_samples=S``): the secret and S
    other codes drawn uniformly without replacement (seeded per canary) are scored
    and :func:`sampled_exposure` is returned -- use this for many canaries.

    Parameters
    ----------
    model : HF sequence classifier
    tokenizer : HF tokenizer
    canaries : sequence of Canary
    label2id : mapping, optional
        Label -> class index when canary labels are not ints (default:
        ``model.config.label2id``).
    batch_size : int, default 1024
    n_samples : int, optional
        Sample size S (1 <= S < 10**d) for the estimated exposure.
    seed : int, default 0

    Returns
    -------
    ndarray, shape [len(canaries)], float64

    Raises
    ------
    KeyError, ValueError
        As :func:`canary_exposure`.
    """
    cache: dict[tuple, np.ndarray] = {}
    out = np.empty(len(canaries), dtype=np.float64)
    for j, c in enumerate(canaries):
        lid = label_index(c.label, label2id, model)
        if n_samples is not None:
            n = 10**c.n_digits
            if not 1 <= n_samples < n:
                raise ValueError(f"n_samples must be in [1, {n}), got {n_samples}")
            rng = np.random.default_rng([seed, c.canary_id])
            true_idx = int(c.secret)
            others = rng.choice(n - 1, size=n_samples, replace=False)
            others = others + (others >= true_idx)  # skip the secret itself
            idx = np.concatenate([[true_idx], others])
            ls = candidate_losses(model, tokenizer, c.prefix, lid, c.n_digits, c.suffix, batch_size, idx)
            out[j] = sampled_exposure(ls[1:], ls[0], n)
            continue
        key = (c.prefix, c.suffix, lid, c.n_digits)
        if key not in cache:
            cache[key] = candidate_losses(model, tokenizer, c.prefix, lid, c.n_digits, c.suffix, batch_size)
        out[j] = exposure_from_losses(cache[key], int(c.secret))
    return out
