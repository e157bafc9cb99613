"""Slot filling and joint intent + slots: alignment, metrics, per-utterance loss and clipping, learning."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nlu.data import collate, encode, per_example_loss, predict
from nlu.joint import JointModel
from nlu.metrics import intent_metrics
from nlu.model import load_tokenizer
from nlu.slots import (
    IGNORE_INDEX,
    align_tags,
    encode_slots,
    sentence_accuracy,
    slot_metrics,
    word_tags,
)
from nlu.tasks import IntentTask, SlotTask, make_task, task_for_data
from partitions.loading import load_data


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is fastest, and far faster on a shared, busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def synth():
    return load_data()


def snips_records(path, n=300):
    with open(path / "train.jsonl", encoding="utf-8") as fh:
        return [json.loads(next(fh)) for _ in range(n)]


# ------------------------------------------------------------------ alignment


def test_align_tags_first_subtoken_only():
    #            [CLS] w0  w1  w1  w1  w2 [SEP]
    word_ids = [None, 0, 1, 1, 1, 2, None]
    assert align_tags(word_ids, [3, 4, 5]) == [-100, 3, 4, -100, -100, 5, -100]


def test_alignment_on_snips_with_minilm_tokenizer(snips, tok):
    recs = snips_records(snips)
    names = ["O"] + sorted({t for r in recs for t in r["slots"] if t != "O"})
    index = {t: i for i, t in enumerate(names)}
    enc = encode_slots([r["tokens"] for r in recs], [r["slots"] for r in recs], [0] * len(recs), tok, 128, names)
    raw = tok([r["tokens"] for r in recs], is_split_into_words=True, truncation=True, max_length=128)
    multi_piece_words = multi_piece_slot_words = 0
    for i, r in enumerate(recs):
        wids = raw.word_ids(i)
        labels = enc.slot_labels[i]
        assert len(labels) == len(enc.input_ids[i]) == len(wids)
        for w, tag in enumerate(r["tags"] if "tags" in r else r["slots"]):
            pos = [p for p, x in enumerate(wids) if x == w]
            assert pos, (r["tokens"], w)
            assert labels[pos[0]] == index[tag]
            assert all(labels[p] == IGNORE_INDEX for p in pos[1:])
            assert enc.word_starts[i][w] == pos[0]
            multi_piece_words += len(pos) > 1
            multi_piece_slot_words += len(pos) > 1 and tag != "O"
        # special tokens are ignored; exactly one labelled position per word
        assert labels[0] == IGNORE_INDEX and labels[-1] == IGNORE_INDEX
        assert sum(x != IGNORE_INDEX for x in labels) == len(r["tokens"])
        # decoding the gold labels gives back the word-level tags
        gold_ids = np.array([x if x != IGNORE_INDEX else 0 for x in labels])
        assert word_tags(gold_ids, enc.word_starts[i], names) == r["slots"]
    assert multi_piece_words > 20 and multi_piece_slot_words > 10  # words split into several pieces


def test_alignment_example_split_word(tok):
    # "Romántica" -> romantic ##a, "playlist." -> play ##list .
    enc = encode_slots(
        [["Add", "Cita", "Romántica", "playlist."]],
        [["O", "B-playlist", "I-playlist", "O"]],
        [0],
        tok,
        32,
        ["O", "B-playlist", "I-playlist"],
    )
    pieces = tok.convert_ids_to_tokens(enc.input_ids[0])
    labelled = [(p, l) for p, l in zip(pieces, enc.slot_labels[0])]
    assert [l for _, l in labelled if l != IGNORE_INDEX] == [0, 1, 2, 0]
    first_of_romantica = pieces.index("romantic")
    assert enc.slot_labels[0][first_of_romantica] == 2
    assert enc.slot_labels[0][first_of_romantica + 1] == IGNORE_INDEX  # "##a"


def test_truncated_and_empty_words_are_predicted_O(tok):
    words = ["play", "the", "beatles", "in", "the", "kitchen"]
    tags = ["O", "B-artist", "I-artist", "O", "O", "B-room"]
    names = ["O", "B-artist", "I-artist", "B-room"]
    enc = encode_slots([words, ["a", "", "b"]], [tags, ["O", "B-room", "O"]], [0, 0], tok, 5, names)
    starts = enc.word_starts[0]
    assert (starts[:3] >= 0).all() and (starts[3:] == -1).all()  # [CLS] + 3 words + [SEP]
    assert enc.word_starts[1][1] == -1  # the empty word has no sub-token
    pred = np.array([0, 0, 1, 2, 0])
    assert word_tags(pred, starts, names) == ["O", "B-artist", "I-artist", "O", "O", "O"]
    assert enc.gold_tags[0] == tags  # gold keeps every word: truncation costs recall


def test_unknown_tag_and_length_mismatch_raise(tok):
    with pytest.raises(ValueError, match="B-city"):
        encode_slots([["in", "paris"]], [["O", "B-city"]], [0], tok, 16, ["O"])
    with pytest.raises(ValueError, match="2 tokens but 1"):
        encode_slots([["in", "paris"]], [["O"]], [0], tok, 16, ["O"])


# ------------------------------------------------------------------ metrics


def test_slot_f1_exact_span_match():
    gold = [["B-a", "I-a", "O", "B-b"]]
    assert slot_metrics(gold, gold)["slot_f1"] == 1.0
    # a partially found span is wrong: 0 of 1 predicted right, 0 of 1 gold found
    m = slot_metrics([["B-a", "I-a", "O"]], [["B-a", "O", "O"]])
    assert m == {"slot_f1": 0.0, "slot_precision": 0.0, "slot_recall": 0.0}
    # too long a span is wrong too, and so is the right extent with the wrong type
    assert slot_metrics([["B-a", "O"]], [["B-a", "I-a"]])["slot_f1"] == 0.0
    assert slot_metrics([["B-a", "I-a"]], [["B-b", "I-b"]])["slot_f1"] == 0.0
    # 2 gold spans, 3 predicted, 1 right: P = 1/3, R = 1/2, F1 = 2PR/(P+R) = 0.4
    gold = [["B-a", "I-a", "O", "B-b"], ["O", "O"]]
    pred = [["B-a", "I-a", "O", "B-a"], ["B-c", "O"]]
    m = slot_metrics(gold, pred)
    assert m["slot_precision"] == pytest.approx(1 / 3)
    assert m["slot_recall"] == pytest.approx(1 / 2)
    assert m["slot_f1"] == pytest.approx(0.4)


def test_slot_f1_conlleval_I_without_B_starts_a_span():
    # conlleval: "O I-a" is a span a (same as "O B-a")
    assert slot_metrics([["O", "B-a"]], [["O", "I-a"]])["slot_f1"] == 1.0
    # all-O predictions give 0, and no spans at all gives 0 (no division warning escapes)
    assert slot_metrics([["B-a", "O"]], [["O", "O"]])["slot_f1"] == 0.0
    assert slot_metrics([["O"]], [["O"]])["slot_f1"] == 0.0
    assert np.isnan(slot_metrics([], [])["slot_f1"])


def test_sentence_accuracy():
    gold = [["O", "B-a"], ["B-b"], ["O"]]
    pred = [["O", "B-a"], ["O"], ["O"]]
    assert sentence_accuracy(gold, pred) == pytest.approx(2 / 3)
    # with intents: the third has its tags right but its intent wrong
    assert sentence_accuracy(gold, pred, np.array([1, 2, 3]), np.array([1, 2, 0])) == pytest.approx(1 / 3)
    assert np.isnan(sentence_accuracy([], []))


# ------------------------------------------------------------------ tasks: intent wraps the old functions


def test_intent_task_matches_existing_functions(synth, tok):
    test = synth.test.select(range(120))
    task = make_task("intent", synth.num_labels, None)
    assert isinstance(task, IntentTask)
    enc = task.encode(test, tok, 32)
    old = encode(test["text"], test["label"], tok, 32)
    assert enc.input_ids == old.input_ids and (enc.labels == old.labels).all()
    model = task.build_model("tiny", seed=3)
    idx = np.array([5, 1, 7])
    b_new, b_old = task.collate(enc, idx), collate(old, idx)
    assert b_new.keys() == b_old.keys() and all(torch.equal(b_new[k], b_old[k]) for k in b_new)
    model.eval()
    assert torch.allclose(task.per_example_loss(model, b_new), per_example_loss(model, b_old))
    preds, loss = predict(model, old)
    ref = intent_metrics(old.labels, preds, synth.num_labels)
    ref["test_loss"] = loss
    assert task.evaluate(model, enc) == pytest.approx(ref)


def test_slot_tasks_need_slot_annotations(tmp_path, synth, tok):
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text(
            "\n".join(json.dumps({"text": t, "label": lab}) for t, lab in [("hi there", "greet"), ("bye", "leave")])
        )
    plain = load_data(tmp_path)
    for name in ("slots", "joint"):
        with pytest.raises(ValueError, match=rf"--task {name}.*{tmp_path.name}"):
            task_for_data(name, plain)
        with pytest.raises(ValueError, match=rf"--task {name}"):
            make_task(name, 2, None)
        task = make_task(name, synth.num_labels, synth.slot_names)
        with pytest.raises(ValueError, match=rf"--task {name}.*'tokens'"):
            task.encode(plain.train, tok, 16)
    assert isinstance(task_for_data("intent", plain), IntentTask)
    with pytest.raises(ValueError, match="--task"):
        make_task("ner", 2, ["O"])


# ------------------------------------------------------------------ model


@pytest.mark.parametrize("name", ["slots", "joint"])
def test_model_structure_and_same_build_everywhere(synth, name):
    task = make_task(name, synth.num_labels, synth.slot_names)
    m1, m2 = task.build_model("tiny", seed=7), task.build_model("tiny", seed=7)
    assert isinstance(m1, JointModel)
    assert all(p.requires_grad for p in m1.parameters())
    kinds = {type(m) for m in m1.modules() if any(True for _ in m.parameters(recurse=False))}
    assert kinds <= {nn.Linear, nn.Embedding, nn.LayerNorm}, kinds
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert (m1.intent_head is None) == (name == "slots")
    assert not any("pooler" in k for k in s1)  # mean pooling / slots: no unused parameter


def _batch(task, data, tok, n=6, max_length=24):
    enc = task.encode(data.select(range(n)), tok, max_length)
    return enc, task.collate(enc, np.arange(n))


def _brute_loss(model, task, batch, i):
    """Loss of example i computed by hand from the model's outputs on that example alone."""
    keep = int(batch["attention_mask"][i].sum())
    one = {k: v[i : i + 1, :keep] if v.dim() == 2 else v[i : i + 1] for k, v in batch.items()}
    out = model(**{k: one[k] for k in ("input_ids", "attention_mask", "token_type_ids", "position_ids")})
    slot = 0.0
    labelled = 0
    for p in range(keep):
        t = int(one["slot_labels"][0, p])
        if t != IGNORE_INDEX:
            slot = slot - torch.log_softmax(out.slot_logits[0, p], -1)[t]
            labelled += 1
    if task.slot_reduction == "mean":
        slot = slot / max(labelled, 1)
    if out.intent_logits is None:
        return slot
    intent = -torch.log_softmax(out.intent_logits[0], -1)[int(one["labels"][0])]
    return intent + task.slot_loss_weight * slot


@pytest.mark.parametrize("name,reduction,weight", [("joint", "sum", 1.0), ("joint", "mean", 0.5), ("slots", "sum", 1.0)])
def test_per_example_loss_is_per_utterance(synth, tok, name, reduction, weight):
    task = make_task(name, synth.num_labels, synth.slot_names, weight, slot_reduction=reduction)
    model = task.build_model("tiny", seed=1).double().eval()
    _, batch = _batch(task, synth.train, tok)
    loss = task.per_example_loss(model, batch)
    assert loss.shape == (6,)
    brute = torch.stack([_brute_loss(model, task, batch, i) for i in range(6)])
    torch.testing.assert_close(loss, brute, rtol=1e-9, atol=1e-9)


def _no_dropout(model):
    """Train mode (Opacus' hooks record activations only in train mode) with every dropout off."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model.train()


def _flat_grad(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=False)
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("name", ["joint", "slots"])
def test_opacus_per_example_gradients_match_brute_force(synth, tok, name):
    """Opacus' hooks give each UTTERANCE's gradient of the joint loss (float64, 1e-5)."""
    from opacus import GradSampleModule

    task = make_task(name, synth.num_labels, synth.slot_names, 0.7)
    model = _no_dropout(task.build_model("tiny", seed=2).double())
    enc, batch = _batch(task, synth.train, tok, n=5)
    brute = []
    for i in range(5):  # one example at a time, padded to its own length
        one = task.collate(enc, [i])
        brute.append(_flat_grad(model, task.per_example_loss(model, one).sum()))
    brute = torch.stack(brute)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
    try:
        task.per_example_loss(model, batch).sum().backward()
        samples = torch.cat([p.grad_sample.reshape(5, -1) for p in model.parameters()], dim=1)
    finally:
        gsm._close()
    torch.testing.assert_close(samples, brute, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("engine_name", ["opacus", "dpfl"])
def test_dp_clipping_is_per_utterance(synth, tok, engine_name):
    """The engines' clipped sum (no noise) equals the sum of each utterance's clipped gradient."""
    from dp.engines import make_engine

    if engine_name == "dpfl":
        pytest.importorskip("dp.engine")
    task = make_task("joint", synth.num_labels, synth.slot_names)
    model = _no_dropout(task.build_model("tiny", seed=4).double())
    enc, batch = _batch(task, synth.train, tok, n=6)
    C = 0.5
    expected = torch.zeros_like(_flat_grad(model, task.per_example_loss(model, task.collate(enc, [0])).sum()))
    norms = []
    for i in range(6):
        g = _flat_grad(model, task.per_example_loss(model, task.collate(enc, [i])).sum())
        norms.append(float(g.norm()))
        expected += g * min(1.0, C / float(g.norm()))
    assert max(norms) > C  # clipping is active
    engine = make_engine(engine_name, model, noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=1.0)
    try:
        got_norms = engine.accumulate(task.per_example_loss(model, batch))
        engine.finalize()
        got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    finally:
        engine.detach()
    torch.testing.assert_close(got_norms.double(), torch.tensor(norms, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ evaluation and learning


def test_evaluate_keys_and_perfect_predictions(synth, tok):
    task = make_task("joint", synth.num_labels, synth.slot_names)
    enc = task.encode(synth.test.select(range(40)), tok, 32)
    model = task.build_model("tiny", seed=0)
    m = task.evaluate(model, enc, batch_size=16)
    assert set(task.metric_names) <= set(m)
    assert model.training  # mode restored

    class Oracle(nn.Module):  # outputs the gold answer: every metric must be perfect
        def __init__(self):
            super().__init__()
            self.rows = {tuple(r): i for i, r in enumerate(enc.input_ids)}

        def forward(self, input_ids, attention_mask, **_):
            B, L = input_ids.shape
            intent = torch.full((B, synth.num_labels), -10.0)
            slot = torch.full((B, L, len(synth.slot_names)), -10.0)
            slot[:, :, 0] = 10.0
            for b in range(B):
                i = self.rows[tuple(input_ids[b, : int(attention_mask[b].sum())].tolist())]
                intent[b, enc.labels[i]] = 10.0
                for p, t in enumerate(enc.slot_labels[i]):
                    if t != IGNORE_INDEX:
                        slot[b, p] = -10.0
                        slot[b, p, t] = 10.0
            from nlu.joint import JointOutput

            return JointOutput(intent, slot)

    m = task.evaluate(Oracle(), enc, batch_size=16)
    assert m["accuracy"] == m["slot_f1"] == m["sentence_accuracy"] == 1.0
    assert m["test_loss"] < 1e-3


def test_tiny_joint_model_learns_slots(synth, tok):
    """A few hundred plain steps on a few hundred synthetic examples: slot F1 far above all-O (0)."""
    t0 = time.perf_counter()
    torch.manual_seed(0)
    task = make_task("joint", synth.num_labels, synth.slot_names)
    train = task.encode(synth.train.select(range(400)), tok, 32)
    test = task.encode(synth.test.select(range(200)), tok, 32)
    all_o = slot_metrics(test.gold_tags, [["O"] * len(g) for g in test.gold_tags])["slot_f1"]
    model = task.build_model("tiny", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(200):
        batch = task.collate(train, rng.choice(len(train), 32, replace=False))
        loss = task.per_example_loss(model, batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    m = task.evaluate(model, test)
    assert all_o == 0.0
    assert m["slot_f1"] > 0.4, m
    assert m["accuracy"] > 2 / synth.num_labels, m
    assert time.perf_counter() - t0 < 30
