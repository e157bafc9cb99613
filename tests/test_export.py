"""`dpfl export` writes a model that transformers' own pipeline loads offline and that predicts
exactly what the run's model predicts; `dpfl predict` answers one JSON line per utterance."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dpfl.cli import main
from dpfl.commands.export import ledger_digest, load_predictor
from inprocess import TEXTS_OFF, TEXTS_ON, run_rounds, toy_config
from nlu.data import collate
from report import build_report
from rundir import read_summary

pytestmark = pytest.mark.usefixtures("task_identity")

WORDS = "lamp on off please switch turn the unit heliograph quintarian zorblax vexmoor kindly number now light".split()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("exportdata")
    with open(d / "train.jsonl", "w") as fh:
        for t in TEXTS_ON:
            fh.write(json.dumps({"text": t, "label": "on"}) + "\n")
        for t in TEXTS_OFF:
            fh.write(json.dumps({"text": t, "label": "off"}) + "\n")
    rng = np.random.default_rng(0)  # 60 test utterances of 1 to 30 words (longer than --max-length 16 tokens too)
    with open(d / "test.jsonl", "w") as fh:
        for i in range(60):
            text = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 31))))
            fh.write(json.dumps({"text": text, "label": "on" if i % 2 else "off"}) + "\n")
    return d


def _run(tmp_path, data_dir, **kw):
    settings = dict(noise_at="aggregate", trainable="head", rounds=2, num_devices=4, cohort_size=3, sample_rate=1.0)
    cfg = toy_config(tmp_path / "run", data_dir, **{**settings, **kw})
    run_rounds(cfg)
    build_report(Path(cfg.run_dir))
    return cfg


def _test_split(data_dir):
    return [json.loads(x) for x in (data_dir / "test.jsonl").read_text().splitlines()]


def _run_predictions(cfg, rows):
    """dpfl's own model (the run's, its checkpoint loaded) on the test split, batched as dpfl evaluates."""
    from dpfl.commands.export import run_model

    _, model, labels, tok = run_model(Path(cfg.run_dir))
    from nlu.data import encode

    enc = encode([r["text"] for r in rows], np.zeros(len(rows), dtype=np.int64), tok, cfg.max_length)
    b = collate(enc, np.arange(len(rows)))
    with torch.no_grad():
        logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
    return [labels[i] for i in logits.argmax(1).tolist()]


@pytest.mark.parametrize("settings", [{}, {"trainable": "lora"}, {"pooling": "cls", "head_init": "random"}],
                         ids=["mean-head", "mean-lora", "cls"])
def test_pipeline_predictions_equal_the_runs_on_the_test_split(tmp_path, data_dir, settings, monkeypatch, capsys):
    from transformers import pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _run(tmp_path, data_dir, **settings)
    out = tmp_path / "export"
    assert main(["export", cfg.run_dir, "--out", str(out)]) == 0
    rows = _test_split(data_dir)
    pipe = pipeline("text-classification", model=str(out))
    got = [p["label"] for p in pipe([r["text"] for r in rows], truncation=True)]
    assert got == _run_predictions(cfg, rows)  # every prediction equal
    summary = read_summary(cfg.run_dir).to_dict()
    accuracy = np.mean([g == r["label"] for g, r in zip(got, rows)])
    assert accuracy == pytest.approx(summary["final_accuracy"])  # the run's own evaluation, recomputed
    config = json.loads((out / "config.json").read_text())
    assert set(config["id2label"].values()) == {"on", "off"}
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers")
    assert f"epsilon {summary['epsilon']['example']['max']:.2f} at delta {summary['delta']:g}" in card
    assert f"test accuracy {summary['final_accuracy']:.3f}" in card
    assert ledger_digest(Path(cfg.run_dir) / "ledger.sqlite") in card and summary["run_id"] in card
    assert "NOT PRIVATE" not in card


def test_a_non_private_run_says_so_first(tmp_path, data_dir):
    cfg = _run(tmp_path, data_dir, dp=False)
    out = tmp_path / "export"
    assert main(["export", cfg.run_dir, "--out", str(out)]) == 0
    body = (out / "README.md").read_text().split("---\n")[2].lstrip()
    assert body.startswith("**NOT PRIVATE**")


def test_predict_answers_arguments_and_jsonl_on_stdin(tmp_path, data_dir, monkeypatch, capsys):
    cfg = _run(tmp_path, data_dir)
    out = tmp_path / "export"
    assert main(["export", cfg.run_dir, "--out", str(out)]) == 0
    capsys.readouterr()
    for source in (str(out), cfg.run_dir):  # an export folder or the run itself
        assert main(["predict", source, "lamp on", "lamp off please"]) == 0
        lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert [x["text"] for x in lines] == ["lamp on", "lamp off please"]
        assert all(x["label"] in ("on", "off") and 0.5 <= x["probability"] <= 1 for x in lines)
    monkeypatch.setattr("sys.stdin", io.StringIO('{"text": "lamp on"}\nplain text line\n\n'))
    assert main(["predict", str(out)]) == 0
    assert [json.loads(x)["text"] for x in capsys.readouterr().out.splitlines()] == ["lamp on", "plain text line"]
    monkeypatch.setattr("sys.stdin", io.StringIO('{"text": "lamp on"}\n{"txt": 1}\n'))
    assert main(["predict", str(out)]) == 2
    assert "stdin, line 2" in capsys.readouterr().err
    assert load_predictor(out).predict("lamp on") == load_predictor(cfg.run_dir).predict("lamp on")


def test_export_refuses_what_it_cannot_write(tmp_path, data_dir, capsys):
    cfg = _run(tmp_path, data_dir)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep me")
    assert main(["export", cfg.run_dir, "--out", str(busy)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err and (busy / "x").read_text() == "keep me"
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "e")]) == 2
    assert "no run there" in capsys.readouterr().err


def test_a_head_only_run_checkpoints_its_trained_parameters_only(tmp_path, data_dir):
    """A frozen encoder is the base model's: the checkpoint holds the head (KB, not the encoder's MB),
    names the base it sits on, and loads back into the run's model exactly (resume, export, audit)."""
    from nlu.model import set_trainable, trainable_state_keys
    from nlu.tasks import make_task
    from rundir import global_model_path, load_global_model, read_checkpoint_state

    cfg = _run(tmp_path, data_dir)
    ck = global_model_path(cfg.run_dir)
    state = torch.load(ck, weights_only=True)
    task = make_task("intent", 2)
    model = set_trainable(task.build_model(cfg.model, seed=cfg.seed), "head")
    assert set(state) == set(trainable_state_keys(model)) and ck.stat().st_size < 100_000
    assert read_checkpoint_state(cfg.run_dir)["frozen_from"] == {"model": "tiny", "seed": cfg.seed}
    assert load_global_model(cfg.run_dir, model) == 2
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    from server.state import Server

    server = Server(cfg, resume=True)  # a resume starts from it
    server.ledger.close()
    assert server.start_round == 3
    assert all(torch.equal(server.model.state_dict()[k], v) for k, v in state.items())


def test_the_ledger_digest_is_keyed_so_it_tells_nothing_of_the_cohorts(tmp_path, data_dir):
    """The ledger records who joined each round: a plain hash in the released card could be
    checked against guessed cohorts. The digest is keyed with a secret kept in the run directory."""
    import hashlib
    import sqlite3

    cfg = _run(tmp_path, data_dir)
    ledger = Path(cfg.run_dir) / "ledger.sqlite"
    digest = ledger_digest(ledger)
    assert digest == ledger_digest(ledger)  # the run directory's holder can recompute it
    key = ledger.parent / "ledger.key"
    assert len(key.read_bytes()) == 32 and (key.stat().st_mode & 0o077) == 0
    con = sqlite3.connect(ledger)
    plain = hashlib.sha256("".join(line + "\n" for line in con.iterdump()).encode()).hexdigest()
    con.close()
    assert digest != plain  # without the key, the dump's hash is not the digest


def test_the_server_state_is_checkpointed_in_float32_and_resumes_in_float64(tmp_path, data_dir):
    """The server's float64 state (FedAdam's moments, the released average, the iterate) takes half the
    bytes on disk: every array of the checkpoint's server state is float32; a resume reads it back as
    float64 values equal to the stored ones (what issue 26's 1 MB per round needs for a MiniLM head)."""
    import pickle

    from server.state import Server, widen

    cfg = _run(tmp_path, data_dir)  # noise on the aggregate: FedAdam with --server-ema
    raw = pickle.loads(next((Path(cfg.run_dir) / "checkpoints").glob("server-r2.pkl")).read_bytes())

    def arrays(x):
        if isinstance(x, dict):
            return [a for v in x.values() for a in arrays(v)]
        return [x] if isinstance(x, np.ndarray) else []

    stored = arrays({k: raw[k] for k in ("strategy", "average", "iterate")})
    assert stored and all(a.dtype == np.float32 for a in stored)
    server = Server(cfg, resume=True)
    server.ledger.close()
    m_t = server.server_step.strategy.m_t
    expected = widen(raw["strategy"])["m_t"]
    assert all(np.asarray(m_t[k]).dtype == np.float64 and np.array_equal(m_t[k], expected[k]) for k in expected)
