"""Positive-congruent training (issue 16): the focal distillation term and its place inside the
per-example loss that DP-SGD clips."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mechanisms.aggregate import clipped_gradient_sum
from mechanisms.training import teacher_logits
from dp.secure_random import NoiseSource
from nlu.congruent import TEACHER_KEY, focal_distillation
from nlu.data import Encoded
from nlu.tasks import make_task

LABELS = 4


def test_focal_distillation_by_hand():
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [2.0, 1.0, 0.0]])
    teacher = torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    labels = torch.tensor([1, 1, 2])  # teacher right, wrong, right
    got = focal_distillation(logits, teacher, labels)
    p_old = np.exp(teacher.numpy()) / np.exp(teacher.numpy()).sum(1, keepdims=True)
    p_new = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True)
    kl = (p_old * np.log(p_old / p_new)).sum(1)
    assert got[1].item() == 0.0  # the old release got example 1 wrong: no term
    np.testing.assert_allclose(got[[0, 2]].numpy(), kl[[0, 2]], rtol=1e-6)
    # T^2 * KL of the softened distributions
    t = 2.0
    p_old_t = np.exp(teacher.numpy() / t) / np.exp(teacher.numpy() / t).sum(1, keepdims=True)
    p_new_t = np.exp(logits.numpy() / t) / np.exp(logits.numpy() / t).sum(1, keepdims=True)
    kl_t = t * t * (p_old_t * np.log(p_old_t / p_new_t)).sum(1)
    np.testing.assert_allclose(focal_distillation(logits, teacher, labels, t)[[0, 2]].numpy(), kl_t[[0, 2]], rtol=1e-6)


def test_focal_distillation_is_zero_and_flat_at_the_teacher():
    teacher = torch.randn(5, LABELS, dtype=torch.float64)
    labels = teacher.argmax(-1)
    logits = teacher.clone().requires_grad_(True)
    loss = focal_distillation(logits, teacher, labels)
    assert loss.abs().max().item() < 1e-12
    (g,) = torch.autograd.grad(loss.sum(), logits)
    assert g.abs().max().item() < 1e-12


def test_focal_distillation_rejects_bad_shapes():
    with pytest.raises(ValueError, match="teacher logits"):
        focal_distillation(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        focal_distillation(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 0.0)


def test_task_rejects_negative_weight():
    with pytest.raises(ValueError, match="--pc-weight"):
        make_task("intent", LABELS, pc_weight=-1.0)


def _tiny(task, seed=0):
    model = task.build_model("tiny", seed=seed).double()
    for m in model.modules():  # no dropout: brute force and engine see the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _device_data(n=7, seed=3):
    rng = np.random.default_rng(seed)
    ids = [[101] + list(rng.integers(1000, 2000, size=int(rng.integers(3, 9)))) + [102] for _ in range(n)]
    return Encoded(input_ids=ids, labels=rng.integers(0, LABELS, size=n).astype(np.int64))


def _brute_clipped_sum(model, task, data, teacher, C):
    params = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    total = {k: torch.zeros_like(p) for k, p in params}
    for i in range(len(data)):
        batch = task.collate(data, [i])
        if teacher is not None:
            batch[TEACHER_KEY] = teacher[i : i + 1]
        loss = task.per_example_loss(model, batch).sum()
        gs = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        gs = [torch.zeros_like(p) if g is None else g for g, (_, p) in zip(gs, params)]
        scale = min(1.0, C / torch.sqrt(sum(g.pow(2).sum() for g in gs)).item())
        for (k, _), g in zip(params, gs):
            total[k] += scale * g
    return total


def test_pc_term_is_inside_the_clipped_per_example_loss():
    """The device's clipped gradient sum with --pc-weight equals brute force on CE + lambda * FD,
    example by example, and differs from the sum without the term (so the term is really there)."""
    task = make_task("intent", LABELS, pc_weight=2.0)
    old = _tiny(task, seed=1)
    data = _device_data()
    teacher = teacher_logits(old, data, task, batch_size=3).double()
    assert teacher.shape == (len(data), LABELS)
    data.labels[:4] = teacher[:4].argmax(-1).numpy()  # the old release gets at least 4 of 7 right
    model = _tiny(task, seed=0)
    C = 0.05  # small enough that every example is clipped (the clip acts on the whole loss)
    got = clipped_gradient_sum(model, data, sample_rate=1.0, max_grad_norm=C, physical_batch_size=3,
                               noise=NoiseSource(0), task=task, teacher=teacher)
    ref = _brute_clipped_sum(model, task, data, teacher, C)
    plain = _brute_clipped_sum(model, task, data, None, C)
    assert set(got) == set(ref)
    for k in ref:
        scale = max(ref[k].abs().max().item(), 1e-12)
        assert (got[k] - ref[k]).abs().max().item() <= 1e-6 * scale, k
    diff = max((ref[k] - plain[k]).abs().max().item() for k in ref)
    assert diff > 1e-4
    # every per-example gradient was clipped to C, so the sum's norm is at most n * C
    norm = torch.sqrt(sum(v.pow(2).sum() for v in got.values())).item()
    assert norm <= len(data) * C * (1 + 1e-9)


def test_joint_task_distils_its_intent_logits():
    task = make_task("joint", LABELS, ["O", "B-x", "I-x"], pc_weight=1.0)
    assert task.pc_weight == 1.0
    slots = make_task("slots", LABELS, ["O", "B-x", "I-x"], pc_weight=1.0)
    batch = {"labels": torch.zeros(2, dtype=torch.long), TEACHER_KEY: torch.zeros(2, LABELS)}
    loss = torch.ones(2)
    assert torch.equal(slots._with_pc(loss, None, batch), loss)  # no intent logits: nothing added
    logits = torch.tensor([[0.0, 1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    teacher = torch.tensor([[3.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    batch[TEACHER_KEY] = teacher
    added = task._with_pc(loss, logits, batch) - loss
    np.testing.assert_allclose(added.numpy(), focal_distillation(logits, teacher, batch["labels"]).numpy(), rtol=1e-6)
    assert (added > 0).all()


def test_pc_settings_are_checked():
    from settings.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="--pc-weight.*slots"):
        RunConfig(task="slots", pc_weight=1.0).validate()
    with pytest.raises(ConfigError, match="--pc-weight"):
        RunConfig(pc_weight=-0.5).validate()
    assert RunConfig(task="joint", pc_weight=0.5).validate().pc_weight == 0.5
