"""The privacy audit wired into runs: canary insertion, canaries on record, ``dpfl audit``, report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from audit import canary_uid
from audit.run import read_canaries
from partitions.canary_record import record_canaries, write_canaries
from settings.config import ConfigError, RunConfig
from partitions.population import build_population, population_for_key, population_key
from rundir import LedgerReader, read_audit, read_canaries_file, read_roc, read_summary

REPO = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {"epsilon_lower_bound", "confidence", "auc", "tpr_at_1pct_fpr", "mean_exposure", "extraction_rate"}


def _cfg(tmp: Path | None = None, **kw) -> RunConfig:
    base = dict(model="tiny", num_devices=6, rounds=1, cohort_size=3, canaries=8, canary_repeats=2,
                max_examples=300, run_id="audit-test", target_delta=1e-4)
    base.update(kw)
    if tmp is not None:
        base["run_dir"] = str(tmp)
    return RunConfig(**base).validate()


# ------------------------------------------------------------------ insertion


def test_canary_insertion_deterministic_and_placed():
    cfg = _cfg(canaries=200, canary_repeats=3)
    pop = build_population(cfg)
    population_for_key.cache_clear()
    again = build_population(cfg)
    assert pop is not again
    assert pop.canaries == again.canaries and pop.canary_records == again.canary_records
    assert all(np.array_equal(a, b) for a, b in zip(pop.devices, again.devices))

    included = [c for c in pop.canaries if c.included]
    assert len(pop.canaries) == 200 and 70 <= len(included) <= 130  # ~half, Binomial(200, 1/2)
    assert len(pop.canary_records) == 3 * len(included)
    base = build_population(cfg.replace(canaries=0))
    assert len(pop.data.train) == len(base.data.train) + len(pop.canary_records)
    assert population_key(cfg) != population_key(cfg.replace(canaries=0))
    assert population_key(cfg) != population_key(cfg.replace(canary_repeats=1))

    uid_to_row = {int(u): i for i, u in enumerate(pop.uids(np.arange(len(pop.data.train))))}
    owner = {int(r): k for k, rows in enumerate(pop.devices) for r in rows}
    names = pop.data.label_names
    for r in pop.canary_records:  # included copies sit on their device, with their uid, text and label
        row = uid_to_row[r.uid]
        assert owner[row] == r.device_id
        assert pop.data.train[row]["text"] == r.text and names[pop.data.train[row]["label"]] == r.label
    on_devices = {int(u) for u in pop.uids(np.concatenate(pop.devices))}
    for c in pop.canaries:
        if not c.included:  # absent canaries are in no device's data
            assert canary_uid(c.canary_id, 0) not in on_devices and canary_uid(c.canary_id, 0) not in uid_to_row
    held_texts = set(pop.data.train.select(np.concatenate(pop.devices).tolist())["text"])
    assert all(c.text not in held_texts for c in pop.canaries if not c.included)
    # the real devices' data is unchanged
    for a, b in zip(pop.devices, base.devices):
        assert np.array_equal(a[: len(b)], b)


def test_canary_settings_validated():
    with pytest.raises(ConfigError, match="--canary-repeats"):
        _cfg(canary_repeats=0)
    with pytest.raises(ConfigError, match="--canaries"):
        _cfg(canaries=-1)


def test_write_and_record_canaries(tmp_path):
    cfg = _cfg(tmp_path)
    pop = build_population(cfg)
    path = write_canaries(tmp_path, pop)
    payload = read_canaries_file(path.parent)
    assert payload["m"] == 8 and len(payload["canaries"]) == 8
    dev = pop.canary_device()
    for e, c in zip(payload["canaries"], pop.canaries):
        assert e["included"] == c.included and e["secret"] == c.secret
        assert e["label"] in pop.data.label_names  # label NAME
        assert e["device_id"] == (dev[c.canary_id] if c.included else None)
        assert len(e["uids"]) == (2 if c.included else 0)
    canaries, devices = read_canaries(tmp_path)
    assert [c.secret for c in canaries] == [c.secret for c in pop.canaries]
    ledger = tmp_path / "ledger.sqlite"
    assert record_canaries(ledger, "r1", pop) == 8
    record_canaries(ledger, "r1", payload)  # idempotent (resume)
    with LedgerReader(ledger, "r1") as reader:
        rows = [(c.canary_id, c.included, c.device_id) for c in reader.canaries()]
    assert [(i, bool(inc)) for i, inc, _ in rows] == [(c.canary_id, c.included) for c in pop.canaries]
    assert all((d is None) == (not inc) for _, inc, d in rows)
    assert write_canaries(tmp_path / "none", build_population(cfg.replace(canaries=0))) is None


# ------------------------------------------------------------------ dpfl audit on a tiny run


def _train_tiny(pop, steps: int = 150, seed: int = 0):
    """Centralised stand-in for the federated run: the tiny model fits the devices' data."""
    from nlu.model import build_model, load_tokenizer

    torch.manual_seed(seed)
    model = build_model("tiny", len(pop.data.label_names), seed=seed)
    tok = load_tokenizer("tiny")
    rows = np.concatenate(pop.devices)
    tr = pop.data.train.select(rows.tolist())
    texts, labels = tr["text"], tr["label"]
    canary_rows = [i for i, u in enumerate(tr["uid"]) if u < 0]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = np.r_[rng.choice(len(texts), 12), rng.choice(canary_rows, 4)]  # canaries oversampled
        enc = tok([texts[i] for i in idx], padding=True, return_tensors="pt")
        loss = torch.nn.functional.cross_entropy(model(**enc).logits, torch.tensor([labels[i] for i in idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run directory as the server leaves it (config, ledger with one round, canaries, checkpoint)."""
    from rundir import EventRow, Ledger

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    rd = tmp_path_factory.mktemp("run") / "r"
    rd.mkdir()
    (rd / "checkpoints").mkdir()
    cfg = _cfg(rd, canaries=16)
    pop = build_population(cfg)
    (rd / "config.toml").write_text(cfg.to_toml())
    ledger = Ledger(rd / "ledger.sqlite", cfg.run_id)
    ledger.start_run(target_delta=1e-4, accountant="pld", selection_constant=0.5, calibration_note="test")
    act = pop.activity()
    ledger.record_devices(act, [0.5] * len(act))
    events = [EventRow(d, "example", 1.0, min(1.0, 16 / max(1, int(act[d]))), 20, 1.0) for d in range(len(act)) if act[d]]
    ledger.commit_round(round_=1, cohort_size=len(events), events=events, epsilons={}, target_delta=1e-4)
    ledger.close()
    write_canaries(rd, pop, rd / "ledger.sqlite", cfg.run_id)  # the server's call
    (rd / "metrics.jsonl").write_text(json.dumps({"round": 1, "accuracy": 0.5, "macro_f1": 0.4}) + "\n")
    model = _train_tiny(pop)
    torch.save(model.state_dict(), rd / "checkpoints" / "global.pt")
    (rd / "checkpoints" / "state.json").write_text(json.dumps({"round": 1}))
    yield rd
    torch.set_num_threads(n)


def test_report_without_audit_has_null_audit(tiny_run, tmp_path):
    import shutil

    from report import build_report

    rd = tmp_path / "copy"
    shutil.copytree(tiny_run, rd, ignore=shutil.ignore_patterns("audit", "report"))
    summary = build_report(rd)
    assert summary["audit"] is None
    md = (rd / "report" / "report.md").read_text()
    assert "no audit has been run yet" in md and "dpfl audit RUN_DIR" in md


def test_dpfl_audit_writes_audit_and_report(tiny_run, capsys):
    from dpfl.cli import main

    rc = main(["audit", str(tiny_run), "--exposure-samples", "300", "--extraction-canaries", "2",
               "--extraction-steps", "5", "--extraction-restarts", "2", "--real-samples", "60", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    audit = read_audit(tiny_run).to_dict()
    s = audit["summary"]
    assert SUMMARY_KEYS <= set(s)
    assert s["confidence"] == 0.95 and 0.0 <= s["auc"] <= 1.0
    assert s["epsilon_lower_bound"] == max(audit["epsilon_lower_bound"]["one_run"]["epsilon_lower_bound"],
                                           audit["epsilon_lower_bound"]["clopper_pearson"]["epsilon_lower_bound"])
    assert audit["canaries"]["m"] == 16 and audit["canaries"]["source"] == "canaries.json"
    with LedgerReader(tiny_run / "ledger.sqlite") as reader:
        n_rows = len(reader.canaries())
    assert n_rows == 16
    assert len(audit["per_canary"]) == 16 and audit["membership"]["real"] is not None
    assert audit["extraction"]["included"]["n"] + audit["extraction"]["excluded"]["n"] == 2
    # the model fitted its included canaries: clearly more exposure than the excluded ones
    assert audit["exposure"]["mean_included"] > audit["exposure"]["mean_excluded"]
    # a DP run with a ledger: the accounted epsilon sits beside the lower bound
    assert isinstance(s["epsilon_theoretical"], float) and s["epsilon_theoretical"] > 0
    roc = read_roc(tiny_run)
    assert roc["canaries"]["fpr"][0] == 0.0 and roc["canaries"]["tpr"][-1] == 1.0
    # dpfl audit rebuilt the report: summary.json has the audit object, the report its section
    summary = read_summary(tiny_run).to_dict()
    assert SUMMARY_KEYS <= set(summary["audit"])
    assert summary["audit"]["epsilon_lower_bound"] == s["epsilon_lower_bound"]
    md = (tiny_run / "report" / "report.md").read_text()
    html = (tiny_run / "report" / "report.html").read_text()
    assert "Measured leakage: privacy audit" in md and "lower bound" in md and "LOWER bound" in html
    assert "audit_roc.png" in md and (tiny_run / "report" / "audit_roc.png").exists()
    # dpfl report picks the audit up on its own too
    assert main(["report", str(tiny_run)]) == 0
    assert read_summary(tiny_run).audit["auc"] == s["auc"]


def test_dpfl_audit_bad_input(tmp_path, capsys):
    from dpfl.cli import main

    assert main(["audit", str(tmp_path / "nope")]) == 2
    assert "dpfl: error:" in capsys.readouterr().err
    rd = tmp_path / "r"
    rd.mkdir()
    (rd / "config.toml").write_text(_cfg(rd).to_toml())
    assert main(["audit", str(rd)]) == 2
    assert "global.pt" in capsys.readouterr().err


@pytest.mark.skipif(not any("write_canaries" in p.read_text() for p in (REPO / "server").glob("*.py")),
                    reason="the server does not write canaries.json yet")
def test_simulation_writes_canaries(tmp_path):
    from dpfl.commands.simulate import simulate

    cfg = _cfg(tmp_path / "sim", max_examples=None, target_delta=None)
    simulate(cfg, progress=False)
    canaries, devices = read_canaries(cfg.run_dir)
    assert len(canaries) == 8
    with LedgerReader(Path(cfg.run_dir) / "ledger.sqlite") as reader:
        on_record = reader.canaries()
    rows = (len(on_record), sum(c.included for c in on_record))
    assert rows == (8, sum(c.included for c in canaries))
