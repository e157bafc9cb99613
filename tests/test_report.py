"""The privacy budget report on small synthetic run directories."""

import json
import math
import os
import re
import sqlite3
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from dp.accounting import SubsampledGaussianEvent, compute_epsilon
from report import ReportError, build_report
from report.render import fmt
from rundir import RunDirError, hold_run_lock, read_metric_lines, read_summary, release_run_lock
from rundir.records import summary_path

DELTA = 1e-5
SCHEMA = """
CREATE TABLE runs(run_id TEXT PRIMARY KEY, created REAL, target_delta REAL, accountant TEXT,
    selection_constant REAL, calibration_note TEXT);
CREATE TABLE devices(run_id TEXT, device_id INTEGER, activity INTEGER, sample_rate REAL,
    PRIMARY KEY(run_id, device_id));
CREATE TABLE rounds(run_id TEXT, round INTEGER, completed REAL, cohort_size INTEGER,
    PRIMARY KEY(run_id, round));
CREATE TABLE privacy_events(id INTEGER PRIMARY KEY, run_id TEXT, round INTEGER, device_id INTEGER,
    unit TEXT CHECK(unit IN ('example','device')), noise_multiplier REAL, sample_rate REAL,
    steps INTEGER, max_grad_norm REAL);
CREATE TABLE device_epsilon(run_id TEXT, device_id INTEGER, unit TEXT, round INTEGER, epsilon REAL,
    target_delta REAL, PRIMARY KEY(run_id, device_id, unit));
CREATE TABLE budget_events(run_id TEXT, device_id INTEGER, unit TEXT, round INTEGER, epsilon REAL);
"""

ACTIVITY = [10, 20, 40, 80, 0, 5]
Q_DEVICE = [0.2, 0.3, 0.5, 0.8, 0.0, 0.1]  # q_k (device level), 0 for the device without data
# round -> devices that trained
COHORTS = {1: [0, 2, 3], 2: [1, 3], 3: [2, 3, 5], 4: [0, 3]}
SIGMA, C, BATCH, SIGMA_U, S = 1.0, 1.0, 4, 2.0, 0.5


P_AGGREGATE = 0.5  # example sampling rate p of the noise-on-the-aggregate placement


def _example_event(d, noise_at="device"):
    if noise_at == "aggregate":  # one Poisson-subsampled Gaussian at rate p per round joined
        return (SIGMA, P_AGGREGATE, 1)
    q = min(1.0, BATCH / ACTIVITY[d])
    steps = max(1, round(ACTIVITY[d] / BATCH))
    return (SIGMA, q, steps)


DEFAULT_BUDGET_EVENTS = [(3, "example", 3, 7.5)]  # (device, unit, round, epsilon it would have reached)


def make_run(tmp_path: Path, *, dp=True, device_dp=True, rounds_done=4, rounds_planned=4,
             half_line=True, run_id="synthetic-run", name="run", sigma_u=SIGMA_U, noise_at="device",
             reproducible_noise=False, max_epsilon=8.0, target_epsilon=None, target_epsilon_device=None,
             budget_events=None, ids=None, cohorts=None, deletions=()) -> Path:
    """A run directory written by hand: config.toml, ledger.sqlite and metrics.jsonl as the server writes them.

    Example-level events (when ``dp``) for the cohort of each round, in the given placement;
    device-level events (when ``device_dp``) for every device with q_k > 0; ``budget_events``
    (default: device 3 at example level in round 3, when dp and rounds_done >= 3). As in real
    runs, only a run with neither DP sends a training loss, and epsilons are null without DP.

    ``ids``: the ledger's device id of each device (default 0, 1, ...); devices everywhere else
    (``cohorts``, default :data:`COHORTS`; ``budget_events``; ``deletions``) are given by index.
    ``deletions``: (device, round) requests, recorded as the server does, with the first round
    the device had a privacy event of either unit.
    """
    ids = list(range(len(ACTIVITY))) if ids is None else list(ids)
    cohorts = COHORTS if cohorts is None else cohorts
    deleted_from = dict(deletions)
    run = tmp_path / name
    run.mkdir()
    cfg = {
        "run_id": run_id, "num_devices": len(ACTIVITY), "rounds": rounds_planned, "cohort_size": 2.0,
        "selection": "activity", "activity_exponent": 1.0, "noise_multiplier": SIGMA,
        "max_grad_norm": C, "batch_size": BATCH, "local_epochs": 1, "target_delta": DELTA,
        "accountant": "pld", "device_dp": device_dp, "device_noise_multiplier": SIGMA_U,
        "update_clip_norm": S, "dp": dp, "dataset": "banking77", "model": "minilm", "strategy": "fedavg",
        "noise_at": noise_at, "sample_rate": P_AGGREGATE, "reproducible_noise": reproducible_noise,
        "seed": 0, "server_learning_rate": 0.5, "max_epsilon": max_epsilon, "target_epsilon": target_epsilon,
        "target_epsilon_device": target_epsilon_device,
    }
    lines = []
    for k, v in cfg.items():
        if v is None:  # TOML has no null: the server leaves unset options out
            continue
        lines.append(f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}")
    (run / "config.toml").write_text("\n".join(lines) + "\n")

    conn = sqlite3.connect(run / "ledger.sqlite")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA)
    conn.execute("INSERT INTO runs VALUES (?,?,?,?,?,?)",
                 (run_id, 0.0, DELTA, "pld", 0.01, "c calibrated once from starting activities"))
    conn.executemany("INSERT INTO devices VALUES (?,?,?,?)",
                     [(run_id, ids[d], a, q) for d, (a, q) in enumerate(zip(ACTIVITY, Q_DEVICE))])
    metrics = []
    first_event: dict[int, int] = {}  # device -> first round with an event of either unit
    for t in range(1, rounds_done + 1):
        cohort = cohorts[t]
        if dp:
            for d in cohort:
                s, q, n = _example_event(d, noise_at)
                conn.execute("INSERT INTO privacy_events(run_id, round, device_id, unit, noise_multiplier,"
                             " sample_rate, steps, max_grad_norm) VALUES (?,?,?,?,?,?,?,?)",
                             (run_id, t, ids[d], "example", s, q, n, C))
                first_event.setdefault(d, t)
            # The server's cached "epsilon so far" (deliberately rough: the report recomputes).
            for d in cohort:
                conn.execute("INSERT OR REPLACE INTO device_epsilon VALUES (?,?,?,?,?,?)",
                             (run_id, ids[d], "example", t, 1.0, DELTA))
        if device_dp:
            for d, q in enumerate(Q_DEVICE):
                if q > 0 and t < deleted_from.get(d, math.inf):  # a deleted device's q_k is 0 from its request on
                    conn.execute("INSERT INTO privacy_events(run_id, round, device_id, unit, noise_multiplier,"
                                 " sample_rate, steps, max_grad_norm) VALUES (?,?,?,?,?,?,?,?)",
                                 (run_id, t, ids[d], "device", sigma_u, q, 1, S))
                    first_event.setdefault(d, t)
        conn.execute("INSERT INTO rounds VALUES (?,?,?,?)", (run_id, t, float(t), len(cohort)))
        metrics.append({"round": t, "cohort_size": len(cohort), "skipped": False,
                        "train_loss": None if (dp or device_dp) else 2.0 / t,
                        "accuracy": 0.2 * t, "macro_f1": 0.15 * t,
                        "epsilon_example_max": 1.0 if dp else None,
                        "epsilon_device_max": 1.0 if device_dp else None, "seconds": 1.5})
    if budget_events is None:
        budget_events = DEFAULT_BUDGET_EVENTS if dp and rounds_done >= 3 else []
    conn.executemany("INSERT INTO budget_events VALUES (?,?,?,?,?)",
                     [(run_id, ids[d], u, t, e) for d, u, t, e in budget_events])
    if deletions:
        conn.execute("CREATE TABLE deletions(run_id TEXT, device_id INTEGER, round INTEGER, recorded REAL,"
                     " first_joined INTEGER, PRIMARY KEY(run_id, device_id))")
        conn.executemany("INSERT INTO deletions VALUES (?,?,?,?,?)",
                         [(run_id, ids[d], t, 0.0, first_event[d] if first_event.get(d, t) < t else None)
                          for d, t in deletions])
    conn.commit()
    conn.close()
    text = "".join(json.dumps(m) + "\n" for m in metrics)
    if half_line:
        text += '{"round": 5, "cohort_size": 2, "skipp'
    (run / "metrics.jsonl").write_text(text)
    return run


def _hand_epsilons(unit, rounds_done=4):
    hist = {}
    for t in range(1, rounds_done + 1):
        if unit == "example":
            for d in COHORTS[t]:
                hist.setdefault(d, []).append(SubsampledGaussianEvent(*_example_event(d)))
        else:
            for d, q in enumerate(Q_DEVICE):
                if q > 0:
                    hist.setdefault(d, []).append(SubsampledGaussianEvent(SIGMA_U, q, 1))
    return {d: compute_epsilon(ev, DELTA, "pld") for d, ev in hist.items()}


def _assert_self_contained(html: str):
    assert "<style>" in html
    for attr in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', html, flags=re.I):
        assert attr.startswith("data:") or attr.startswith("#"), attr
    assert "<link" not in html.lower()
    assert "<script src" not in html.lower()
    assert "url(" not in html.lower()


def test_report_on_finished_run(tmp_path):
    run = make_run(tmp_path)
    summary = build_report(run)
    out = run / "report"
    for name in ("report.md", "report.html", "summary.json", "epsilon_vs_round.png",
                 "epsilon_distribution.png", "accuracy_vs_round.png"):
        assert (out / name).exists() and (out / name).stat().st_size > 0, name
    # device-level DP with an example-level budget: no unit is drawn per device against activity
    # (a point per device at its public activity shows who joined; see the device-level DP tests below)
    assert not (out / "epsilon_vs_activity.png").exists()
    on_disk = read_summary(run).to_dict()
    assert on_disk["epsilon"]["example"]["max"] == summary["epsilon"]["example"]["max"]

    ex = _hand_epsilons("example")
    dv = _hand_epsilons("device")
    assert on_disk["delta"] == DELTA
    assert on_disk["accountant"] == "pld"
    assert on_disk["epsilon"]["example"]["max"] == pytest.approx(max(ex.values()), rel=1e-9)
    assert on_disk["epsilon"]["example"]["median"] == pytest.approx(statistics.median(ex.values()), rel=1e-9)
    assert on_disk["epsilon"]["example"]["devices_accounted"] == len(ex) == 5
    assert on_disk["epsilon"]["device"]["max"] == pytest.approx(max(dv.values()), rel=1e-9)
    assert on_disk["epsilon"]["device"]["median"] == pytest.approx(statistics.median(dv.values()), rel=1e-9)
    assert on_disk["devices_over_budget"] == 1
    assert on_disk["final_accuracy"] == pytest.approx(0.8)
    assert on_disk["final_macro_f1"] == pytest.approx(0.6)
    assert on_disk["status"] == "finished"
    assert on_disk["metrics_lines_skipped"] == 1
    # Curves: last point equals the final value; the curve never decreases.
    curve = on_disk["curves"]["example"]
    assert curve[-1]["round"] == 4
    assert curve[-1]["max"] == pytest.approx(max(ex.values()))
    assert all(a["max"] <= b["max"] + 1e-12 for a, b in zip(curve, curve[1:]))
    # Round 2 point recomputed by hand.
    r2 = {}
    for t in (1, 2):
        for d in COHORTS[t]:
            r2.setdefault(d, []).append(SubsampledGaussianEvent(*_example_event(d)))
    # Intermediate points use a coarser (still pessimistic) PLD grid: an upper bound, close.
    exact_r2 = max(compute_epsilon(v, DELTA) for v in r2.values())
    assert curve[1]["max"] == pytest.approx(exact_r2, rel=0.01)
    tier = on_disk["epsilon"]["example"]["tier"]
    assert tier in ("strong", "reasonable", "weak")

    md = (out / "report.md").read_text()
    for phrase in ("add or remove one", "Poisson", "delta", "on the device", "on the server",
                   "activity counts", "conditioned on participation", "all rounds", "one utterance",
                   "all of one device's data", "1/N"):
        assert phrase.lower() in md.lower(), phrase
    html = (out / "report.html").read_text()
    _assert_self_contained(html)
    assert html.count("data:image/png;base64,") >= 3


def test_report_on_running_run_with_open_writer(tmp_path):
    run = make_run(tmp_path, rounds_done=2, rounds_planned=10)
    writer = sqlite3.connect(run / "ledger.sqlite", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # the server in the middle of writing round 3
    writer.execute("INSERT INTO rounds VALUES ('synthetic-run', 3, 3.0, 2)")
    hold_run_lock(run)  # as the server does while it runs the rounds
    try:
        summary = build_report(run)
    finally:
        release_run_lock(run)
        writer.execute("ROLLBACK")
        writer.close()
    assert summary["status"] == "running"
    assert summary["rounds_completed"] == 2
    ex = _hand_epsilons("example", rounds_done=2)
    assert summary["epsilon"]["example"]["max"] == pytest.approx(max(ex.values()))
    assert "Running: 2 round(s) committed so far of 10" in (run / "report" / "report.md").read_text()


def test_report_of_a_stopped_run_says_stopped(tmp_path):
    """No process holds the run's lock (it was stopped, or killed: the lock goes with the process)."""
    run = make_run(tmp_path, rounds_done=2, rounds_planned=10)
    script = f"import time; from rundir import hold_run_lock; hold_run_lock({str(run)!r}); print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert build_report(run)["status"] == "running"  # another process runs it
        with pytest.raises(RunDirError, match="another process is running this run"):
            hold_run_lock(run)  # and nobody else may
    finally:
        holder.kill()  # SIGKILL: the lock is released with the process
        holder.wait()
    summary = build_report(run)
    assert summary["status"] == "stopped"
    assert "Stopped after 2 of 10 planned rounds" in (run / "report" / "report.md").read_text()


def test_non_private_run_says_no_guarantee(tmp_path):
    run = make_run(tmp_path, dp=False, device_dp=False)
    summary = build_report(run)
    assert summary["dp"] is False
    assert summary["epsilon"]["example"]["max"] == "inf"
    assert summary["epsilon"]["device"] is None
    assert math.isinf(float(summary["epsilon"]["example"]["max"]))
    md = (run / "report" / "report.md").read_text()
    assert "NOT PRIVATE" in md and "no differential privacy guarantee" in md and "infinity" in md
    assert not (run / "report" / "epsilon_vs_round.png").exists()
    _assert_self_contained((run / "report" / "report.html").read_text())


def test_device_dp_off_and_baseline(tmp_path):
    run = make_run(tmp_path, device_dp=False)
    base = make_run(tmp_path, dp=False, device_dp=False, name="baseline", run_id="base", half_line=False)
    summary = build_report(run, base)
    assert summary["epsilon"]["device"] is None
    assert summary["baseline"]["final_accuracy"] == pytest.approx(0.8)
    md = (run / "report" / "report.md").read_text()
    assert "Device level: NOT protected" in md
    assert "non-private baseline" in md


def test_missing_run_dir_raises(tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        build_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="not a run directory"):
        build_report(tmp_path / "empty")


def test_run_without_ledger_yet(tmp_path):
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "config.toml").write_text('run_id = "fresh"\nrounds = 3\ntarget_delta = 1e-5\ndp = true\n')
    summary = build_report(run)
    assert summary["epsilon"]["example"]["max"] == 0.0
    assert summary["status"] == "stopped"  # no process holds its lock


def test_noiseless_device_level_is_infinite(tmp_path):
    run = make_run(tmp_path, sigma_u=0.0)
    summary = build_report(run)
    assert summary["epsilon"]["device"]["max"] == "inf"
    assert summary["epsilon"]["device"]["tier"] == "weak"
    assert math.isfinite(summary["epsilon"]["example"]["max"])
    read_summary(run)  # strict JSON (no Infinity)
    assert "∞" in (run / "report" / "report.md").read_text()


def _weighted_median(pairs):
    """Median of a distribution given as (value, count) pairs (the lower median)."""
    pairs = sorted(pairs)
    total, seen = sum(n for _, n in pairs), 0
    for v, n in pairs:
        seen += n
        if seen >= total / 2:
            return v


def test_example_epsilon_over_examples_static(tmp_path):
    """Static data: every example inherits its device's epsilon; the distribution is weighted by activity."""
    run = make_run(tmp_path)
    summary = json.loads(json.dumps(build_report(run)["epsilon"]["example"]["over_examples"]))
    ex = _hand_epsilons("example")
    pairs = [(ex.get(d, 0.0), a) for d, a in enumerate(ACTIVITY) if a]
    assert summary["source"] == "device activity"
    assert summary["examples"] == sum(ACTIVITY)
    assert summary["examples_trained"] == sum(a for d, a in enumerate(ACTIVITY) if d in ex)
    assert summary["max"] == pytest.approx(max(ex.values()), rel=1e-9)
    assert summary["median"] == pytest.approx(_weighted_median(pairs), rel=1e-9)
    assert summary["mean"] == pytest.approx(sum(e * n for e, n in pairs) / sum(ACTIVITY), rel=1e-9)
    assert "Over examples instead of devices" in (run / "report" / "report.md").read_text()


def test_example_epsilon_over_examples_uses_holdings(tmp_path):
    """Continual data: an example composes only the rounds its device trained while holding it."""
    run = make_run(tmp_path)
    conn = sqlite3.connect(run / "ledger.sqlite")
    conn.execute("CREATE TABLE example_holdings(run_id TEXT, round INTEGER, device_id INTEGER, uid INTEGER,"
                 " PRIMARY KEY(run_id, round, device_id, uid))")
    # device 3 trained in rounds 1-4: uid 100 held throughout, uid 101 arrived in round 3,
    # uid 102 deleted after round 1; device 0 trained in rounds 1 and 4: uid 200 held in both.
    held = {100: (3, [1, 2, 3, 4]), 101: (3, [3, 4]), 102: (3, [1]), 200: (0, [1, 4])}
    conn.executemany("INSERT INTO example_holdings VALUES (?,?,?,?)",
                     [("synthetic-run", t, d, u) for u, (d, ts) in held.items() for t in ts])
    conn.commit()
    conn.close()
    over = build_report(run)["epsilon"]["example"]["over_examples"]

    def eps(d, ts):
        return compute_epsilon([SubsampledGaussianEvent(*_example_event(d)) for _ in ts], DELTA, "pld")

    expected = sorted(eps(d, ts) for d, ts in held.values())
    assert over["source"] == "holdings"
    assert over["examples"] == 4
    assert over["max"] == pytest.approx(expected[-1], rel=1e-9)
    assert over["max"] == pytest.approx(max(_hand_epsilons("example")[d] for d in (0, 3)), rel=1e-9)
    assert over["median"] == pytest.approx(expected[1], rel=1e-9)
    assert over["mean"] == pytest.approx(sum(expected) / 4, rel=1e-9)
    assert eps(3, [1]) < eps(3, [3, 4]) < eps(3, [1, 2, 3, 4])  # fewer rounds held, less privacy spent


def test_report_shows_slot_metrics(tmp_path):
    run = make_run(tmp_path, half_line=False)
    path = run / "metrics.jsonl"
    rows = read_metric_lines(path)
    for r in rows:
        r.update(slot_f1=0.1 * r["round"], sentence_accuracy=0.05 * r["round"])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = build_report(run)
    assert summary["final_slot_f1"] == pytest.approx(0.4)
    assert summary["final_sentence_accuracy"] == pytest.approx(0.2)
    md = (run / "report" / "report.md").read_text()
    assert "slot F1 0.4" in md and "sentence accuracy 0.2" in md
    assert "| slot F1 | sentence accuracy |" in md


# --------------------------------------------------------------------- what the report must state truthfully


def _md(run):
    return (run / "report" / "report.md").read_text()


def _html(run):
    return (run / "report" / "report.html").read_text()


def test_trust_model_named_for_each_placement(tmp_path):
    """Noise on the device trusts nobody; noise on the aggregate trusts the aggregator, and says against whom it holds."""
    local = make_run(tmp_path, device_dp=False, name="local")
    s_local = build_report(local)
    central = make_run(tmp_path, device_dp=False, noise_at="aggregate", name="central")
    s_central = build_report(central)

    assert s_local["noise_at"] == "device" and s_central["noise_at"] == "aggregate"
    assert "trusts nobody" in s_local["trust_model"]["example"]["name"]
    assert "trusts the aggregator" in s_central["trust_model"]["example"]["name"]
    md_local, md_central = _md(local), _md(central)
    assert "Trust model: example level: local DP: noise on the device (trusts nobody)." in md_local
    assert "trusts the aggregator" not in md_local and "clipped sum" not in md_local
    assert "Trust model: example level: central DP: noise on the aggregate (trusts the aggregator)." in md_central
    assert "trusts nobody" not in md_central
    for phrase in ("not to look at the individual clipped sums", "observers of the released models",
                   "sees the cohort but only the noisy sum", "secure aggregation with noise shares",
                   "simulates the noise at the server", "No amplification by device selection",
                   "rate is p, not q_k * p"):
        assert phrase in md_central, phrase
    assert "No amplification by device selection" not in md_local
    # The aggregate placement is accounted as one Poisson-subsampled Gaussian (sigma, p) per round joined.
    hand = {}
    for t in range(1, 5):
        for d in COHORTS[t]:
            hand.setdefault(d, []).append(SubsampledGaussianEvent(SIGMA, P_AGGREGATE, 1))
    assert s_central["epsilon"]["example"]["max"] == pytest.approx(
        max(compute_epsilon(v, DELTA, "pld") for v in hand.values()), rel=1e-9)
    assert "| example level: example sampling rate p | 0.5 |" in md_central
    assert "trusts the aggregator" in _html(central)


def test_reproducible_noise_says_not_private_in_first_line(tmp_path):
    run = make_run(tmp_path, reproducible_noise=True)
    summary = build_report(run)
    md, html = _md(run), _html(run)
    first_md = md.splitlines()[0]
    assert first_md.startswith("**NOT PRIVATE: this run used --reproducible-noise;")
    assert "regenerated from the seed in config.toml" in first_md
    first_html = html.splitlines()[0]
    assert "NOT PRIVATE" in first_html and "--reproducible-noise" in first_html
    body = html.split("<body>", 1)[1].lstrip()
    assert body.startswith('<p class="alert">NOT PRIVATE: this run used --reproducible-noise')
    text = summary_path(run).read_text()
    assert list(json.loads(text))[0] == "not_private"
    assert text.splitlines()[1].lstrip().startswith('"not_private": "this run used --reproducible-noise')
    assert list(summary)[0] == "not_private"
    assert summary["guarantee"] == "none" and summary["noise_source"] == "reproducible"
    assert "do NOT hold for this run" in md
    assert "never recorded" not in md
    _assert_self_contained(html)

    # A run with secret noise: no such line, and the report says where the noise came from.
    secret = make_run(tmp_path, name="secret")
    s2 = build_report(secret)
    assert "not_private" not in s2 and s2["guarantee"] == "yes" and s2["noise_source"] == "secret"
    assert "not_private" not in json.loads(summary_path(secret).read_text())
    md2 = _md(secret)
    assert md2.splitlines()[0] == "# Privacy budget report: run synthetic-run"
    assert "NOT PRIVATE" not in md2 and "NOT PRIVATE" not in _html(secret)
    assert "secret source" in md2 and "never recorded" in md2
    assert "drives only partitioning, initialisation and data splits" in md2


def test_budgets_stated_with_devices_that_reached_them(tmp_path):
    """--max-epsilon 6 --target-epsilon-device 3: both budgets in summary.json and report.md, with counts per unit.

    Under device-level DP with an example-level budget, which devices reached a budget is withheld
    (a device's example-level budget runs out because of the rounds it joined, and from then on it
    accrues no device-level events either): only the counts are given. Which devices reached the
    device-level budget is given in a device-level-only run (``device_only``), whose budget events
    do not depend on participation; without device-level DP see
    test_without_device_level_dp_the_report_still_names_devices.
    """
    events = [(3, "example", 3, 6.2), (2, "device", 4, 3.1), (4, "device", 3, 3.05)]
    run = make_run(tmp_path, max_epsilon=6.0, target_epsilon_device=3.0, sigma_u=3.0, budget_events=events)
    build_report(run)
    on_disk = read_summary(run).to_dict()
    b = on_disk["budget"]
    assert b["max_epsilon"] == 6.0 and b["target_epsilon_device"] == 3.0 and b["target_epsilon"] is None
    assert b["epsilon_budget"] == 6.0 and b["device_epsilon_budget"] == 3.0
    assert b["example"]["epsilon"] == 6.0 and b["example"]["devices_reached"] == 1
    assert b["device"]["epsilon"] == 3.0 and b["device"]["devices_reached"] == 2
    for unit in ("example", "device"):
        assert "devices_reached_ids" not in b[unit] and "devices_over" not in b[unit]
        assert b[unit]["devices_over_count"] == 0
    assert on_disk["budget_events"] == []
    assert on_disk["devices_over_budget"] == 3
    device_only = make_run(tmp_path, name="device_only", dp=False, target_epsilon_device=3.0, sigma_u=3.0,
                           budget_events=events[1:])
    dv = build_report(device_only)["budget"]["device"]
    assert dv["devices_reached_ids"] == [2, 4] and dv["devices_over"] == []
    md = _md(run)
    assert "Example level: epsilon <= 6 per device at delta = 1e-05 (from --max-epsilon 6)" in md
    assert "1 device reached it" in md
    assert "Device level: epsilon <= 3 per device at delta = 1e-05 (from --target-epsilon-device 3)" in md
    assert "2 devices reached it" in md
    assert "example level epsilon <= 6 per device (1 device reached it); device level epsilon <= 3 per device " \
           "(2 devices reached it)" in md
    assert "No device reached its budget" not in md and "BUDGET EXCEEDED" not in md
    assert "3 devices were removed from selection" in md and "is withheld (device participation is secret" in md

    # --target-epsilon is a budget too; with --max-epsilon the server uses the smaller.
    both = make_run(tmp_path, name="both", max_epsilon=7.0, target_epsilon=5.9, device_dp=False, budget_events=[])
    s = build_report(both)
    assert s["budget"]["example"]["epsilon"] == 5.9
    assert s["budget"]["example"]["from"] == ["max_epsilon", "target_epsilon"]
    assert s["budget"]["example"]["devices_reached"] == 0 and s["budget"]["example"]["devices_reached_ids"] == []
    md_both = _md(both)
    assert "epsilon <= 5.9 per device" in md_both and "min(--max-epsilon, --target-epsilon)" in md_both
    assert "No device reached its budget." in md_both


def test_budget_exceeded_is_said_loudly(tmp_path):
    """Example-level DP only: the alert names the devices above the budget. Under device-level DP
    (``secret``) it gives how many, not which (their example-level epsilon depends on the rounds they joined)."""
    run = make_run(tmp_path, max_epsilon=1.0, budget_events=[], device_dp=False)
    summary = build_report(run)
    ex = summary["epsilon"]["example"]["per_device"]
    over = sorted(int(d) for d, e in ex.items() if e > 1.0)
    assert over  # the synthetic run spends more than 1 on some device
    assert summary["budget"]["example"]["devices_over"] == over
    md = _md(run)
    assert "BUDGET EXCEEDED at example level" in md and "ABOVE" in md
    assert f"devices {', '.join(map(str, over))})" in md
    assert "No device reached its budget" not in md
    assert any("ABOVE their budget" in w for w in summary["warnings"])
    assert '<p class="alert">BUDGET EXCEEDED' in _html(run)

    secret = make_run(tmp_path, name="secret", max_epsilon=1.0, budget_events=[])
    s = build_report(secret)
    assert s["budget"]["example"]["devices_over_count"] == len(over) and "devices_over" not in s["budget"]["example"]
    md = _md(secret)
    assert f"BUDGET EXCEEDED at example level: {len(over)} devices have an epsilon above the budget 1 (largest" in md
    alert = next(line for line in md.splitlines() if "BUDGET EXCEEDED at example level" in line)
    assert "; devices" not in alert
    assert any("ABOVE their budget" in w and "(devices" not in w for w in s["warnings"])


def test_device_level_only_run_is_not_called_not_private(tmp_path):
    run = make_run(tmp_path, dp=False, device_dp=True)
    summary = build_report(run)
    md, html = _md(run), _html(run)
    assert "NOT PRIVATE" not in md and "NOT PRIVATE" not in html
    assert "not_private" not in summary and summary["guarantee"] == "yes"
    dv = _hand_epsilons("device")
    assert summary["epsilon"]["device"]["max"] == pytest.approx(max(dv.values()), rel=1e-9)
    implied = summary["epsilon"]["example"]
    assert implied["implied_by"] == "device"
    assert implied["max"] == pytest.approx(2 * max(dv.values()), rel=1e-9)
    assert implied["delta"] == pytest.approx((1 + math.exp(max(dv.values()))) * DELTA, rel=1e-9)
    assert f"Device level (all of one device's data): epsilon = {fmt(max(dv.values()))} at delta = 1e-05" in md
    assert "the device-level guarantee implies one" in md
    assert f"example-level epsilon <= 2 x device-level epsilon = {fmt(2 * max(dv.values()))}" in md
    assert "Trust model: device level: central DP: DP-FedAvg on the server (trusts the aggregator)." in md
    assert (run / "report" / "epsilon_vs_round.png").exists()  # the device level is plotted
    # The banner is kept for a run with neither unit.
    none = make_run(tmp_path, dp=False, device_dp=False, name="none")
    build_report(none)
    assert "THIS RUN IS NOT PRIVATE (dp = false, device_dp = false)" in _md(none)


def test_adjacency_paragraph_says_counts_are_public(tmp_path):
    local = make_run(tmp_path, name="local")
    build_report(local)
    central = make_run(tmp_path, device_dp=False, noise_at="aggregate", name="central")
    build_report(central)
    for run in (local, central):
        md = _md(run)
        for phrase in ("Example counts are public", "exact example count n_k", "public metadata",
                       "held fixed", "whether a device's count changed", "given how many it holds, not how many",
                       "replace-one adjacency", "(2 epsilon, (1 + e^epsilon) delta)"):
            assert phrase in md, (run.name, phrase)
    assert "q = B / n_k" in _md(local) and "p n_k over the cohort" in _md(central)
    assert "q = B / n_k" not in _md(central)
    none = make_run(tmp_path, dp=False, device_dp=False, name="none")
    build_report(none)
    assert "Example counts are public" not in _md(none)


def test_per_round_table_shows_train_loss_only_when_sent(tmp_path):
    private = make_run(tmp_path, half_line=False)
    build_report(private)
    md = _md(private)
    header = next(line for line in md.splitlines() if line.startswith("| round |"))
    assert "train loss" not in header and "example eps" in header and "device eps" in header
    assert "cohort" not in header  # the device-level accounting treats the cohort as secret
    assert "No training loss is shown" in md and "computed on the test split" in md

    public = make_run(tmp_path, dp=False, device_dp=False, name="public", half_line=False)
    build_report(public)
    md = _md(public)
    header = next(line for line in md.splitlines() if line.startswith("| round |"))
    assert "train loss" in header and "cohort" in header
    assert "eps" not in header  # epsilons are null in a non-private run's metrics
    assert "| 2 |  | 2 | 1 | 0.4 | 0.3 |" in md


# --------------------------------------------------------------------- releases (NFR / PFR per release)


def _set_releases(run, releases):
    """Mark rounds of ``run``'s metrics.jsonl as releases: ``releases`` maps round -> extra keys of its line."""
    path = run / "metrics.jsonl"
    rows = read_metric_lines(path)
    for r in rows:
        if r["round"] in releases:
            r.update({"release": True, "nfr": None, "pfr": None, "nfr_baseline": None, "pfr_baseline": None},
                     **releases[r["round"]])
        elif releases:
            r["release"] = False
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_releases_section_with_flip_rates(tmp_path):
    run = make_run(tmp_path, half_line=False)
    _set_releases(run, {2: {}, 3: {"nfr": 0.05, "pfr": 0.125}, 4: {"nfr": 0.0125, "pfr": 0.25}})
    summary = build_report(run)
    assert summary["releases"] == [
        {"round": 2, "accuracy": pytest.approx(0.4), "nfr": None, "pfr": None, "nfr_baseline": None, "pfr_baseline": None},
        {"round": 3, "accuracy": pytest.approx(0.6), "nfr": 0.05, "pfr": 0.125, "nfr_baseline": None, "pfr_baseline": None},
        {"round": 4, "accuracy": pytest.approx(0.8), "nfr": 0.0125, "pfr": 0.25, "nfr_baseline": None, "pfr_baseline": None},
    ]
    assert read_summary(run).to_dict()["releases"] == summary["releases"]
    md = _md(run)
    assert "## Releases" in md
    assert md.index("## Utility beside privacy") < md.index("## Releases")
    assert "| release round | accuracy | NFR vs previous | PFR vs previous |\n" in md
    assert "| 2 | 0.4 | n/a | n/a |" in md
    assert "| 3 | 0.6 | 0.05 | 0.125 |" in md
    assert "| 4 | 0.8 | 0.0125 | 0.25 |" in md
    assert "vs baseline" not in md
    assert "on the test split" in md and "Yan et al. 2021" in md
    assert "previous release classified correctly and this release classifies wrongly" in md
    assert (run / "report" / "accuracy_nfr_per_release.png").exists()
    assert summary["plots"]["accuracy_nfr_per_release"] == "accuracy_nfr_per_release.png"
    assert "accuracy_nfr_per_release.png" in md
    assert "<h2>Releases</h2>" in _html(run)


def test_no_releases_section_for_older_runs(tmp_path):
    run = make_run(tmp_path)
    summary = build_report(run)
    assert "releases" not in summary and "releases" not in read_summary(run).to_dict()
    md = _md(run)
    assert "Releases" not in md and "NFR" not in md
    assert not (run / "report" / "accuracy_nfr_per_release.png").exists()
    # "release": false on every line is no release either.
    flagged = make_run(tmp_path, name="flagged", half_line=False)
    path = flagged / "metrics.jsonl"
    path.write_text("".join(json.dumps({**r, "release": False}) + "\n" for r in read_metric_lines(path)))
    assert "releases" not in build_report(flagged)
    assert "## Releases" not in _md(flagged)


def test_release_baseline_columns_only_with_baseline_model(tmp_path):
    run = make_run(tmp_path, half_line=False)
    _set_releases(run, {4: {"nfr_baseline": 0.0625, "pfr_baseline": 0.1875}})
    summary = build_report(run)
    assert summary["releases"] == [{"round": 4, "accuracy": pytest.approx(0.8), "nfr": None, "pfr": None,
                                    "nfr_baseline": 0.0625, "pfr_baseline": 0.1875}]
    md = _md(run)
    assert ("| release round | accuracy | NFR vs previous | PFR vs previous | NFR vs baseline | PFR vs baseline |"
            in md)
    assert "| 4 | 0.8 | n/a | n/a | 0.0625 | 0.1875 |" in md
    assert "--baseline-model" in md
    assert not (run / "report" / "accuracy_nfr_per_release.png").exists()  # one release: no plot


def test_epsilon_by_activity_quartile_matches_hand_accounting(tmp_path):
    """Devices holding data sorted by activity, four equal groups (Q1 lightest); epsilon median/max
    from the hand-composed events, 0 for a device that never joined; the report shows the table."""
    import statistics

    run = make_run(tmp_path)
    build_report(run)
    summary = json.loads((run / "report" / "summary.json").read_text())
    hand = _hand_epsilons("example")
    held = sorted((a, d) for d, a in enumerate(ACTIVITY) if a > 0)  # 5 devices: groups of 1, 1, 1, 2
    n = len(held)
    groups = [held[q * n // 4:(q + 1) * n // 4] for q in range(4)]
    rows = summary["epsilon"]["example"]["by_activity_quartile"]
    assert [r["quartile"] for r in rows] == [1, 2, 3, 4]
    for r, g in zip(rows, groups):
        vals = [hand.get(d, 0.0) for _, d in g]
        assert (r["activity_min"], r["activity_max"], r["devices"]) == (g[0][0], g[-1][0], len(g))
        assert r["epsilon_max"] == pytest.approx(max(vals), rel=1e-6)
        assert r["epsilon_median"] == pytest.approx(statistics.median(vals), rel=1e-6)
        joined = [sum(1 for t, c in COHORTS.items() if d in c) for _, d in g]
        assert r["rounds_joined_mean"] == pytest.approx(sum(joined) / len(g))
    md = (run / "report" / "report.md").read_text()
    assert "Example-level epsilon by activity quartile" in md and "| Q1 |" in md


# ---------------------------------------------------------------------------------------------------
# Device-level DP: which devices joined a round is secret (the device-level guarantee is amplified by
# the secret Poisson selection of devices), so the report names no device in a way tied to it.

IDS = [700101, 700202, 700303, 700404, 700505, 700606]  # distinctive ledger ids, to scan the files for
JOINED = sorted({IDS[d] for c in COHORTS.values() for d in c})  # device index 4 (q_k = 0) never joins
# the same run in which device index 5 (q_k = 0.1) is never picked: only who joined differs
COHORTS_WITHOUT_5 = {1: [0, 2, 3], 2: [1, 3], 3: [2, 3], 4: [0, 3]}
WITHHELD_KEYS = ('"per_device"', '"max_device"', '"devices_reached_ids"', '"devices_over"', '"first_joined"',
                 '"rounds_joined"', '"last_joined"', '"epsilon_example"', '"group"')
WITHHELD_SENTENCE = "Per-device figures are withheld because device participation is secret under device-level DP"


def _released_text(run):
    """What an attacker reads: summary.json, report.md and report.html (its embedded PNGs left out)."""
    out = run / "report"
    html = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", (out / "report.html").read_text())
    return {"summary.json": (out / "summary.json").read_text(), "report.md": (out / "report.md").read_text(),
            "report.html": html}


def _ids_named(text):
    """The fixture's device ids that occur in ``text`` as a number of their own."""
    return {d for d in IDS if re.search(rf"(?<![\d.]){d}(?![\d.])", text)}


def test_device_level_dp_report_names_no_device_that_joined(tmp_path):
    """Example- and device-level DP (noise on the device) with an example-level budget: an attacker's
    scan of the released files finds no id of a device that joined (except the device that asked to be
    deleted, named once as the request, with nothing on its rounds), and none of the per-device keys."""
    deleted = 1  # joined round 2, asks to be forgotten from round 3
    run = make_run(tmp_path, ids=IDS, deletions=[(deleted, 3)])
    js = build_report(run)
    files = _released_text(run)
    for name, text in files.items():
        assert _ids_named(text) <= {IDS[deleted]}, name
        assert len(re.findall(rf"(?<![\d.]){IDS[deleted]}(?![\d.])", text)) == 1, name  # the request, once
    for key in WITHHELD_KEYS:
        assert key not in files["summary.json"], key
    assert js["per_device_withheld"]["units"] == ["example", "device"]
    assert WITHHELD_SENTENCE in js["per_device_withheld"]["reason"]
    for unit in ("example", "device"):  # every aggregate over devices is still given
        e = js["epsilon"][unit]
        assert {"max", "median", "p90", "min", "mean", "devices_accounted", "by_activity_quartile"} <= set(e)
    assert js["epsilon"]["example"]["devices_accounted"] == len(JOINED)
    assert js["budget_events"] == [] and js["devices_over_budget"] == 1
    assert js["budget"]["example"]["devices_reached"] == 1
    assert js["deletions"] == [{"device_id": IDS[deleted], "round": 3, "examples": ACTIVITY[deleted]}]
    md = files["report.md"]
    assert md.count(WITHHELD_SENTENCE) == 1
    assert "| device | from round | examples (round 1) |" in md and "first joined" not in md
    assert "epsilon_vs_activity" not in md and not (run / "report" / "epsilon_vs_activity.png").exists()
    assert (run / "report" / "epsilon_distribution.png").exists()  # a distribution, no device ids


def test_device_level_epsilons_per_device_are_released_when_they_do_not_depend_on_participation(tmp_path):
    """Example-level DP without an example-level budget beside device-level DP: the example level's
    per-device figures are withheld; the device level's are given, because every device with q_k > 0
    accrues a device-level event each round whether or not it was picked: two runs that differ only in
    who joined release the same device-level figures, and name devices that never joined alike."""
    released = []
    for name, cohorts in (("a", COHORTS), ("b", COHORTS_WITHOUT_5)):
        run = make_run(tmp_path, name=name, ids=IDS, cohorts=cohorts, max_epsilon=None, budget_events=[])
        js = build_report(run)
        ex = js["epsilon"]["example"]
        assert "per_device" not in ex and "max_device" not in ex
        assert js["per_device_withheld"]["units"] == ["example"]
        assert sorted(int(d) for d in js["epsilon"]["device"]["per_device"]) == [
            IDS[d] for d, q in enumerate(Q_DEVICE) if q > 0]
        md = (run / "report" / "report.md").read_text()
        assert md.count(WITHHELD_SENTENCE) == 1 and "Per-device device-level epsilons are given" in md
        assert "Each device's device-level epsilon against its starting activity." in md
        released.append(js["epsilon"]["device"])
    assert released[0] == released[1]
    assert IDS[5] in [int(d) for d in released[1]["per_device"]]  # never joined in run b, named all the same


def test_device_level_only_run_gives_device_level_epsilons_and_no_rounds_joined(tmp_path):
    """dp = false, device_dp = true: nothing depends on participation at device level, so per-device
    device-level epsilons stay; a deletion request gives no rounds joined (under device-level DP they
    would count the rounds the device could have been selected in)."""
    run = make_run(tmp_path, dp=False, ids=IDS, deletions=[(1, 3)])
    js = build_report(run)
    assert "per_device_withheld" not in js
    dv = js["epsilon"]["device"]
    assert int(dv["max_device"]) in IDS and len(dv["per_device"]) == 5
    row, = js["deletions"]
    assert set(row) == {"device_id", "round", "examples", "epsilon_device"}
    assert row["epsilon_device"] == pytest.approx(dv["per_device"][str(IDS[1])])
    md = _md(run)
    assert WITHHELD_SENTENCE not in md and "the table withholds the rounds each device joined." in md
    assert "first joined" not in md and (run / "report" / "epsilon_vs_activity.png").exists()


def test_without_device_level_dp_the_report_still_names_devices(tmp_path):
    """Example-level DP only (no amplification by device selection is claimed): the report is as it
    was, per-device epsilons, the device with the largest, budget events and rounds joined included."""
    run = make_run(tmp_path, device_dp=False, ids=IDS, deletions=[(1, 3)])
    js = build_report(run)
    files = _released_text(run)
    assert "per_device_withheld" not in js
    ex = js["epsilon"]["example"]
    assert sorted(int(d) for d in ex["per_device"]) == JOINED and int(ex["max_device"]) in JOINED
    assert js["budget_events"] == [{"device_id": IDS[3], "unit": "example", "round": 3, "epsilon": 7.5}]
    assert js["budget"]["example"]["devices_reached_ids"] == [IDS[3]]
    assert js["budget"]["example"]["devices_over"] == []
    row, = js["deletions"]
    assert (row["device_id"], row["first_joined"], row["rounds_joined"], row["last_joined"]) == (IDS[1], 2, 1, 2)
    assert row["epsilon_example"] == pytest.approx(ex["per_device"][str(IDS[1])])
    for key in WITHHELD_KEYS:
        assert key in files["summary.json"], key
    assert _ids_named(files["summary.json"]) == set(JOINED)
    md = files["report.md"]
    assert WITHHELD_SENTENCE not in md and "| first joined |" in md and str(IDS[3]) in md
    assert (run / "report" / "epsilon_vs_activity.png").exists()
    assert "Each device's epsilon against its starting activity." in md


def test_plots_give_flips_their_own_axis_and_draw_the_budget(tmp_path, monkeypatch):
    import report.plots as plots

    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig) or path)
    releases = [{"round": r, "accuracy": 0.8 + 0.01 * i, "nfr": nfr}
                for i, (r, nfr) in enumerate([(5, None), (10, 0.07), (15, 0.001), (20, 0.02)])]
    plots.accuracy_nfr_per_release({"releases": releases}, tmp_path / "a.png")
    (fig,) = figs
    left, right = fig.axes
    assert left.get_ylim() == (0, 1) and right.get_ylim()[1] < 0.1  # NFR is not flattened on the accuracy scale
    figs.clear()
    summary = {"delta": 1e-5, "budget": {"epsilon_budget": 8.0, "device_epsilon_budget": None},
               "curves": {"example": [{"round": t, "max": 2.0 * t, "median": t} for t in range(1, 5)]},
               "epsilon": {"example": {"per_device": {0: 8.0}}}}
    plots.epsilon_vs_round(summary, tmp_path / "e.png")
    (ax,) = figs[0].axes
    assert any(list(line.get_ydata()) == [8.0, 8.0] for line in ax.get_lines())  # the run's budget
    labels = {t.get_text(): t.get_position() for t in ax.texts}
    assert "budget eps=8" in labels and labels["eps=1 (strong)"][0] == 0.99  # labels at the right edge


def test_a_run_that_releases_every_round_gives_each_accuracy_once(tmp_path):
    """With a release every round the two per-round tables were near-equal: the releases table then
    holds the flip rates alone."""
    run = make_run(tmp_path, half_line=False)
    rounds = [json.loads(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    _set_releases(run, {t: ({} if i == 0 else {"nfr": 0.01 * i, "pfr": 0.02 * i}) for i, t in enumerate(rounds)})
    build_report(run)
    md = _md(run)
    assert "| release round | NFR vs previous | PFR vs previous |\n" in md
    assert "| release round | accuracy |" not in md and "each one's accuracy is in the per-round table" in md
