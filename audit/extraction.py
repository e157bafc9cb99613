"""Canary extraction by white-box model inversion.

The attack of Parikh, Dupuy & Gupta (2022), "Canary Extraction in Natural Language
Understanding Models" (ACL 2022, short papers): the attacker knows the canary's
prefix (template) and label and the trained classifier's weights, and recovers the
secret by inverting the model. The discrete secret tokens are relaxed to a
distribution over the candidate tokens (here the 10 digit tokens) at each secret
position; the input embedding at position j is the mixture

.. math::

    e_j = \\sum_{t=0}^{9} y_{j,t} E[\\mathrm{digit}_t],\\qquad
    y_j = \\mathrm{softmax}\\big((\\theta_j + g_j) / \\tau\\big),\\;
    g_{j,t} \\sim \\mathrm{Gumbel}(0, 1)

(Gumbel-softmax, Jang et al. 2017; optionally straight-through: the forward pass
uses the one-hot argmax, the gradient that of y). The logits theta are optimised with
Adam to minimise the cross-entropy of the canary's label, fed to the model as
``inputs_embeds`` (the model adds position/type embeddings itself), with the
temperature annealed geometrically from ``tau_start`` to ``tau_end``. Several random
restarts are run in one batch; each restart's argmax decoding is scored exactly
(discrete tokens). Optionally (``refine_sweeps > 0``, our addition to the published
attack) each decoding is then polished by greedy coordinate descent on the discrete
loss: for each secret position in turn, all 10 digits are tried with the others
fixed and the best kept, until a sweep changes nothing (at most ``refine_sweeps``
sweeps, 10 * d * restarts forward passes each). The lowest-loss decoding is returned.

A successful extraction is exact recovery of all d digits; random guessing succeeds
with probability 10**-d.

Cost: one forward+backward of a [restarts, L] batch per step; for all-MiniLM-L6-v2
on CPU roughly 0.3 s per step with 4 restarts (so ~1 min per canary at 150 steps on a
busy 2-core machine); a tiny BERT takes milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .canaries import Canary, label_index, secret_token_layout

__all__ = ["ExtractionResult", "extract_secret", "ExtractionReport", "extraction_audit"]


@dataclass(frozen=True)
class ExtractionResult:
    """Outcome of :func:`extract_secret`.

    Attributes
    ----------
    secret : str
        Best decoded secret (compact digits).
    loss : float
        Label cross-entropy (nats) of the decoded secret, discrete tokens.
    restart_secrets : list of str
        Decoded secret of each restart.
    restart_losses : list of float
        Their discrete losses (nats).
    """

    secret: str
    loss: float
    restart_secrets: list = field(default_factory=list)
    restart_losses: list = field(default_factory=list)


def _forward_logits(model, embeds: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return model(inputs_embeds=embeds, attention_mask=mask, token_type_ids=torch.zeros_like(mask)).logits


def extract_secret(
    model: torch.nn.Module,
    tokenizer,
    prefix: str,
    label_id: int,
    n_digits: int = 4,
    suffix: str = "",
    *,
    steps: int = 150,
    restarts: int = 4,
    lr: float = 0.3,
    tau_start: float = 2.0,
    tau_end: float = 0.1,
    straight_through: bool = False,
    refine_sweeps: int = 2,
    seed: int = 0,
) -> ExtractionResult:
    """Recover a canary's secret digits by Gumbel-softmax model inversion.

    Parameters
    ----------
    model : HF sequence classifier
        Must accept ``inputs_embeds`` and expose ``get_input_embeddings()``. Its
        parameters are not changed and get no ``.grad`` (gradients are taken with
        ``torch.autograd.grad`` w.r.t. the relaxation only); eval mode during the
        attack, previous mode restored.
    tokenizer : HF tokenizer with one token per digit.
    prefix : str
        Known text before the secret.
    label_id : int
        Class index of the canary's label.
    n_digits : int, default 4
    suffix : str, default ""
    steps : int, default 150
        Adam steps.
    restarts : int, default 4
        Independent random initialisations (optimised together as a batch).
    lr : float, default 0.3
        Adam learning rate on the logits theta [restarts, n_digits, 10].
    tau_start, tau_end : float
        Gumbel-softmax temperature, annealed geometrically over the steps (> 0).
    straight_through : bool, default False
        Hard one-hot forward with the soft gradient.
    refine_sweeps : int, default 2
        Greedy discrete coordinate-descent sweeps after decoding (0 = the plain
        relaxation attack).
    seed : int
        Seeds theta's initialisation and the Gumbel noise.

    Returns
    -------
    ExtractionResult

    Raises
    ------
    ValueError
        If steps/restarts < 1, a temperature is not positive, or the tokenizer does
        not give one token per digit.
    """
    if steps < 1 or restarts < 1:
        raise ValueError("steps and restarts must be >= 1")
    if tau_start <= 0 or tau_end <= 0:
        raise ValueError("temperatures must be positive")
    base, positions, digit_ids = secret_token_layout(tokenizer, prefix, suffix, n_digits)
    dev = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    emb_layer = model.get_input_embeddings()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            base_t = torch.tensor(base, dtype=torch.long, device=dev)
            base_emb = emb_layer(base_t).detach()  # [L, H]
            digit_emb = emb_layer(torch.tensor(digit_ids, dtype=torch.long, device=dev)).detach()  # [10, H]
        L = base_emb.shape[0]
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        keep = torch.ones(L, 1, device=dev, dtype=base_emb.dtype)
        keep[pos] = 0.0
        # scatter matrix P [L, n]: P[positions[j], j] = 1
        scatter = torch.zeros(L, n_digits, device=dev, dtype=base_emb.dtype)
        scatter[pos, torch.arange(n_digits, device=dev)] = 1.0
        theta = (0.01 * torch.randn(restarts, n_digits, 10, generator=gen)).to(dev).requires_grad_(True)
        opt = torch.optim.Adam([theta], lr=lr)
        target = torch.full((restarts,), int(label_id), dtype=torch.long, device=dev)
        ratio = (tau_end / tau_start) ** (1.0 / max(1, steps - 1))
        for step in range(steps):
            tau = tau_start * ratio**step
            u = torch.rand(theta.shape, generator=gen).clamp_(1e-10, 1.0 - 1e-10).to(dev)
            g = -torch.log(-torch.log(u))
            y = F.softmax((theta + g) / tau, dim=-1)
            if straight_through:
                hard = F.one_hot(y.argmax(-1), 10).to(y.dtype)
                y = hard + y - y.detach()
            secret_emb = y @ digit_emb  # [R, n, H]
            embeds = base_emb.unsqueeze(0) * keep + torch.einsum("ln,rnh->rlh", scatter, secret_emb)
            loss = F.cross_entropy(_forward_logits(model, embeds).float(), target, reduction="sum")
            (grad,) = torch.autograd.grad(loss, theta)
            opt.zero_grad(set_to_none=True)
            theta.grad = grad
            opt.step()
        with torch.no_grad():
            digit_tok = torch.tensor(digit_ids, device=dev)

            def discrete_losses(codes: torch.Tensor) -> torch.Tensor:  # codes [K, n] -> [K]
                ids = base_t.unsqueeze(0).repeat(codes.shape[0], 1)
                ids[:, pos] = digit_tok[codes]
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                               token_type_ids=torch.zeros_like(ids)).logits
                tgt = torch.full((codes.shape[0],), int(label_id), dtype=torch.long, device=dev)
                return F.cross_entropy(logits.float(), tgt, reduction="none")

            decoded = theta.argmax(-1)  # [R, n]
            cur = discrete_losses(decoded)
            for _ in range(refine_sweeps):
                changed = False
                for j in range(n_digits):
                    trial = decoded.unsqueeze(1).repeat(1, 10, 1)  # [R, 10, n]
                    trial[:, :, j] = torch.arange(10, device=dev)
                    tl = discrete_losses(trial.reshape(-1, n_digits)).reshape(restarts, 10)
                    best_d = tl.argmin(1)
                    better = tl.gather(1, best_d[:, None]).squeeze(1) < cur
                    if bool(better.any()):
                        changed = True
                        decoded[better, j] = best_d[better]
                        cur = torch.where(better, tl.gather(1, best_d[:, None]).squeeze(1), cur)
                if not changed:
                    break
            losses = cur.cpu().tolist()
    finally:
        model.train(was_training)
    secrets = ["".join(str(int(d)) for d in row) for row in decoded.cpu()]
    best = int(np.argmin(losses))
    return ExtractionResult(secrets[best], float(losses[best]), secrets, [float(x) for x in losses])


@dataclass(frozen=True)
class ExtractionReport:
    """Extraction over a set of canaries.

    Attributes
    ----------
    n_canaries : int
    n_exact : int
        Canaries whose every digit was recovered.
    exact_rate : float
        n_exact / n_canaries (0 for no canaries).
    chance_rate : float
        Mean over canaries of 10**-d, the exact-recovery rate of random guessing.
    digit_accuracy : float
        Fraction of digits recovered in place (chance 0.1).
    recovered : dict
        canary_id -> decoded secret.
    """

    n_canaries: int
    n_exact: int
    exact_rate: float
    chance_rate: float
    digit_accuracy: float
    recovered: dict


def extraction_audit(
    model: torch.nn.Module,
    tokenizer,
    canaries: Sequence[Canary],
    label2id: Mapping[Hashable, int] | None = None,
    **attack_kwargs,
) -> ExtractionReport:
    """Run :func:`extract_secret` on each canary and report exact recovery vs chance.

    Parameters
    ----------
    model, tokenizer
        As :func:`extract_secret`.
    canaries : sequence of Canary
        Typically reported separately for included and excluded canaries (the
        excluded ones are the control: their rate estimates what the template/label
        alone reveals).
    label2id : mapping, optional
        Label -> class index for non-int labels (default ``model.config.label2id``).
    **attack_kwargs
        Passed to :func:`extract_secret` (steps, restarts, lr, ...); ``seed`` is
        offset by the canary id.

    Returns
    -------
    ExtractionReport

    Raises
    ------
    KeyError
        If a label cannot be mapped.
    ValueError
        As :func:`extract_secret`.
    """
    seed = int(attack_kwargs.pop("seed", 0))
    recovered, n_exact, n_digits_ok, n_digits_all, chance = {}, 0, 0, 0, 0.0
    for c in canaries:
        lid = label_index(c.label, label2id, model)
        res = extract_secret(model, tokenizer, c.prefix, lid, c.n_digits, c.suffix,
                             seed=seed + c.canary_id, **attack_kwargs)
        recovered[c.canary_id] = res.secret
        n_exact += int(res.secret == c.secret)
        n_digits_ok += sum(a == b for a, b in zip(res.secret, c.secret))
        n_digits_all += c.n_digits
        chance += 10.0 ** (-c.n_digits)
    n = len(canaries)
    return ExtractionReport(
        n, n_exact, n_exact / n if n else 0.0, chance / n if n else 0.0,
        n_digits_ok / n_digits_all if n_digits_all else 0.0, recovered,
    )
