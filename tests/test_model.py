"""Which parameters train (--trainable) and how that reaches the config and the engine."""

import pytest
import torch

from settings.config import ConfigError, RunConfig
from nlu.model import build_model, parse_trainable, set_trainable


def _trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_parse_trainable():
    assert parse_trainable("all") is None
    assert parse_trainable("head") == 0
    assert parse_trainable("top2") == 2
    for bad in ("top0", "top", "encoder", "2"):
        with pytest.raises(ValueError, match="'all', 'head'"):  # the message may also name 'lora'
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


def _dp_step_moved(trainable: str) -> dict[str, bool]:
    """One DP-SGD step (the dpfl engine, sigma 1, C 1, lr 0.1) of the tiny model with ``trainable``:
    whether each parameter moved. The step's per-example norms are checked to be positive."""
    from dp.engines import make_engine

    from nlu.data import per_example_loss

    torch.manual_seed(0)
    model = set_trainable(build_model("tiny", 3, seed=0), trainable)
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
    return {n: not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters()}


def test_head_only_dp_step_changes_only_the_head():
    """The engine skips frozen parameters: after a DP step only the head has moved."""
    for n, moved in _dp_step_moved("head").items():
        assert moved == n.startswith("classifier"), n


def test_set_trainable_lora_and_trainable_state_keys():
    pytest.importorskip("peft")
    from nlu.model import has_lora, lora_settings, trainable_state_keys

    model = build_model("tiny", 5, seed=0).eval()  # no dropout, to compare outputs
    ids = torch.randint(1000, 2000, (3, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    set_trainable(model, "lora", seed=0)
    assert has_lora(model)
    assert lora_settings(model) == {"rank": 8, "alpha": 16.0, "targets": ["query", "value"], "dropout": 0.0}
    names = _trainable_names(model)
    lora = {n for n in names if ".lora_" in n}
    assert names - lora == {"classifier.weight", "classifier.bias"}
    assert len(lora) == 2 * 2 * 2 and all(".attention.self.query." in n or ".attention.self.value." in n for n in lora)
    q = model.encoder.encoder.layer[0].attention.self.query
    assert q.lora_A["default"].weight.shape == (8, 32) and q.lora_B["default"].weight.shape == (32, 8)
    with torch.no_grad():  # B starts at 0: the function is unchanged
        assert torch.allclose(model(input_ids=ids).logits, before)
    keys = trainable_state_keys(model)
    assert set(keys) == names and set(keys) <= set(model.state_dict())
    # the same build on another process gives the same adapters (seeded) and the same frozen weights
    twin = set_trainable(build_model("tiny", 5, seed=0), "lora", seed=0)
    assert all(torch.equal(model.state_dict()[k], twin.state_dict()[k]) for k in model.state_dict())
    # calling again with the same settings is fine; other settings are refused
    set_trainable(model, "lora")
    with pytest.raises(ValueError, match="already has adapters"):
        set_trainable(model, "lora", lora_rank=4)
    set_trainable(model, "head")
    assert trainable_state_keys(model) == ["classifier.weight", "classifier.bias"]
    set_trainable(model, "all")
    assert set(trainable_state_keys(model)) == {n for n, _ in model.named_parameters()}
    with pytest.raises(ValueError, match="lora-rank"):
        set_trainable(build_model("tiny", 5), "lora", lora_rank=0)
    with pytest.raises(ValueError, match="lora-targets"):
        set_trainable(build_model("tiny", 5), "lora", lora_targets=["no_such_module"])


def test_lora_dp_step_changes_only_adapters_and_head():
    pytest.importorskip("peft")
    for n, moved in _dp_step_moved("lora").items():
        assert moved == (n.startswith("classifier") or ".lora_" in n), n
