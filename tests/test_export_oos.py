"""Out-of-scope detection in the export (issue 26): dpfl.json carries the run's rule, `dpfl predict`
flags out-of-scope utterances by it, its flags reproduce oos.json's test figures, and the model
card's figures are summary.json's (in process, toy data, tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dpfl.cli import main
from dpfl.commands.export import load_predictor
from inprocess import run_rounds, toy_config
from report import build_report
from rundir import read_oos, read_summary

pytestmark = pytest.mark.usefixtures("task_identity")

INTENTS = {"lights_on": "turn on the {} light", "lights_off": "switch off the {} lamp",
           "play_music": "play some {} music", "weather": "what is the weather in {}"}
WORDS = ["kitchen", "red", "jazz", "paris", "seven", "ten", "hall", "blue", "rock", "rome", "six", "five"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("oosexport")
    with open(d / "train.jsonl", "w") as fh:
        for label, template in INTENTS.items():
            for w in WORDS:
                fh.write(json.dumps({"text": template.format(w), "label": label}) + "\n")
    (d / "labels.json").write_text(json.dumps(sorted(INTENTS)))  # the public label schema
    with open(d / "test.jsonl", "w") as fh:
        for label, template in INTENTS.items():
            for w in ("green", "tokyo", "eight", "garden", "soul"):
                fh.write(json.dumps({"text": template.format(w), "label": label}) + "\n")
    return d


def _run(tmp_path, data_dir, **kw):
    settings = dict(noise_at="aggregate", trainable="head", rounds=2, num_devices=4, cohort_size=3, sample_rate=1.0,
                    oos_holdout_intents=0.25)
    cfg = toy_config(tmp_path / "run", data_dir, **{**settings, **kw})
    run_rounds(cfg)
    build_report(Path(cfg.run_dir))
    return cfg


@pytest.mark.parametrize("settings", [{"oos_threshold": 0.4}, {"holdout_per_device": 0.3}], ids=["public", "holdout"])
def test_predict_flags_out_of_scope_as_the_run_scored_it(tmp_path, data_dir, settings, capsys):
    cfg = _run(tmp_path, data_dir, **settings)
    oos = read_oos(cfg.run_dir)
    held = set(oos["oos_intents"])
    assert len(held) == 1
    out = tmp_path / "export"
    assert main(["export", cfg.run_dir, "--out", str(out)]) == 0
    meta = json.loads((out / "dpfl.json").read_text())
    assert meta["out_of_scope"]["threshold"] == oos["threshold"]
    rows = [json.loads(x) for x in (data_dir / "test.jsonl").read_text().splitlines()]
    capsys.readouterr()
    assert main(["predict", str(out), *[r["text"] for r in rows]]) == 0
    answers = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(answers) == len(rows)
    for a in answers:  # the rule: confidence over the in-scope intents below the threshold
        assert a["out_of_scope"] == (a["confidence"] < oos["threshold"])
        assert a["label"] not in held  # a held-out intent is not a class of the model
    flagged_out = [a["out_of_scope"] for a, r in zip(answers, rows) if r["label"] in held]
    correct_in = [(not a["out_of_scope"]) and a["label"] == r["label"] for a, r in zip(answers, rows) if r["label"] not in held]
    assert np.mean(flagged_out) == pytest.approx(oos["test"]["oos_recall"])
    assert np.mean(correct_in) == pytest.approx(oos["test"]["in_scope_accuracy"])
    # the run directory answers the same way as its export
    a, b = load_predictor(cfg.run_dir).predict(rows[0]["text"]), load_predictor(out).predict(rows[0]["text"])
    for k in ("probability", "confidence"):  # (the two models' float32 kernels may differ in the last digit)
        assert a.pop(k) == pytest.approx(b.pop(k), abs=1e-5)
    assert a == b
    summary = read_summary(cfg.run_dir).to_dict()
    card = (out / "README.md").read_text()
    assert "## Out-of-scope detection" in card
    assert f"out-of-scope recall {summary['out_of_scope']['oos_recall']:.3f}" in card
    assert f"in-scope accuracy {summary['out_of_scope']['in_scope_accuracy']:.3f}" in card
    if "oos_threshold" in settings:
        assert "a public value" in card and oos["trade_off"] == []
    else:
        assert f"epsilon {summary['out_of_scope']['threshold_epsilon']:.2f} for holdout examples" in card
        trade = oos["trade_off"]  # other quantiles of the same histogram: a higher one rejects more of both kinds
        assert [t["quantile"] for t in trade] == sorted(t["quantile"] for t in trade) and len(trade) >= 3
        for key in ("threshold", "in_scope_rejected", "oos_recall"):
            assert all(a[key] <= b[key] for a, b in zip(trade, trade[1:])), key
        assert 0.05 in [t["quantile"] for t in trade]
        same = next(t for t in trade if t["quantile"] == cfg.oos_quantile)
        assert same["threshold"] == oos["threshold"] and same["oos_recall"] == oos["test"]["oos_recall"]
        assert "trade-off" in (Path(cfg.run_dir) / "report" / "report.md").read_text()


def test_a_model_without_out_of_scope_detection_flags_nothing(tmp_path, data_dir):
    cfg = _run(tmp_path, data_dir, oos_holdout_intents=0.0)
    assert read_oos(cfg.run_dir) is None
    answer = load_predictor(cfg.run_dir).predict("turn on the garden light")
    assert "out_of_scope" not in answer and set(answer) == {"text", "label", "probability"}
