"""Every benchmark runs: each one's command line on a tiny setting (the tiny model, a handful of
devices, one or two rounds), so that a benchmark that stops working fails CI, not a user.

These check that the benchmark finishes and prints what it says it prints; its figures are
measured on the real settings and given in the issues' closing notes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNIPS = ROOT.parent / "shared" / "data" / "snips"
#: every device in every round (expected cohort = population: q = 1): a Poisson cohort of 3 of 6 is empty in 1.6% of
#: the rounds, and these one- or two-round smoke runs then end without a trained model
TINY_RUN = ["--model", "tiny", "--num-devices", "6", "--cohort-size", "6", "--max-examples", "300", "--max-length", "16"]

pytestmark = pytest.mark.slow


def _bench(name: str, *args: str, timeout: float = 400) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"benchmarks.{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def _json_lines(out: str) -> list[dict]:
    return [json.loads(x) for x in out.splitlines() if x.startswith("{")]


def test_round_overhead():
    (res,) = _json_lines(_bench("round_overhead", "--model", "tiny", "--rounds", "2", "--num-devices", "4",
                                "--cohort-size", "2", "--selection-devices", "10000", "--json"))
    assert res["overhead_fraction"] > 0 and res["seconds_per_client_task"] > 0
    assert set(res["runs"]) == {"train", "floor"} and res["selection"]["devices"] == 10000


def test_secure_round():
    """Secure aggregation's round beside the aggregate placement's, one cohort size (a real Ray simulation)."""
    (row,) = _json_lines(_bench("secure_round", "--cohorts", "4", "--rounds", "2", "--warmup", "1", "--model", "tiny",
                                "--json"))
    sec, agg = row["secure"], row["aggregate"]
    assert sec["replies"] == agg["replies"] == 4 and sec["abandoned_rounds"] == 0
    assert agg["bytes_per_device"] == 4 * row["trainable_parameters"]
    assert sec["bytes_per_device"] > 4 * sec["padded_dimension"]  # the masked vector and the protocol's messages
    assert row["secure_over_aggregate"] > 0 and sec["server_cpu_seconds"] > 0


def test_population_scale():
    """The table: a dpfl run and Flower's empty-ClientApp floor, each in a process of its own."""
    (row,) = _json_lines(_bench("population_scale", "--table", "--populations", "300", "--cohorts", "12",
                                "--rounds", "2", "--json"))
    assert row["num_devices"] == 300 and row["supernodes"] == 32
    assert row["seconds_per_device_task"] > 0 and row["floor_seconds_per_device_task"] > 0 and row["over_floor"] > 0
    assert row["driver_peak_rss_mb"] > 0 and row["tree_peak_rss_mb"] >= row["driver_peak_rss_mb"]


def test_population_scale_breakdown():
    (res,) = _json_lines(_bench("population_scale", "--breakdown", "--num-devices", "2000", "--json"))
    stages = res["ms_per_device_task"]
    assert set(stages) >= {"records", "tokenise", "features", "device_part", "reply"} and all(v >= 0 for v in stages.values())
    assert res["ms_total"] == sum(stages.values()) and res["settings"]["devices"] == 200


def test_dp_step():
    rows = _json_lines(_bench("dp_step", "--shapes", "4x8", "--repeats", "1", "--warmup", "0", "--no-memory",
                              "--methods", "nondp,engine", "--trainable", "head", "--json"))
    assert rows and rows[0]["engine_over_nondp"] > 0


@pytest.mark.skipif(not SNIPS.is_dir(), reason="../shared/data/snips is not here")
def test_privacy_utility(tmp_path):
    import shutil

    snips = tmp_path / "snips"  # with its label schema declared (held-out intents need one)
    snips.mkdir()
    for split in ("train", "test"):
        shutil.copy(SNIPS / f"{split}.jsonl", snips / f"{split}.jsonl")
    labels = sorted({json.loads(line)["label"] for line in open(SNIPS / "train.jsonl")})
    (snips / "labels.json").write_text(json.dumps(labels))
    out = _bench("privacy_utility", "--arms", "aggregate:head:8:oos30,nodp:head:-", "--out", str(tmp_path / "pu"),
                 "--data-dir", str(snips), "--json", "--", *TINY_RUN, "--rounds", "1")
    rows = _json_lines(out)
    assert {r["arm"] for r in rows} == {"aggregate:head:8:oos30", "nodp:head:-"}
    assert all(r["accuracy"] is not None for r in rows)
    oos = {r["arm"]: r["oos"] for r in rows}
    assert oos["nodp:head:-"] is None
    assert oos["aggregate:head:8:oos30"]["intents_held_out"] == 2  # round(0.3 x 7) of SNIPS' intents
    assert oos["aggregate:head:8:oos30"]["oos_recall"] is not None and oos["aggregate:head:8:oos30"]["threshold_epsilon"] > 0
    assert "Out-of-scope detection" in (tmp_path / "pu" / "results.md").read_text()


@pytest.mark.skipif(not SNIPS.is_dir(), reason="../shared/data/snips is not here")
def test_releases(tmp_path):
    _bench("releases", "--arms", "activity:0", "--out", str(tmp_path / "rel"), "--data-dir", str(SNIPS), "--",
           *TINY_RUN, "--rounds", "2", "--release-every", "1")
    assert (tmp_path / "rel" / "results.json").is_file() and (tmp_path / "rel" / "results.md").is_file()


@pytest.mark.skipif(not SNIPS.is_dir(), reason="../shared/data/snips is not here")
def test_selection_experiment(tmp_path):
    _bench("selection_experiment", "--out", str(tmp_path / "sel"), "--data-dir", str(SNIPS), "--", *TINY_RUN,
           "--rounds", "1", timeout=600)
    results = json.loads((tmp_path / "sel" / "results.json").read_text())
    assert results and (tmp_path / "sel" / "accuracy_vs_round.png").is_file()


@pytest.mark.usefixtures("task_identity")
def test_export_fidelity(tmp_path):
    from inprocess import run_rounds, toy_config, write_lamp_data
    from report import build_report

    cfg = toy_config(tmp_path / "run", write_lamp_data(tmp_path), trainable="head", noise_at="aggregate")
    run_rounds(cfg)
    build_report(Path(cfg.run_dir))
    (res,) = _json_lines(_bench("export_fidelity", cfg.run_dir, str(tmp_path / "export")))
    assert res["pipeline_equal_dpfl"] == res["test_examples"] == 2
    assert res["pipeline_accuracy"] == pytest.approx(res["summary_final_accuracy"])
