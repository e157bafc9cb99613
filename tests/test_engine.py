"""Tests of the batched DP-SGD engine (dp.engine) against brute force and Opacus."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dp.engine import DPSGDEngine, UnsupportedModuleError

transformers = pytest.importorskip("transformers")

VOCAB = 100
LABELS = 5


def tiny_bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
        num_labels=LABELS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    cfg._attn_implementation = "eager"
    m = transformers.BertForSequenceClassification(cfg).double()
    m.eval()
    return m


def make_batch(B: int, L: int = 12, seed: int = 1, pad: bool = True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if pad and B > 0:
        lengths = torch.randint(3, L + 1, (B,), generator=g)
        for i in range(B):
            mask[i, lengths[i]:] = 0
            ids[i, lengths[i]:] = 0
        ids[:, 3] = ids[:, 2]  # repeated tokens exercise the embedding row sums
    tt = torch.randint(0, 2, (B, L), generator=g)
    y = torch.randint(0, LABELS, (B,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt}, y


def per_example_loss(model, batch, y, position_ids=None):
    kw = dict(batch)
    if position_ids is not None:
        kw["position_ids"] = position_ids
    logits = model(**kw).logits
    return F.cross_entropy(logits, y, reduction="none")


def brute_force(model, batch, y, C):
    """Per-example grads one example at a time: norms [B] and clipped sum {name: grad}."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    B = y.shape[0]
    norms, total = [], {n: torch.zeros_like(p) for n, p in params}
    for i in range(B):
        b = {k: v[i : i + 1] for k, v in batch.items()}
        loss = per_example_loss(model, b, y[i : i + 1]).sum()
        gs = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        gs = [torch.zeros_like(p) if g is None else g for g, (_, p) in zip(gs, params)]
        nrm = torch.sqrt(sum(g.pow(2).sum() for g in gs))
        norms.append(nrm)
        c = min(1.0, C / nrm.item())
        for (n, _), g in zip(params, gs):
            total[n] += c * g
    return torch.stack(norms) if norms else torch.zeros(0, dtype=torch.float64), total


def engine_grads(model, batches, C, expected=1.0):
    eng = DPSGDEngine(model, noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=expected)
    norms = []
    for batch, y in batches:
        if len(y) == 0:  # an empty Poisson micro-batch: HF BERT cannot run B=0, nothing to forward
            loss = torch.zeros(0, dtype=torch.float64)
        else:
            loss = per_example_loss(model, batch, y)
        norms.append(eng.accumulate(loss))
    eng.finalize()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    eng.detach()
    for p in model.parameters():
        p.grad = None
    return torch.cat(norms), grads


def assert_close(a, b, rtol=1e-5):
    a, b = a.double(), b.double()
    scale = max(b.abs().max().item(), 1e-12)
    assert (a - b).abs().max().item() <= rtol * scale, (a - b).abs().max().item() / scale


def check_against_brute(model, batch, y, C):
    ref_norms, ref = brute_force(model, batch, y, C)
    norms, grads = engine_grads(model, [(batch, y)], C)
    assert norms.shape == ref_norms.shape
    if len(ref_norms):
        assert_close(norms, ref_norms)
    assert set(grads) == set(ref)
    for n in ref:
        assert_close(grads[n], ref[n]), n
    return ref_norms


@pytest.mark.parametrize("B,route", [(1, "auto"), (6, "auto"), (6, "ghost"), (6, "instantiate")])
def test_all_trainable_matches_brute_force(B, route, monkeypatch):
    import dp.engine.rules.linear as lin

    if route != "auto":  # force one Linear norm route for every layer
        monkeypatch.setattr(lin, "use_ghost_norm", lambda T, i, o: route == "ghost")
    model = tiny_bert()
    batch, y = make_batch(B)
    ref_norms = brute_force(model, batch, y, 1.0)[0]
    # median norm as C: some examples clipped, some not
    C = ref_norms.median().item() if B > 1 else ref_norms[0].item() / 2
    check_against_brute(model, batch, y, C)


def test_frozen_parameters_skipped():
    model = tiny_bert()
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    model.bert.encoder.layer[0].attention.self.query.weight.requires_grad_(False)
    model.bert.encoder.layer[1].output.LayerNorm.bias.requires_grad_(False)
    batch, y = make_batch(5)
    check_against_brute(model, batch, y, 0.5)
    assert model.bert.embeddings.word_embeddings.weight.grad is None


def test_empty_batch_is_noise_only():
    model = tiny_bert()
    eng = DPSGDEngine(model, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4.0,
                      generator=torch.Generator().manual_seed(0))
    batch, y = make_batch(0)
    norms = eng.accumulate(torch.zeros(0, dtype=torch.float64))
    assert norms.shape == (0,)
    eng.finalize()
    for p in model.parameters():
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.abs().sum() > 0
    # no accumulate at all is fine too
    eng.finalize()
    eng.detach()


def test_micro_batches_equal_one_big_batch():
    model = tiny_bert()
    batch, y = make_batch(7)
    n_all, g_all = engine_grads(model, [(batch, y)], 0.3, expected=7)
    parts = [slice(0, 3), slice(3, 3), slice(3, 7)]
    micro = [({k: v[s] for k, v in batch.items()}, y[s]) for s in parts]
    n_mic, g_mic = engine_grads(model, micro, 0.3, expected=7)
    assert_close(n_mic, n_all, 1e-10)
    for n in g_all:
        assert_close(g_mic[n], g_all[n], 1e-10)


def test_matches_opacus_hooks():
    opacus = pytest.importorskip("opacus")
    from opacus import GradSampleModule

    C = 0.4
    model = tiny_bert()
    batch, y = make_batch(6)
    norms, grads = engine_grads(model, [(batch, y)], C)

    model.train()  # Opacus captures activations in training mode only (dropout is 0 here)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", force_functorch=False)
    pos = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])  # Opacus issue #841
    loss = per_example_loss(gsm, batch, y, position_ids=pos).sum()
    loss.backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    gs = [p.grad_sample.reshape(6, -1) for _, p in params]
    op_norms = torch.cat(gs, 1).norm(dim=1)
    assert_close(norms, op_norms)
    clip = (C / (op_norms + 1e-6)).clamp(max=1.0)
    for (n, p) in params:
        ref = torch.einsum("b,b...->...", clip, p.grad_sample)
        assert_close(grads[n], ref, 1e-5)
    gsm._close()


def test_tied_parameter_and_reused_module():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6)
            self.lin = nn.Linear(6, 6)
            self.head = nn.Linear(6, 11, bias=False)
            self.head.weight = self.emb.weight  # tied

        def forward(self, ids):
            h = self.emb(ids)
            h = torch.tanh(self.lin(h))
            h = torch.tanh(self.lin(h))  # module reused
            return self.head(h).mean(1)

    torch.manual_seed(0)
    model = Tied().double()
    ids = torch.randint(0, 11, (4, 5))
    y = torch.randint(0, 11, (4,))
    params = list(model.parameters())
    ref_total = [torch.zeros_like(p) for p in params]
    ref_norms = []
    for i in range(4):
        loss = F.cross_entropy(model(ids[i : i + 1]), y[i : i + 1])
        gs = torch.autograd.grad(loss, params)
        nrm = torch.sqrt(sum(g.pow(2).sum() for g in gs))
        ref_norms.append(nrm)
        for t, g in zip(ref_total, gs):
            t += min(1.0, 0.5 / nrm.item()) * g
    eng = DPSGDEngine(model, noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=1.0)
    assert eng.tied_parameters
    norms = eng.accumulate(F.cross_entropy(model(ids), y, reduction="none"))
    eng.finalize()
    assert_close(norms, torch.stack(ref_norms))
    for p, t in zip(params, ref_total):
        assert_close(p.grad, t)


def test_noise_scale():
    lin = nn.Linear(50, 40)
    sigma, C, ebs = 1.3, 0.7, 8.0
    eng = DPSGDEngine(lin, noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=ebs,
                      generator=torch.Generator().manual_seed(3))
    samples = []
    for _ in range(50):
        x = torch.zeros(4, 50)
        out = lin(x)
        eng.accumulate((out * 0).sum(1))  # zero gradients
        eng.finalize()
        samples.append(lin.weight.grad.flatten().clone())
    s = torch.cat(samples)  # 100k draws
    expected = sigma * C / ebs
    assert abs(s.mean().item()) < 5 * expected / s.numel() ** 0.5
    assert abs(s.std().item() / expected - 1) < 0.02


def test_unsupported_module_raises():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.scale

    model = nn.Sequential(nn.Linear(3, 3), Odd())
    with pytest.raises(UnsupportedModuleError, match=r"'1' \(Odd\)"):
        DPSGDEngine(model, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1.0)
    conv = nn.Sequential(nn.Conv1d(2, 2, 3))
    with pytest.raises(UnsupportedModuleError, match="Conv1d"):
        DPSGDEngine(conv, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1.0)
    conv[0].requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        DPSGDEngine(conv, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1.0)


def test_detach_removes_hooks():
    model = tiny_bert()
    eng = DPSGDEngine(model, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=1.0)
    eng.detach()
    batch, y = make_batch(2)
    per_example_loss(model, batch, y).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_shared_output_gradient_and_caller_input_untouched():
    """One output gradient tensor handed to several captured outputs, a Linear reading the caller's
    tensor, an activation read by three Linear layers, and a frozen weight with a trainable bias."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 7)
            self.q, self.k, self.v = nn.Linear(7, 4), nn.Linear(7, 4), nn.Linear(7, 9)
            self.emb = nn.Embedding(6, 4)
            self.head = nn.Linear(4, 3)
            self.head.weight.requires_grad_(False)

        def forward(self, x, ids):
            h = self.a(x)  # reads the caller's x
            s = self.q(h) + self.k(h)  # add: both outputs get the same gradient tensor
            s = s * self.v(h)[..., :4] + self.emb(ids)
            return self.head(torch.tanh(s)).mean(1)

    torch.manual_seed(0)
    model = Net().double()
    x = torch.randn(5, 6, 5, dtype=torch.float64)
    ids = torch.randint(0, 6, (5, 6))
    ids[:, 1] = ids[:, 0]
    y = torch.randint(0, 3, (5,))
    x_before = x.clone()
    params = [p for p in model.parameters() if p.requires_grad]
    ref_total = [torch.zeros_like(p) for p in params]
    ref_norms = []
    for i in range(5):
        gs = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1], ids[i : i + 1]), y[i : i + 1]), params)
        nrm = torch.sqrt(sum(g.pow(2).sum() for g in gs))
        ref_norms.append(nrm)
        for t, g in zip(ref_total, gs):
            t += min(1.0, 0.3 / nrm.item()) * g
    eng = DPSGDEngine(model, noise_multiplier=0.0, max_grad_norm=0.3, expected_batch_size=1.0)
    norms = eng.accumulate(F.cross_entropy(model(x, ids), y, reduction="none"))
    eng.finalize()
    assert torch.equal(x, x_before)
    assert_close(norms, torch.stack(ref_norms))
    for p, t in zip(params, ref_total):
        assert_close(p.grad, t)


@pytest.mark.parametrize("route", ["ghost", "instantiate"])
def test_linear_route_choice_is_cached_per_shape(route, monkeypatch):
    import dp.engine.rules.linear as lin

    monkeypatch.setattr(lin, "_ROUTE", {})
    monkeypatch.setattr(lin, "_time_routes", lambda T, i, o: (0.0, 1.0) if route == "ghost" else (1.0, 0.0))
    assert lin.use_ghost_norm(12, 32, 32) is (route == "ghost")  # flops within 4x: timed
    assert lin._ROUTE[(12, 32, 32)] is (route == "ghost")
    assert lin.use_ghost_norm(2, 512, 512) is True  # flops far apart: decided without timing
    assert lin.use_ghost_norm(4096, 8, 8) is False


def test_parameter_used_outside_its_module_raises():
    """Issue 15 item 5: a weight also used outside its module's forward would escape clipping."""
    from dp.engine import GradientEscapeError

    class Leaky(nn.Module):
        def __init__(self, how):
            super().__init__()
            self.how = how
            self.emb = nn.Embedding(11, 6)
            self.lin = nn.Linear(6, 6)
            self.unused = nn.Linear(6, 6)
            self.head = nn.Linear(6, 3)

        def forward(self, ids):
            h = self.emb(ids)
            out = self.lin(h)
            if self.how == "linear":
                out = out + F.linear(h, self.lin.weight)  # the weight outside lin's call
            elif self.how == "embedding":
                out = out + F.embedding(ids, self.emb.weight)
            elif self.how == "never_called":
                out = out + h @ self.unused.weight.t()
            return self.head(torch.tanh(out)).mean(1)

    ids = torch.randint(0, 11, (4, 5))
    y = torch.randint(0, 3, (4,))
    expect = {"linear": r"'lin\.weight' of module 'lin' \(Linear\)",
              "embedding": r"'emb\.weight' of module 'emb' \(Embedding\)",
              "never_called": r"'unused\.weight' of module 'unused' \(Linear\)"}
    for how, pattern in expect.items():
        torch.manual_seed(0)
        model = Leaky(how).double()
        eng = DPSGDEngine(model, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=1.0)
        with pytest.raises(GradientEscapeError, match=pattern):
            eng.accumulate(F.cross_entropy(model(ids), y, reduction="none"))
        with pytest.raises(GradientEscapeError, match=pattern):
            eng.per_example_norms(F.cross_entropy(model(ids), y, reduction="none"))
        # freezing the leaking parameter is the documented way out
        {"linear": model.lin, "embedding": model.emb, "never_called": model.unused}[how].weight.requires_grad_(False)
        eng.detach()
        eng = DPSGDEngine(model, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=1.0)
        assert eng.accumulate(F.cross_entropy(model(ids), y, reduction="none")).shape == (4,)
        eng.detach()
    # the same model without the leak: no error, exact (the tied and reused cases are in
    # test_tied_parameter_and_reused_module; the BERT tests cover a real encoder)
    torch.manual_seed(0)
    model = Leaky("none").double()
    model.unused.requires_grad_(False)
    eng = DPSGDEngine(model, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=1.0)
    eng.accumulate(F.cross_entropy(model(ids), y, reduction="none"))
    eng.detach()


def test_escape_check_allows_tied_weights_and_bert():
    """Tied embedding/output weights used through hooked modules, a reused module, HF BERT: no error."""
    model = tiny_bert()
    batch, y = make_batch(3)
    eng = DPSGDEngine(model, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=1.0)
    eng.accumulate(per_example_loss(model, batch, y))
    eng.per_example_norms(per_example_loss(model, batch, y))
    eng.detach()

    emb = nn.Embedding(9, 4)
    lin = nn.Linear(4, 4)
    out = nn.Linear(4, 9, bias=False)
    out.weight = emb.weight
    model = nn.Sequential(emb, lin, nn.Tanh(), lin, out).double()
    eng = DPSGDEngine(model, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=1.0)
    assert eng.tied_parameters
    ids = torch.randint(0, 9, (3, 4))
    eng.accumulate(model(ids).logsumexp(-1).mean(1))
    eng.detach()


def lora_bert(seed: int = 0, rank: int = 4) -> nn.Module:
    """tiny_bert with peft LoRA adapters on query/value (random B, so every adapter gradient is nonzero)."""
    pytest.importorskip("peft")
    from nlu.model import set_trainable

    model = set_trainable(tiny_bert(seed), "lora", lora_rank=rank, lora_alpha=8, seed=seed).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:  # peft initialises B = 0, which would make every A-gradient 0
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.mark.parametrize("route", ["auto", "ghost", "instantiate"])
def test_lora_matches_brute_force_float64(route, monkeypatch):
    """Issue 18 item 3 (cf. Opacus issue #820): the clipped sum of a peft-LoRA model is exact and
    nothing reaches the frozen weights."""
    import dp.engine.rules.linear as lin

    if route != "auto":
        monkeypatch.setattr(lin, "use_ghost_norm", lambda T, i, o: route == "ghost")
    model = lora_bert()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n or n.startswith("classifier.")
                             for n in trainable), trainable
    assert sum(".lora_" in n for n in trainable) == 2 * 2 * 2  # 2 layers x (query, value) x (A, B)
    batch, y = make_batch(6)
    ref_norms, ref = brute_force(model, batch, y, 1.0)
    C = ref_norms.median().item()  # some examples clipped, some not
    ref_norms, ref = brute_force(model, batch, y, C)
    norms, grads = engine_grads(model, [(batch, y)], C)  # also runs the gradient-escape check
    assert (norms - ref_norms).abs().max().item() <= 1e-8 * ref_norms.abs().max().item()
    assert set(grads) == set(ref) == trainable
    for n in ref:
        assert ref[n].abs().max() > 0, n
        assert (grads[n] - ref[n]).abs().max().item() <= 1e-8 * ref[n].abs().max().item(), n
    # frozen parameters (base layers, embeddings, LayerNorms, pooler) get no gradient at all
    eng = DPSGDEngine(model, noise_multiplier=1.0, max_grad_norm=C, expected_batch_size=6.0)
    eng.accumulate(per_example_loss(model, batch, y))
    eng.finalize()
    eng.detach()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n


def test_opacus_engine_draws_its_noise_from_the_secure_stream():
    """``--dp-engine opacus`` once seeded a Mersenne Twister with 63 bits of the secure stream:
    its noise must be the stream's own draws (the same as the dpfl engine's), whatever torch's
    global seed, so nobody can regenerate it from a PRNG state."""
    pytest.importorskip("opacus")
    from dp.engines import make_engine
    from dp.secure_random import NoiseSource

    def noised(engine_name, torch_seed):
        torch.manual_seed(torch_seed)
        model = nn.Linear(3, 2)
        nn.init.zeros_(model.weight)
        nn.init.zeros_(model.bias)
        engine = make_engine(engine_name, model, noise_multiplier=2.0, max_grad_norm=0.5, expected_batch_size=4.0,
                             generator=NoiseSource(seed=123))  # a reproducible stream, for the test
        x = torch.zeros(4, 3)
        engine.accumulate((model(x) * 0.0).sum(dim=1))  # zero gradients: p.grad is the noise alone
        engine.finalize()
        out = torch.cat([model.weight.grad.flatten(), model.bias.grad.flatten()])
        engine.detach()
        return out

    expected_w = NoiseSource(seed=123).normal((2, 3), 1.0) / 4.0  # sigma C = 1.0, divided by E[B] = 4
    got = noised("opacus", 0)
    assert torch.allclose(got[:6], expected_w.flatten(), atol=1e-6)
    assert torch.equal(got, noised("opacus", 999))  # torch's global generator plays no part
    assert torch.allclose(got, noised("dpfl", 0), atol=1e-6)  # the same draws as our engine


def test_per_example_gradients_equal_one_backward_per_example():
    """The engine's instantiated per-example gradients (secure aggregation quantises each example's) equal a
    brute-force loop of one backward pass per example, for every trainable parameter of a tiny BERT (float64),
    embeddings and tied uses included; nothing is added to the running clipped sum."""
    model = tiny_bert()
    batch, y = make_batch(5)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    eng = DPSGDEngine(model, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=1.0)
    pe = eng.per_example_gradients(per_example_loss(model, batch, y))
    assert not eng._sums
    eng.detach()
    for i in range(5):
        b = {k: v[i : i + 1] for k, v in batch.items()}
        gs = torch.autograd.grad(per_example_loss(model, b, y[i : i + 1]).sum(), [p for _, p in params], allow_unused=True)
        for (n, p), g in zip(params, gs):
            want = torch.zeros_like(p) if g is None else g
            got = pe[p][i] if p in pe else torch.zeros_like(p)
            assert_close(got, want), n
