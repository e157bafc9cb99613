"""The ledger names each event's mechanism and holds it as a dp-accounting DpEvent (issue 23).

* dp.accounting.dp_event_to_json / dp_event_from_json round-trip dp-accounting's events.
* A run's rows carry the mechanism's name, and composing their DpEvents with dp-accounting's own
  PLD accountant gives the epsilon the ledger records, per device and unit.
* A ledger written before these columns existed still opens (they are added, NULL), and a reader
  of such a ledger gets None for them.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from dp_accounting import dp_event
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

from dp.accounting import SubsampledGaussianEvent, dp_event_from_json, dp_event_to_json, to_dp_event
from inprocess import run_rounds, toy_config, write_lamp_data
from rundir import EventRow, Ledger, LedgerReader

pytestmark = pytest.mark.usefixtures("task_identity")
DELTA = 1e-5


def test_dp_events_round_trip_through_json():
    e = to_dp_event(SubsampledGaussianEvent(1.3, 0.25, 7))
    assert e == dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(0.25, dp_event.GaussianDpEvent(1.3)), 7)
    assert dp_event_from_json(dp_event_to_json(e)) == e
    composed = dp_event.ComposedDpEvent([e, dp_event.LaplaceDpEvent(0.5), dp_event.GaussianDpEvent(2.0)])
    assert dp_event_from_json(dp_event_to_json(composed)) == composed
    with pytest.raises(ValueError, match="not a dp-accounting event class"):
        dp_event_from_json('{"class_name": "os.system"}')
    with pytest.raises(ValueError, match="not a serialised"):
        dp_event_from_json("{not json")


def _pld(events) -> float:
    acc = PLDAccountant(value_discretization_interval=1e-3)
    for e in events:
        acc.compose(e)
    return float(acc.get_epsilon(DELTA))


@pytest.mark.parametrize("settings, name, units", [
    (dict(noise_at="aggregate", sample_rate=0.5, noise_multiplier=1.2), "aggregate", ("example",)),
    (dict(noise_at="device", noise_multiplier=1.2), "local-dpsgd", ("example",)),
    (dict(dp=False, device_dp=True, device_noise_multiplier=0.9), "dp-fedavg", ("device",)),
])
def test_run_rows_name_the_mechanism_and_compose_to_the_ledger_epsilon(tmp_path, settings, name, units):
    data = write_lamp_data(tmp_path)
    cfg = toy_config(tmp_path / "run", data, target_delta=DELTA, trainable="head", rounds=3, num_devices=4,
                     cohort_size=3, **settings)  # q = 3/4: all three rounds empty with probability 6e-8
    run_rounds(cfg)
    with LedgerReader(Path(cfg.run_dir) / "ledger.sqlite") as ledger:
        for unit in units:
            named = ledger.named_events(unit)
            eps = ledger.device_epsilons(unit)
            by_device = ledger.events_by_device(unit)
            assert named and set(named) == set(eps)
            for d, rows in named.items():
                assert {n for n, _ in rows} == {name}
                events = [dp_event_from_json(j) for _, j in rows]
                # the same events as the (sigma, q, steps) columns, in the same order
                assert events == [to_dp_event(SubsampledGaussianEvent(*e.mechanism)) for e in by_device[d]]
                assert eps[d] == pytest.approx(_pld(events), rel=1e-6), (unit, d)


def test_a_ledger_from_before_the_columns_still_opens_and_reads_none(tmp_path):
    path = tmp_path / "ledger.sqlite"
    with sqlite3.connect(path) as conn:  # the privacy_events table as it was before mechanism_name / dp_event
        conn.execute("CREATE TABLE privacy_events(id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, round INTEGER NOT NULL,"
                     " device_id INTEGER NOT NULL, unit TEXT NOT NULL, noise_multiplier REAL NOT NULL,"
                     " sample_rate REAL NOT NULL, steps INTEGER NOT NULL, max_grad_norm REAL NOT NULL,"
                     " attempt INTEGER NOT NULL DEFAULT 0, UNIQUE(run_id, round, attempt, device_id, unit))")
        conn.execute("INSERT INTO privacy_events(run_id, round, device_id, unit, noise_multiplier, sample_rate, steps,"
                     " max_grad_norm) VALUES ('r', 1, 0, 'example', 1.0, 0.5, 1, 1.0)")
    with LedgerReader(path, "r") as old:
        assert old.named_events("example") == {0: [(None, None)]}
    ledger = Ledger(path, "r")  # the writer adds the columns; the old row keeps NULLs
    ledger.commit_round(2, 1, [EventRow(0, "example", 1.0, 0.5, 1, 1.0, "aggregate", dp_event_to_json(
        to_dp_event(SubsampledGaussianEvent(1.0, 0.5, 1))))], {}, DELTA, attempt=0, complete=False)
    ledger.close()
    with LedgerReader(path, "r") as new:
        rows = new.named_events("example")[0]
        assert rows[0] == (None, None) and rows[1][0] == "aggregate"
        assert dp_event_from_json(rows[1][1]) == to_dp_event(SubsampledGaussianEvent(1.0, 0.5, 1))
