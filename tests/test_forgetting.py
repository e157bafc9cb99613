"""Who the model serves and deletion requests (issue 16): the holdout split and its noised,
accounted evaluation by activity quartile; deletion requests, and exact removal by `dpfl retrain`
(in process, toy data, tiny model)."""

from __future__ import annotations

import numpy as np
import pytest

from settings.config import ConfigError
from inprocess import run_rounds, toy_config, write_lamp_data
from partitions.activity import activity_quartiles
from partitions.population import split_holdout
from rundir import LedgerReader, read_holdout, read_metric_lines
from server.deletions import load_deletions
from server.holdout import holdout_epsilon

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_lamp_data(tmp_path_factory.mktemp("forgetdata"))


def test_activity_quartiles_of_a_hand_built_population():
    activity = {0: 5, 1: 0, 2: 1, 3: 9, 4: 3, 5: 3, 6: 7, 7: 2, 8: 4}
    q = activity_quartiles(activity)  # 8 devices hold data (device 1 holds none)
    assert q == [[2, 7], [4, 5], [8, 0], [6, 3]]
    assert activity_quartiles({0: 1, 1: 2, 2: 3}) == []
    five = activity_quartiles({d: d + 1 for d in range(5)})
    assert [len(g) for g in five] == [1, 1, 1, 2] and sum(five, []) == list(range(5))


def test_holdout_accuracy_by_quartile_of_a_hand_built_population():
    from dp.secure_random import NoiseSource
    from server.holdout import by_quartile

    activity = {0: 2, 1: 4, 2: 6, 3: 8, 4: 10, 5: 12, 6: 14, 7: 16}
    sizes = {0: 1, 1: 2, 2: 0, 3: 2, 4: 3, 5: 3, 6: 4, 7: 6}
    counts = {0: 1.0, 1: 0.0, 3: 2.0, 4: 3.0, 5: 1.0, 6: 4.0}  # device 2 holds no holdout; 7 did not reply
    rows = by_quartile(activity_quartiles(activity), activity, sizes, counts, "none", 0.0, None)
    assert [(r["devices"], r["devices_evaluated"], r["examples"]) for r in rows] == [(2, 2, 3), (2, 1, 2), (2, 2, 6), (2, 1, 4)]
    assert [r["accuracy"] for r in rows] == pytest.approx([1 / 3, 1.0, 4 / 6, 1.0])
    assert (rows[0]["activity_min"], rows[3]["activity_max"]) == (2, 16)
    noisy = by_quartile(activity_quartiles(activity), activity, sizes, counts, "aggregate", 2.0, NoiseSource(0))
    assert [r["noise_std_accuracy"] for r in noisy] == pytest.approx([2 / 3, 1.0, 2 / 6, 2 / 4])
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in noisy)
    on_device = by_quartile(activity_quartiles(activity), activity, sizes, counts, "device", 2.0, None)
    assert on_device[0]["noise_std_accuracy"] == pytest.approx(2.0 * np.sqrt(2) / 3)
    assert on_device[0]["accuracy"] == pytest.approx(1 / 3)  # already noised on the devices: nothing added


def test_holdout_split_is_per_example_seeded_and_disjoint():
    devices = (np.arange(0, 4000), np.arange(4000, 4003), np.arange(4003, 4003))
    uids = np.arange(4003) * 7 + 11
    train, hold = split_holdout(devices, 0.3, seed=7, uids=uids)
    for rows, tr, ho in zip(devices, train, hold):
        assert set(tr).isdisjoint(ho) and sorted(np.concatenate([tr, ho])) == sorted(rows)
    assert abs(len(hold[0]) / 4000 - 0.3) < 0.03  # each example with probability F
    again = split_holdout(devices, 0.3, seed=7, uids=uids)[1]
    assert all(np.array_equal(a, b) for a, b in zip(hold, again))
    assert not np.array_equal(hold[0], split_holdout(devices, 0.3, seed=8, uids=uids)[1][0])
    # one example's membership depends on its own id alone: removing others, or moving it, changes nothing
    held = set(uids[hold[0]].tolist())
    moved = split_holdout((np.arange(0, 4000, 2), np.arange(1, 4000, 2)), 0.3, seed=7, uids=uids)[1]
    assert set(uids[np.concatenate(moved)].tolist()) == held
    assert split_holdout(devices, 0.0, seed=7, uids=uids)[1][0].size == 0
    with pytest.raises(ValueError, match="holdout-per-device"):
        split_holdout(devices, 1.0, seed=0)


def test_holdout_epsilon_is_one_gaussian_mechanism():
    from dp.accounting import SubsampledGaussianEvent, compute_epsilon

    eps = holdout_epsilon(2.0, 1, 1e-5, "pld")
    assert eps == pytest.approx(compute_epsilon([SubsampledGaussianEvent(2.0, 1.0, 1)], 1e-5, "pld"))
    assert 1.5 < eps < 3.0  # a Gaussian mechanism of sigma 2 at delta 1e-5
    assert holdout_epsilon(2.0, 2, 1e-5, "pld") > eps
    assert holdout_epsilon(0.0, 1, 1e-5, "pld") == float("inf")


@pytest.mark.parametrize("noise_at", ["aggregate", "device"])
def test_holdout_evaluation_is_noised_accounted_and_by_quartile(tmp_path, data_dir, noise_at):
    cfg = toy_config(tmp_path / "run", data_dir, rounds=2, holdout_per_device=0.34, noise_at=noise_at,
                     num_devices=4, cohort_size=3, holdout_noise_multiplier=2.0)
    server, grid, _, _ = run_rounds(cfg)
    # holdout rows never reach a training message's device data
    pop = server.pop
    for d in range(4):
        assert set(pop.holdout_rows(d)).isdisjoint(pop.held(d))
    assert sum(len(pop.holdout_rows(d)) for d in range(4)) > 0
    evals = [m for m in grid.sent if m.metadata.message_type == "evaluate"]
    assert len(evals) == sum(1 for d in range(4) if len(pop.holdout_rows(d)))
    sent_noise = {float(m.content["config"]["holdout-noise"]) for m in evals}
    assert sent_noise == ({2.0} if noise_at == "device" else {0.0})
    # each reply carries its count alone
    replies = [c for _, c in grid.outgoing if "holdout" in c.metric_records]
    assert replies and all(set(c.keys()) == {"holdout"} and set(c.metric_records["holdout"].keys()) == {"correct"}
                           for c in replies)
    if noise_at == "device":  # noised on the device: not an integer count
        assert any(abs(c.metric_records["holdout"]["correct"] - round(c.metric_records["holdout"]["correct"])) > 1e-6
                   for c in replies)
    else:
        assert all(float(c.metric_records["holdout"]["correct"]).is_integer() for c in replies)
    h = read_holdout(tmp_path / "run")
    assert h["noise_at"] == noise_at and h["noise_multiplier"] == 2.0
    assert h["epsilon"] == pytest.approx(holdout_epsilon(2.0, 1, server.delta, cfg.accountant))
    assert [q["quartile"] for q in h["quartiles"]] == [1, 2, 3, 4]
    assert sum(q["examples"] for q in h["quartiles"]) == sum(len(pop.holdout_rows(d)) for d in range(4))
    for q in h["quartiles"]:
        assert q["accuracy"] is None or 0.0 <= q["accuracy"] <= 1.0
    with LedgerReader(tmp_path / "run") as reader:
        (rel,) = reader.holdout_releases()
    assert (rel.round, rel.noise_multiplier, rel.noise_at) == (2, 2.0, noise_at)
    assert rel.examples == sum(q["examples"] for q in h["quartiles"])
    # the report: the section, the holdout epsilon recomputed from the ledger, the quartiles' training epsilon
    from report import build_report

    summary = build_report(tmp_path / "run")
    hs = summary["holdout"]
    assert hs["epsilon"] == pytest.approx(h["epsilon"]) and hs["releases"] == 1
    by_q = {q["quartile"]: q for q in summary["epsilon"]["example"]["by_activity_quartile"]}
    for q in hs["quartiles"]:
        assert q["epsilon_max"] == by_q[q["quartile"]]["epsilon_max"]
    md = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "## Who the model serves" in md and f"epsilon {hs['epsilon']:.4g}" in md


def test_holdout_settings_are_checked(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="--holdout-per-device"):
        toy_config(tmp_path / "a", data_dir, holdout_per_device=1.0)
    with pytest.raises(ConfigError, match="--holdout-per-device.*device-dp"):
        toy_config(tmp_path / "b", data_dir, holdout_per_device=0.2, device_dp=True, dp=False)
    with pytest.raises(ConfigError, match="--holdout-noise-multiplier"):
        toy_config(tmp_path / "c", data_dir, holdout_per_device=0.2, holdout_noise_multiplier=0.0)


def test_deletions_file_errors_name_the_file_and_line(tmp_path):
    p = tmp_path / "del.txt"
    p.write_text("# device round\n1 3\n\n2 5\n1 2\n")
    assert load_deletions(p, 4) == {1: 2, 2: 5}  # a device's earliest request stands
    for text, msg in [("1 x\n", "line 1: expected 'DEVICE_ID ROUND'"), ("0 1\n9 2\n", "line 2: device 9"),
                      ("1 0\n", "line 1: round 0")]:
        p.write_text(text)
        with pytest.raises(ConfigError, match=msg) as exc:
            load_deletions(p, 4)
        assert str(p) in str(exc.value)
    with pytest.raises(ConfigError, match="cannot read"):
        load_deletions(tmp_path / "missing.txt", 4)


def test_a_deleted_device_is_never_selected_and_its_examples_never_train(tmp_path, data_dir):
    dels = tmp_path / "deletions.txt"
    dels.write_text("1 2\n3 1\n")
    cfg = toy_config(tmp_path / "run", data_dir, rounds=4, num_devices=4, cohort_size=4, selection="uniform",
                     deletions=str(dels), noise_at="aggregate")
    server, grid, _, _ = run_rounds(cfg)
    by_round: dict[int, set] = {}
    for m in grid.sent:
        if m.metadata.message_type == "evaluate":
            continue
        by_round.setdefault(int(m.content["config"]["server-round"]), set()).add(int(m.content["device"]["device-id"]))
    assert 3 not in set().union(*by_round.values())  # deleted from round 1: never asked
    assert all(1 not in devs for t, devs in by_round.items() if t >= 2)
    assert 1 in by_round[1]  # cohort size 4 of 4 devices: everyone else joins every round
    # the devices that trained never held a deleted device's rows
    rows_3 = set(server.pop.held(3))
    assert rows_3 and all(rows_3.isdisjoint(server.pop.held(d)) for d in (0, 1, 2))
    with LedgerReader(tmp_path / "run") as reader:
        dl = {d.device_id: d for d in reader.deletions()}
        events = reader.events("example")
    assert dl[1].round == 2 and dl[1].first_joined == 1
    assert dl[3].round == 1 and dl[3].first_joined is None
    assert all(e.device_id != 3 for e in events)
    assert all(e.round < 2 for e in events if e.device_id == 1)
    assert (tmp_path / "run" / "checkpoints" / "rounds" / "trainable-r3.pt").exists()  # --deletions keeps rounds
    from report import build_report

    summary = build_report(tmp_path / "run")
    rows = {d["device_id"]: d for d in summary["deletions"]}
    eps1 = summary["epsilon"]["example"]["per_device"]["1"]  # (JSON keys)
    n1 = int(server.pop.activity()[1])
    assert rows[1]["rounds_joined"] == 1 and rows[1]["examples"] == n1
    assert rows[1]["epsilon_example"] == pytest.approx(eps1)
    assert rows[1]["group"]["epsilon"] == pytest.approx(n1 * eps1)  # group privacy over the device's n_k examples
    assert rows[3]["rounds_joined"] == 0 and rows[3]["epsilon_example"] == 0.0
    md = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "## Deletion requests" in md and "group privacy" in md and "dpfl retrain" in md



def _asked(grid) -> set[int]:
    return {int(m.content["device"]["device-id"]) for m in grid.sent if m.metadata.message_type != "evaluate"}


def test_retrain_from_scratch_removes_a_device_that_joined(tmp_path, data_dir, capsys):
    """Device 2 joined from round 1 and asks to be forgotten at round 3: retraining from round 2 is
    refused (the error names the round to use); from round 1 the new run never asks it to train."""
    from dpfl.cli import main
    from dpfl.commands.retrain import prepare_retrain

    dels = tmp_path / "deletions.txt"
    dels.write_text("2 3\n")
    parent = tmp_path / "parent"
    cfg = toy_config(parent, data_dir, rounds=3, num_devices=4, cohort_size=4, selection="uniform",
                     deletions=str(dels), noise_at="aggregate")
    _, grid, _, _ = run_rounds(cfg)
    assert 2 in _asked(grid)
    rc = main(["retrain", str(parent), "--from-round", "2", "--run-dir", str(tmp_path / "late")])
    assert rc == 2 and "device 2 first joined in round 1" in capsys.readouterr().err
    ccfg = prepare_retrain(parent, 1, tmp_path / "child")
    server, grid2, _, _ = run_rounds(ccfg, resume=True)
    assert server.start_round == 1 and 2 not in _asked(grid2) and _asked(grid2)
    with LedgerReader(parent) as reader:
        parent_events = {(e.round, e.attempt, e.device_id, e.unit) for e in reader.events()}
    with LedgerReader(tmp_path / "child") as reader:
        lin = reader.lineage()
        events = {(e.round, e.attempt, e.device_id, e.unit) for e in reader.events()}
        replaced = {(e.round, e.attempt, e.device_id, e.unit) for e in reader.replaced_events()}
    assert events and all(d != 2 for _, _, d, _ in events)
    assert replaced == parent_events  # every parent round is replaced; its events are kept apart
    assert (lin.from_round, lin.removed_devices, lin.parent_run_id) == (1, (2,), cfg.run_id)
    from report import build_report

    summary = build_report(tmp_path / "child")
    both = summary["lineage"]["epsilon_if_parent_kept"]["example"]
    assert both > summary["epsilon"]["example"]["max"]  # if the parent's models stay released, both count
    assert "are withdrawn" in (tmp_path / "child" / "report" / "report.md").read_text()


def test_retrain_from_a_kept_round_keeps_the_parents_rounds(tmp_path, data_dir):
    """Retraining from round 3 starts from the parent's kept checkpoint of round 2: rounds 1-2
    (metrics lines, privacy events) are the parent's; rounds 3-4 are new and without the device."""
    from dpfl.commands.retrain import prepare_retrain
    from settings.config import RunConfig
    from rundir import config_path

    dels = tmp_path / "deletions.txt"
    dels.write_text("3 1\n")  # device 3 never joins
    parent = tmp_path / "parent"
    cfg = toy_config(parent, data_dir, rounds=4, num_devices=4, cohort_size=4, selection="uniform",
                     deletions=str(dels), noise_at="aggregate")  # q = 1: no round's cohort is empty
    run_rounds(cfg)
    with LedgerReader(parent) as reader:
        parent_events = [(e.round, e.device_id, e.noise_multiplier) for e in reader.events("example") if e.round < 3]
        parent_all = {(e.round, e.attempt, e.device_id) for e in reader.events("example")}
    child = tmp_path / "child"
    ccfg = prepare_retrain(parent, 3, child)
    assert RunConfig.from_toml(config_path(child)).run_id == ccfg.run_id != cfg.run_id
    server, grid, _, _ = run_rounds(ccfg, resume=True)
    assert server.start_round == 3 and 3 not in _asked(grid)
    assert {int(m.content["config"]["server-round"]) for m in grid.sent} == {3, 4}
    with LedgerReader(child) as reader:
        lin = reader.lineage()
        events = reader.events("example")
        dl = reader.deletions()
    assert (lin.from_round, lin.removed_devices) == (3, (3,))
    from report import build_report

    build_report(child)
    assert "Retrained for exact removal" in (child / "report" / "report.md").read_text()
    assert [(e.round, e.device_id, e.noise_multiplier) for e in events if e.round < 3] == parent_events
    with LedgerReader(child) as reader:
        replaced = {(e.round, e.attempt, e.device_id) for e in reader.replaced_events() if e.unit == "example"}
    new = [e for e in events if e.round >= 3]
    assert replaced == {x for x in parent_all if x[0] >= 3}  # the parent's rounds 3-4, kept apart
    assert new and all(e.device_id != 3 for e in new)
    assert [(d.device_id, d.round) for d in dl] == [(3, 3)]
    rows = read_metric_lines(child)
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert rows[:2] == read_metric_lines(parent)[:2]


def test_holdout_noise_must_fit_the_example_budget(tmp_path, data_dir):
    from server import app as sapp

    cfg = toy_config(tmp_path / "run", data_dir, holdout_per_device=0.3, holdout_noise_multiplier=1.0,
                     target_epsilon=1.0)
    with pytest.raises(ConfigError, match="--holdout-noise-multiplier 1 gives each holdout example epsilon") as exc:
        sapp.Server(cfg)
    assert "use --holdout-noise-multiplier" in str(exc.value)
    assert not (tmp_path / "run" / "ledger.sqlite").exists()  # refused before anything was written


def test_resume_keeps_deletions_and_redoes_an_interrupted_holdout(tmp_path, data_dir):
    """The run keeps its copy of the deletions file; after a resume the deleted device is still out of
    the holdout evaluation; an evaluation on record without its result is done again and both count."""
    dels = tmp_path / "deletions.txt"
    dels.write_text("0 1\n")
    run = tmp_path / "run"
    cfg = toy_config(run, data_dir, rounds=2, num_devices=4, cohort_size=3, holdout_per_device=0.34,
                     deletions=str(dels), noise_at="aggregate")
    run_rounds(cfg)
    dels.unlink()  # the run reads its own copy from now on
    from dpfl.commands.simulate import resume_config
    from rundir import config_path

    again = resume_config(str(run))
    assert again.deletions == str(run / "deletions.txt") and (run / "deletions.txt").read_text() == "0 1\n"
    first = read_holdout(run)
    (run / "holdout.json").unlink()  # as if the run had stopped during its holdout evaluation
    server, grid, _, _ = run_rounds(again, resume=True)
    assert server.deleted == {0}
    asked = {int(m.content["device"]["device-id"]) for m in grid.sent if m.metadata.message_type == "evaluate"}
    assert asked and 0 not in asked
    with LedgerReader(run) as reader:
        rows = reader.holdout_releases()
    assert len(rows) == 2 and rows[0].attempt < rows[1].attempt
    from report import build_report

    summary = build_report(run)
    assert summary["holdout"]["releases"] == 2
    assert summary["holdout"]["epsilon"] == pytest.approx(holdout_epsilon(2.0, 2, server.delta, cfg.accountant))
    assert summary["holdout"]["epsilon"] > first["epsilon"]
    # interrupted again: a session that only redid the holdout wrote no event and no round, yet the
    # next one must not reuse its attempt number (its row would replace the earlier release's)
    (run / "holdout.json").unlink()
    run_rounds(resume_config(str(run)), resume=True)
    with LedgerReader(run) as reader:
        rows = reader.holdout_releases()
    assert len(rows) == 3 and len({r.attempt for r in rows}) == 3
    assert build_report(run)["holdout"]["epsilon"] == pytest.approx(holdout_epsilon(2.0, 3, server.delta, cfg.accountant))


def test_a_moved_run_reads_its_own_deletions_and_retrain_keeps_later_requests(tmp_path, data_dir, monkeypatch):
    """A run made with a relative --run-dir resumes from elsewhere with its own copy of the requests;
    a retrain keeps, as they were, the requests whose round the parent never reached."""
    from dpfl.commands.retrain import prepare_retrain
    from dpfl.commands.simulate import resume_config

    work = tmp_path / "work"
    work.mkdir()
    (work / "dels.txt").write_text("3 1\n1 9\n")  # device 1's request is for a round the run never reaches
    monkeypatch.chdir(work)
    cfg = toy_config("runs/p", data_dir, rounds=2, num_devices=4, cohort_size=3, deletions="dels.txt",
                     noise_at="aggregate")
    run_rounds(cfg)
    monkeypatch.chdir(tmp_path)
    moved = tmp_path / "moved"
    (work / "runs" / "p").rename(moved)
    (work / "dels.txt").unlink()
    again = resume_config(str(moved))
    server, _, _, _ = run_rounds(again.replace(rounds=3).validate(), resume=True)
    assert server.deletion_requests == {3: 1, 1: 9} and server.deleted == {3}
    ccfg = prepare_retrain(moved, 1, tmp_path / "child")
    lines = sorted((tmp_path / "child" / "deletions.txt").read_text().split("\n"))
    assert lines == ["", "1 9", "3 1"]
    assert ccfg.deletions == str(tmp_path / "child" / "deletions.txt")
