"""The report's "Out-of-scope detection" section and summary.json's ``out_of_scope`` (oos.json of a
run with --oos-holdout-intents / --oos-label), and the holdout section's text when the holdout
release carries the out-of-scope confidence histogram."""

from __future__ import annotations

import json

import pytest

from inprocess import run_rounds, toy_config
from report import build_report
from report.blocks import fmt
from report.sections.out_of_scope import SUMMARY_FIELDS
from rundir import read_holdout, read_oos
from server.holdout import holdout_epsilon, release_noise_multiplier

pytestmark = pytest.mark.usefixtures("task_identity")

INTENTS = {"alarm": "wake", "weather": "rain", "music": "song", "lights": "lamp", "timer": "countdown",
           "news": "headline"}
HEADING = "## Out-of-scope detection"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Six intents, 12 training utterances and 3 test utterances each."""
    d = tmp_path_factory.mktemp("oosdata")
    with open(d / "train.jsonl", "w") as fh:
        for intent, word in INTENTS.items():
            for i in range(12):
                fh.write(json.dumps({"text": f"please {word} {intent} request number {i}", "label": intent}) + "\n")
    (d / "labels.json").write_text(json.dumps(sorted(INTENTS)))  # the public label schema
    with open(d / "test.jsonl", "w") as fh:
        for intent, word in INTENTS.items():
            for i in range(3):
                fh.write(json.dumps({"text": f"{word} {intent} now {i}", "label": intent}) + "\n")
    return d


def _run(tmp_path, data_dir, **settings):
    base = dict(noise_at="aggregate", num_devices=4, cohort_size=3, rounds=2)
    base.update(settings)
    cfg = toy_config(tmp_path / "run", data_dir, **base)
    run_rounds(cfg)
    summary = build_report(tmp_path / "run")
    md = (tmp_path / "run" / "report" / "report.md").read_text()
    return cfg, summary, md


def _section(md: str) -> str:
    start = md.index(HEADING)
    end = md.find("\n## ", start + len(HEADING))
    return md[start:end if end >= 0 else len(md)]


def _expected(oos: dict) -> dict:
    top = {k: oos[k] for k in ("threshold", "threshold_source", "quantile", "score", "oos_label", "oos_intents",
                               "oos_index")}
    return {**top, **oos["test"]}


def test_a_holdout_threshold_is_reported_with_the_holdouts_epsilon(tmp_path, data_dir):
    cfg, summary, md = _run(tmp_path, data_dir, holdout_per_device=0.3, oos_holdout_intents=0.34)
    run = tmp_path / "run"
    oos, hold = read_oos(run), read_holdout(run)
    assert oos["threshold_source"] == "holdout" and len(oos["oos_intents"]) == 2 and oos["oos_index"] is None
    s = summary["out_of_scope"]
    assert list(s) == list(SUMMARY_FIELDS)
    assert {k: v for k, v in s.items() if k != "threshold_epsilon"} == _expected(oos)
    assert json.loads((run / "report" / "summary.json").read_text())["out_of_scope"] == s
    # the threshold's epsilon is the holdout's: one release of noise multiplier sigma_h / sqrt(2)
    eps = holdout_epsilon(release_noise_multiplier(cfg), 1, hold["target_delta"], cfg.accountant)
    assert s["threshold_epsilon"] == pytest.approx(eps)
    assert s["threshold_epsilon"] == pytest.approx(summary["holdout"]["epsilon"])
    assert s["threshold_epsilon"] == pytest.approx(hold["epsilon"])
    assert release_noise_multiplier(cfg) == pytest.approx(cfg.holdout_noise_multiplier / 2 ** 0.5)

    text = _section(md)
    assert f"tau = {fmt(oos['threshold'])}" in text
    assert ", ".join(oos["oos_intents"]) in text and "--oos-split-seed 0" in text
    assert "training utterances were dropped" in text and "no class for them" in text
    assert f"{fmt(s['threshold_epsilon'])} at delta" in text and "post-processing" in text
    assert "holdout examples only" in text and "is public" not in text
    assert "test split" in text and "no private data" in text
    assert f"| out-of-scope recall | {fmt(oos['test']['oos_recall'])} |" in text
    assert f"| in-scope utterances | {oos['test']['in_scope']} |" in text
    # the holdout section says what the release was: count and histogram, sensitivity sqrt(2)
    who = md[md.index("## Who the model serves"):md.index(HEADING)]
    assert "histogram of the max-softmax confidences" in who and "sqrt(2)" in who
    assert f"noise multiplier {fmt(cfg.holdout_noise_multiplier)}/sqrt(2) = {fmt(release_noise_multiplier(cfg))}" in who
    assert "changes one count by at most 1," not in who
    html = (run / "report" / "report.html").read_text()
    assert "Out-of-scope detection" in html


def test_a_public_threshold_costs_nothing(tmp_path, data_dir):
    _, summary, md = _run(tmp_path, data_dir, oos_holdout_intents=0.34, oos_threshold=0.5)
    oos = read_oos(tmp_path / "run")
    s = summary["out_of_scope"]
    assert s["threshold_source"] == "public" and s["threshold"] == 0.5 and s["quantile"] is None
    assert s["threshold_epsilon"] == 0.0
    assert {k: v for k, v in s.items() if k != "threshold_epsilon"} == _expected(oos)
    assert summary["holdout"] is None
    text = _section(md)
    assert "tau = 0.5 is public" in text and "--oos-threshold" in text and "costs no privacy" in text
    assert "histogram" not in text and "Who the model serves" not in md


def test_a_named_out_of_scope_class_is_stated(tmp_path, data_dir):
    _, summary, md = _run(tmp_path, data_dir, oos_label="news", oos_threshold=0.5)
    s = summary["out_of_scope"]
    assert s["oos_label"] == "news" and s["oos_intents"] == [] and s["oos_index"] is not None
    assert s["out_of_scope"] == 3 and s["in_scope"] == 15
    text = _section(md)
    assert "labelled news (--oos-label)" in text and f"class index {s['oos_index']}" in text
    assert "or when its top class is news" in text and "every class but news" in text
    assert "held out" not in text


def test_a_run_without_out_of_scope_detection_has_no_section(tmp_path, data_dir):
    _, summary, md = _run(tmp_path, data_dir, holdout_per_device=0.3)
    assert summary["out_of_scope"] is None
    assert HEADING not in md
    who = md[md.index("## Who the model serves"):]
    assert "histogram" not in who and "sqrt(2)" not in who and "changes one count by at most 1," in who
    # an unreadable oos.json is a warning, not a failed report
    (tmp_path / "run" / "oos.json").write_text("{not json")
    again = build_report(tmp_path / "run")
    assert again["out_of_scope"] is None
    assert any("oos.json could not be read" in w for w in again["warnings"])
