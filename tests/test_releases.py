"""Releases: flip rates against hand-built predictions, which rounds are releases, and the
metrics a run's releases carry (in process, toy data, tiny model)."""

from __future__ import annotations

import numpy as np
import pytest

from inprocess import run_rounds, toy_config, write_lamp_data
from rundir import read_metric_lines
from server.releases import ReleaseTracker, flip_rates, is_release

pytestmark = pytest.mark.usefixtures("task_identity")


def test_flip_rates_against_hand_built_predictions():
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    old = np.array([0, 1, 2, 0, 0, 3, 2, 3])  # right on 0, 1, 2, 4, 6, 7
    new = np.array([0, 2, 2, 3, 1, 1, 0, 3])  # right on 0, 2, 3, 5, 7
    nfr, pfr = flip_rates(old == labels, new == labels)
    assert nfr == pytest.approx(3 / 8)  # examples 1, 4, 6: old right, new wrong
    assert pfr == pytest.approx(2 / 8)  # examples 3, 5: old wrong, new right
    assert pfr - nfr == pytest.approx((new == labels).mean() - (old == labels).mean())
    assert flip_rates(old == labels, old == labels) == (0.0, 0.0)
    with pytest.raises(ValueError, match="one shape"):
        flip_rates(np.ones(3, bool), np.ones(4, bool))


def test_which_rounds_are_releases():
    assert [t for t in range(1, 11) if is_release(t, 10, 4, 1)] == [4, 8, 10]
    assert [t for t in range(1, 11) if is_release(t, 10, None, 3)] == [3, 6, 9, 10]  # the evaluation rounds


def test_tracker_compares_each_release_with_the_previous_and_the_baseline():
    base = np.array([True, True, False, False])
    tr = ReleaseTracker(base)
    first = tr.release(2, np.array([True, False, True, False]))
    assert first["nfr"] is None and first["previous_release"] is None
    assert (first["nfr_baseline"], first["pfr_baseline"]) == (0.25, 0.25)
    saved = tr.state_dict()
    again = ReleaseTracker(base)
    again.load_state_dict(saved)  # a resumed run compares against the release before the crash
    second = again.release(4, np.array([False, False, True, True]))
    assert second["previous_release"] == 2 and (second["nfr"], second["pfr"]) == (0.25, 0.25)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_lamp_data(tmp_path_factory.mktemp("reldata"))


def test_a_run_records_flip_rates_at_each_release_and_against_a_baseline(tmp_path, data_dir):
    a = toy_config(tmp_path / "a", data_dir, rounds=2, release_every=1)
    run_rounds(a)
    rows = read_metric_lines(tmp_path / "a")
    assert [r.get("release") for r in rows] == [True, True]
    assert rows[0]["nfr"] is None and rows[0]["pfr"] is None and rows[0]["nfr_baseline"] is None
    assert rows[1]["previous_release"] == 1
    assert rows[1]["pfr"] - rows[1]["nfr"] == pytest.approx(rows[1]["accuracy"] - rows[0]["accuracy"], abs=1e-9)

    baseline = tmp_path / "a" / "checkpoints" / "global.pt"
    assert baseline.exists()
    b = toy_config(tmp_path / "b", data_dir, rounds=3, release_every=2, eval_every=1, baseline_model=str(baseline))
    run_rounds(b)
    rows_b = read_metric_lines(tmp_path / "b")
    releases = [r for r in rows_b if r.get("release")]
    assert [r["round"] for r in releases] == [2, 3]  # every 2nd round and the last
    assert all("nfr" not in r for r in rows_b if not r.get("release"))
    for r in releases:  # acc(new) - acc(baseline) = PFR - NFR
        assert r["pfr_baseline"] - r["nfr_baseline"] == pytest.approx(r["accuracy"] - rows[-1]["accuracy"], abs=1e-9)


def test_pc_runs_send_the_previous_release_as_the_teacher(tmp_path, data_dir):
    """With --pc-weight, every training message after the first release carries that release's
    trainable parameters (and none before it); the release survives in the server checkpoint."""
    from protocol import messages as rec
    from protocol.arrays import array_view

    cfg = toy_config(tmp_path / "pc", data_dir, rounds=3, release_every=1, pc_weight=1.0, noise_at="aggregate",
                     server_ema=0.0, cohort_size=4)  # the release is the iterate; q = 1: no empty round
    server, grid, arrays, _ = run_rounds(cfg)
    by_round = {}
    for m in grid.sent:
        by_round.setdefault(int(m.content["config"]["server-round"]), []).append(m)
    assert all(rec.TEACHER not in m.content.array_records for m in by_round[1])
    last = {k: array_view(v).copy() for k, v in arrays.items()}
    for t in (2, 3):
        assert by_round[t] and all(rec.TEACHER in m.content.array_records for m in by_round[t])
    teacher = by_round[3][0].content.array_records[rec.TEACHER]
    # the round-3 teacher is round 2's release, not round 3's model
    assert set(teacher.keys()) == set(last)
    assert any(not np.array_equal(array_view(teacher[k]), last[k]) for k in last)
    assert server.releases.state_dict()["last_arrays"].keys() == last.keys()
    for k in last:
        np.testing.assert_array_equal(server.releases.state_dict()["last_arrays"][k], last[k])

    plain = toy_config(tmp_path / "plain", data_dir, rounds=2, release_every=1, noise_at="aggregate")
    _, grid2, _, _ = run_rounds(plain)
    assert all(rec.TEACHER not in m.content.array_records for m in grid2.sent)  # off without --pc-weight
