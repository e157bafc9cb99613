"""Slot and joint models export as token classification (issue 26): `transformers.pipeline(
"token-classification")` on the export tags every test word as dpfl's model does, the joint model's
intent part as the text classifier does, and `dpfl predict` answers with both (in process, built-in
data, tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dpfl.cli import main
from dpfl.commands.export import load_predictor, run_model, slot_names_of
from inprocess import run_rounds
from report import build_report
from settings.config import RunConfig

pytestmark = pytest.mark.usefixtures("task_identity")


def _run(tmp_path, task):
    cfg = RunConfig(model="tiny", task=task, num_devices=4, cohort_size=3, rounds=2, max_length=64,
                    run_dir=str(tmp_path / "run"), batch_size=4, local_epochs=1, selection="uniform",
                    round_timeout=30.0, noise_at="aggregate", trainable="all", sample_rate=1.0).validate()
    run_rounds(cfg)
    build_report(Path(cfg.run_dir))
    return cfg


def _dpfl_predictions(cfg):
    """dpfl's own (intent ids or None, word tags) on the run's test split, as it evaluates."""
    from nlu.tasks import task_for_data
    from partitions.population import build_population

    cfg2, model, labels, tok = run_model(Path(cfg.run_dir))
    pop = build_population(cfg2)
    task = task_for_data(cfg2.task, pop.data, cfg2.slot_loss_weight, pooling=cfg2.pooling)
    enc = task.encode(pop.data.test, tok, cfg2.max_length)
    intents, tags, _, _ = task.predict(model, enc)
    return pop.data.test, labels, intents, tags


def _model_out(cfg, rows):
    """dpfl's model's output on each of ``rows`` alone (no padding)."""
    import torch

    from nlu.tasks import _model_inputs, task_for_data
    from partitions.population import build_population

    cfg2, model, _, tok = run_model(Path(cfg.run_dir))
    task = task_for_data(cfg2.task, build_population(cfg2).data, cfg2.slot_loss_weight, pooling=cfg2.pooling)
    outs = []
    for r in rows:
        enc = task.encode({"tokens": [r["tokens"]], "slots": [r["slots"]], "label": [r["label"]]}, tok, cfg2.max_length)
        with torch.no_grad():
            outs.append(model(**_model_inputs(task.collate(enc, [0]))))
    return outs


def _slot_probabilities(cfg, rows):
    """Softmax over the tags [L, S] of every sub-token of each row, from dpfl's model."""
    return [o.slot_logits[0].double().softmax(-1).numpy() for o in _model_out(cfg, rows)]


def _intent_probabilities(cfg, rows):
    """Softmax over the intents [C] of each row, from dpfl's joint model."""
    return [o.intent_logits[0].double().softmax(-1).numpy() for o in _model_out(cfg, rows)]


def _word_tags(entities, tokenizer, words):
    """A word's tag from the pipeline's per-sub-token entities: its first sub-token's."""
    enc = tokenizer([words], is_split_into_words=True)
    by_index = {e["index"]: e["entity"] for e in entities}
    first = {}
    for pos, w in enumerate(enc.word_ids(0)):
        if w is not None and w not in first:
            first[w] = pos
    return [by_index.get(first[i], "O") if i in first else "O" for i in range(len(words))]


@pytest.mark.parametrize("task", ["slots", "joint"])
def test_token_classification_pipeline_tags_as_the_run_does(tmp_path, task, monkeypatch, capsys):
    from transformers import AutoTokenizer, pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _run(tmp_path, task)
    out = tmp_path / "export"
    assert main(["export", cfg.run_dir, "--out", str(out)]) == 0
    meta = json.loads((out / "dpfl.json").read_text())
    assert meta["task"] == task and meta["slot_names"] == slot_names_of(cfg)
    test, labels, intents, tags = _dpfl_predictions(cfg)
    rows = list(test)[:40]
    tagger_dir = out / ("slots" if task == "joint" else ".")
    tagger = pipeline("token-classification", model=str(tagger_dir))
    tok = AutoTokenizer.from_pretrained(str(tagger_dir))
    probs = _slot_probabilities(cfg, rows)
    names = slot_names_of(cfg)
    for i, r in enumerate(rows):  # every word's tag equal to dpfl's, every sub-token's probability too
        words = list(r["tokens"])
        entities = tagger(" ".join(words), ignore_labels=[])
        assert _word_tags(entities, tok, words) == tags[i]
        assert len(entities) == probs[i].shape[0] - 2  # every sub-token but [CLS] and [SEP]
        for e in entities:
            assert e["entity"] == names[int(probs[i][e["index"]].argmax())]
            assert e["score"] == pytest.approx(float(probs[i][e["index"]].max()), abs=1e-5)
    card = (out / "README.md").read_text()
    assert "slot F1" in card and "token-classification" in card
    if task == "joint":  # the intent part: the text classifier predicts dpfl's intents
        pipe = pipeline("text-classification", model=str(out))
        got = pipe([" ".join(r["tokens"]) for r in rows], truncation=True)
        assert [p["label"] for p in got] == [labels[int(k)] for k in np.asarray(intents)[: len(rows)]]
        mine = _intent_probabilities(cfg, rows)
        assert [p["score"] for p in got] == pytest.approx([float(m.max()) for m in mine], abs=1e-5)
    else:
        assert not (out / "slots").exists()
    capsys.readouterr()
    text = " ".join(rows[0]["tokens"])
    assert main(["predict", str(out), text]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert [s["tag"] for s in answer["slots"]] == tags[0] and [s["word"] for s in answer["slots"]] == list(rows[0]["tokens"])
    assert ("label" in answer) == (task == "joint")
    from_run, from_export = load_predictor(cfg.run_dir).predict(text), load_predictor(out).predict(text)
    assert from_run.pop("probability", 0.0) == pytest.approx(from_export.pop("probability", 0.0), abs=1e-5)
    assert from_run == from_export  # label and every word's tag
