"""A device's local training, shared by the mechanisms whose devices train: DP-SGD with
Poisson-sampled batches (local DP-SGD) or plain minibatch training (FedAvg, DP-FedAvg).

No Flower here: a mechanism's device part (mechanisms/*.py) calls :func:`local_round` with the
device's encoded examples and the global model loaded into ``model``. Every random decision
(batches, noise, shuffling) comes from the :class:`dp.secure_random.NoiseSource` it is given.
The clipped gradient sum of the aggregate placement is in mechanisms/aggregate.py.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dp.engines import make_engine
from dp.secure_random import NoiseSource
from dp.sampling import poisson_batches, sample_rate_for, steps_for
from mechanisms.adaptive_clip import QuantileClip, count_stddev, gradient_noise_multiplier
from mechanisms.base import DeviceWork
from nlu.congruent import TEACHER_KEY
from nlu.data import Encoded, collate, per_example_loss
from nlu.model import encoder_of
from nlu.tasks import Task


@dataclass(frozen=True)
class LocalTrainConfig:
    """Settings of one device's local training (see settings.config.RunConfig for meanings; :func:`local_config`)."""

    dp: bool
    dp_engine: str
    noise_multiplier: float
    max_grad_norm: float
    batch_size: int
    physical_batch_size: int
    local_epochs: int
    optimizer: str
    learning_rate: float
    proximal_mu: float = 0.0
    head_learning_rate: float | None = None
    #: adaptive clipping of C over the local steps: (quantile gamma, eta_C, sigma_b); ``noise_multiplier``
    #: is then the clipped sums' sigma_g (mechanisms/adaptive_clip.py). None: C stays ``max_grad_norm``.
    adaptive_clip: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class LocalResult:
    """What local training did.

    ``sample_rate`` and ``steps`` describe the DP-SGD mechanism (Poisson rate q = B/n and the
    number of noisy steps); both are 0 for a non-private run. ``train_loss`` is the mean loss
    of the examples seen: a statistic of the device's data, sent only by non-private runs.
    """

    num_examples: int
    steps: int
    sample_rate: float
    train_loss: float
    seconds: float
    clip_norm: float | None = None  #: adaptive clipping: C after the last step's noised update (else None)


def param_groups(model: nn.Module, lr: float, head_lr: float | None) -> list[dict]:
    """Optimizer groups: the encoder at ``lr``, the freshly initialised head at ``head_lr``.

    Every parameter is in a group and trains; only the step size differs (discriminative
    learning rates, Howard & Ruder 2018, Sec. 3.2). Without ``head_lr`` there is one group.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    enc = encoder_of(model)
    if head_lr is None or enc is None:
        return [{"params": params, "lr": lr}]
    enc_ids = {id(p) for p in enc.parameters()}
    groups = [
        {"params": [p for p in params if id(p) in enc_ids], "lr": lr},
        {"params": [p for p in params if id(p) not in enc_ids], "lr": head_lr},
    ]
    return [g for g in groups if g["params"]]


def _optimizer(cfg: LocalTrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.learning_rate, cfg.head_learning_rate)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=0.0)


def _add_proximal_grad(model: nn.Module, start: list[torch.Tensor], mu: float) -> None:
    """Add mu * (w - w_global) to each gradient (FedProx, Li et al. 2020, Eq. 2).

    The proximal term does not depend on the data, so adding it after the DP noise costs no privacy.
    """
    for p, p0 in zip((p for p in model.parameters() if p.requires_grad), start):
        if p.grad is not None:
            p.grad.add_(p.detach() - p0, alpha=mu)


@torch.no_grad()
def teacher_logits(model: nn.Module, data, task: Task, batch_size: int = 128) -> torch.Tensor:
    """The intent logits [n, C] of ``model`` (loaded with the previous release) on each of the device's
    n examples, in eval mode (the model's mode is restored), for the focal distillation term of
    positive-congruent training (nlu/congruent.py). They stay on the device: they enter only the
    per-example loss that DP-SGD clips.

    Raises
    ------
    ValueError
        If the task has no intent logits (``--task slots``).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for s in range(0, len(data), batch_size):
            idx = np.arange(s, min(s + batch_size, len(data)))
            batch = {k: v.to(device) for k, v in task.collate(data, idx).items()}
            logits = task.intent_logits(model, batch)
            if logits is None:
                raise ValueError(f"--pc-weight: the {task.name} task has no intent logits to distil")
            out.append(logits.detach())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, task.num_labels)


def collate_with(base_collate, device, teacher: torch.Tensor | None):
    """A collate function that moves the batch to ``device`` and adds ``teacher[idx]`` (if given)."""

    def collate_fn(enc, idx):
        batch = {k: v.to(device, non_blocking=True) for k, v in base_collate(enc, idx).items()}
        if teacher is not None:
            batch[TEACHER_KEY] = teacher[torch.as_tensor(np.asarray(idx), dtype=torch.long)].to(device)
        return batch

    return collate_fn


@contextmanager
def clipping_engine(model: nn.Module, max_grad_norm: float, dp_engine: str = "dpfl", task: Task | None = None,
                    teacher: torch.Tensor | None = None):
    """The model's per-example clipping at the global model, for a device that sends gradients, not a trained
    model (noise on the aggregate, secure aggregation): yields ``(collate_fn, loss_fn, engine)``, the engine
    attached with no noise, clip ``max_grad_norm`` and expected batch size 1, the model in eval mode (no
    dropout: the server treats the sum as the gradient of one step, and dropout noise would only lower its
    signal under DP). On exit the engine is detached, the model's mode restored and every ``.grad`` cleared.
    """
    base_collate = task.collate if task is not None else collate
    loss_fn = task.per_example_loss if task is not None else per_example_loss
    collate_fn = collate_with(base_collate, next(model.parameters()).device, teacher)
    was_training = model.training
    model.eval()
    engine = None
    try:
        engine = make_engine(dp_engine, model, noise_multiplier=0.0, max_grad_norm=max_grad_norm, expected_batch_size=1.0)
        yield collate_fn, loss_fn, engine
    finally:
        if engine is not None:
            engine.detach()
        model.train(was_training)
        for p in model.parameters():
            p.grad = None


def train_local(model: nn.Module, data: Encoded, cfg: LocalTrainConfig, noise: NoiseSource, task: Task | None = None,
                teacher: torch.Tensor | None = None) -> LocalResult:
    """Train ``model`` in place on one device's examples.

    With ``cfg.dp``: ``steps = ceil(E * n / B)`` DP-SGD steps, each on a Poisson batch
    (rate q = B / n), each example's gradient over all trainable parameters clipped to
    ``max_grad_norm``, Gaussian noise of std ``noise_multiplier * max_grad_norm`` added to the
    sum, divided by the expected batch size q * n (Abadi et al. 2016, Algorithm 1), processed in
    physical micro-batches of at most ``physical_batch_size`` examples.
    Without: ``E`` epochs of shuffled minibatches of ``batch_size`` with the mean loss.
    With ``cfg.adaptive_clip`` (gamma, eta_C, sigma_b): after each step C moves by the step's
    centred count of unclipped examples plus N(0, sigma_b^2) over the expected batch size
    (:class:`mechanisms.adaptive_clip.QuantileClip`); the step's clipped sum has noise multiplier
    ``noise_multiplier`` = sigma_g, so each step is still one Gaussian of the accounted sigma.

    Parameters
    ----------
    model : torch.nn.Module
        Sequence classifier, trainable parameters as they should train.
    data : nlu.data.Encoded
        The device's examples (n = len(data) >= 1).
    cfg : LocalTrainConfig
    noise : dp.secure_random.NoiseSource
        Source of the Poisson batches, the DP noise and (without DP) the shuffling.
    task : nlu.tasks.Task, optional
        Collation and per-example (per-utterance) loss; default: intent classification.
    teacher : torch.Tensor [n, C], optional
        The previous release's logits on the device's examples (:func:`teacher_logits`): with the
        task's ``pc_weight`` > 0 each example's loss includes the focal distillation term, inside
        the clipped per-example loss.

    Returns
    -------
    LocalResult
    """
    t0 = time.perf_counter()
    base_collate = task.collate if task is not None else collate
    device = next(model.parameters()).device
    collate_fn = collate_with(base_collate, device, teacher)

    loss_fn = task.per_example_loss if task is not None else per_example_loss
    n = len(data)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(cfg, model)
    start = [p.detach().clone() for p in params] if cfg.proximal_mu > 0 else []
    model.train()
    losses_sum, losses_n = 0.0, 0

    if not cfg.dp:
        steps = 0
        for _ in range(cfg.local_epochs):
            order = np.argsort(noise.uniform(n), kind="stable")
            for s in range(0, n, cfg.batch_size):
                batch = collate_fn(data, order[s : s + cfg.batch_size])
                loss = loss_fn(model, batch)
                opt.zero_grad(set_to_none=True)
                loss.mean().backward()
                if start:
                    _add_proximal_grad(model, start, cfg.proximal_mu)
                opt.step()
                losses_sum += float(loss.detach().sum())
                losses_n += len(loss)
                steps += 1
        return LocalResult(n, 0, 0.0, losses_sum / max(losses_n, 1), time.perf_counter() - t0)

    q = sample_rate_for(n, cfg.batch_size)
    steps = steps_for(n, cfg.batch_size, cfg.local_epochs)
    engine = make_engine(
        cfg.dp_engine,
        model,
        noise_multiplier=cfg.noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        expected_batch_size=q * n,
        generator=noise,
    )
    clip = QuantileClip(cfg.max_grad_norm, *cfg.adaptive_clip) if cfg.adaptive_clip is not None else None
    try:
        for idx in poisson_batches(n, q, steps, noise):
            opt.zero_grad(set_to_none=True)
            centred = 0.0
            for s in range(0, len(idx), cfg.physical_batch_size):
                batch = collate_fn(data, idx[s : s + cfg.physical_batch_size])
                loss = loss_fn(model, batch)
                norms = engine.accumulate(loss)
                if clip is not None:
                    centred += float((norms <= engine.max_grad_norm).sum().item()) - 0.5 * len(norms)
                losses_sum += float(loss.detach().sum())
                losses_n += len(loss)
            engine.finalize()
            if start:
                _add_proximal_grad(model, start, cfg.proximal_mu)
            opt.step()
            if clip is not None:
                engine.max_grad_norm = clip.update(centred, q * n, noise)
    finally:
        engine.detach()
        opt.zero_grad(set_to_none=True)
    return LocalResult(n, steps, q, losses_sum / max(losses_n, 1), time.perf_counter() - t0,
                       clip_norm=clip.value if clip is not None else None)


def local_config(cfg, round_config, dp: bool, adaptive: bool = False) -> LocalTrainConfig:
    """The device's local training settings: the run's (``cfg``), FedProx's ``proximal-mu`` from the round config;
    with ``adaptive`` (local DP-SGD's adaptive clipping) C starts at the round's ``max-grad-norm`` and the
    steps' noise multiplier is sigma_g (:func:`mechanisms.adaptive_clip.gradient_noise_multiplier`).

    Raises
    ------
    settings.config.ConfigError
        If adaptive clipping's sigma_b is too small for sigma.
    """
    adaptive_clip, sigma = None, cfg.noise_multiplier
    if adaptive and dp:
        sigma_b = count_stddev(cfg, cfg.noise_multiplier)
        adaptive_clip = (float(cfg.adaptive_clip_quantile), float(cfg.adaptive_clip_lr), sigma_b)
        sigma = gradient_noise_multiplier(float(cfg.noise_multiplier), sigma_b)
    return LocalTrainConfig(
        dp=dp,
        dp_engine=cfg.dp_engine,
        noise_multiplier=sigma,
        max_grad_norm=float(round_config.get("max-grad-norm", cfg.max_grad_norm)) if adaptive else cfg.max_grad_norm,
        adaptive_clip=adaptive_clip,
        batch_size=cfg.batch_size,
        physical_batch_size=cfg.physical_batch_size,
        local_epochs=cfg.local_epochs,
        optimizer=cfg.optimizer,
        learning_rate=cfg.learning_rate,
        head_learning_rate=cfg.head_learning_rate,
        proximal_mu=float(round_config.get("proximal-mu", 0.0)),
    )


def local_round(cfg, work: DeviceWork, dp: bool, adaptive: bool = False) -> LocalResult:
    """One device's local training in one round (:func:`train_local`), DP-SGD when ``dp``.

    With ``--local-epochs 0`` the model is left as it came (zero DP-SGD steps; with ``dp`` the
    zero-step event keeps the sample rate min(1, B / n)): the cost of a round without training.
    """
    local = local_config(cfg, work.round_config, dp, adaptive)
    if cfg.local_epochs == 0:
        q = sample_rate_for(len(work.data), cfg.batch_size) if dp else 0.0
        return LocalResult(len(work.data), 0, q, float("nan"), 0.0,
                           clip_norm=local.max_grad_norm if local.adaptive_clip is not None else None)
    return train_local(work.model, work.data, local, noise=work.noise, task=work.task, teacher=work.teacher)

