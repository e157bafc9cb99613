"""Which parameters train (--trainable) and how that reaches the config and the engine."""

import pytest
import torch

from dpfl.config import ConfigError, RunConfig
from nlu.model import build_model, parse_trainable, set_trainable


def _trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_parse_trainable():
    assert parse_trainable("all") is None
    assert parse_trainable("head") == 0
    assert parse_trainable("top2") == 2
    for bad in ("top0", "top", "encoder", "2"):
        with pytest.raises(ValueError, match="'all', 'head' or 'topN'"):
            parse_trainable(bad)


def test_set_trainable_head_and_top_layers():
    model = build_model("tiny", 5, seed=0)
    assert _trainable_names(model) == {n for n, _ in model.named_parameters()}
    set_trainable(model, "head")
    assert _trainable_names(model) == {"classifier.weight", "classifier.bias"}
    set_trainable(model, "top1")
    names = _trainable_names(model)
    assert {"classifier.weight", "classifier.bias"} <= names
    assert all(n.startswith("classifier") or n.startswith("encoder.encoder.layer.1.") for n in names)
    assert any(n.startswith("encoder.encoder.layer.1.") for n in names)
    set_trainable(model, "all")
    assert _trainable_names(model) == {n for n, _ in model.named_parameters()}
    with pytest.raises(ValueError, match="2 transformer layers"):
        set_trainable(model, "top3")


def test_trainable_flag_is_validated():
    with pytest.raises(ConfigError, match="--trainable"):
        RunConfig(model="tiny", trainable="bottom2").validate()
    RunConfig(model="tiny", trainable="top1").validate()


def test_head_only_dp_step_changes_only_the_head():
    """The engine skips frozen parameters: after a DP step only the head has moved."""
    from dp.engines import make_engine

    from nlu.data import per_example_loss

    torch.manual_seed(0)
    model = set_trainable(build_model("tiny", 3, seed=0), "head")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine = make_engine("dpfl", model, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    ids = torch.randint(1000, 2000, (4, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
             "position_ids": torch.arange(6).unsqueeze(0).expand(4, 6), "labels": torch.tensor([0, 1, 2, 0])}
    try:
        norms = engine.accumulate(per_example_loss(model, batch))
        engine.finalize()
    finally:
        engine.detach()
    assert norms.shape == (4,) and bool((norms > 0).all())
    opt.step()
    for n, p in model.named_parameters():
        moved = not torch.equal(p.detach(), before[n])
        assert moved == n.startswith("classifier"), n
