"""The privacy ledger: an append-only SQLite database in the run directory.

Every round's privacy events are written in one transaction, and that transaction commits
before the round's model is released (checkpointed or reported), so a crash never leaves the
ledger showing less privacy spent than was spent. WAL journaling with ``synchronous=FULL``
makes each commit durable.

Schema (``ledger.sqlite``)::

    runs(run_id PK, created, target_delta, accountant, selection_constant, calibration_note)
    devices(run_id, device_id, activity, sample_rate)           starting a_k and q_k
    rounds(run_id, round, completed, cohort_size)                one row per finished round
    privacy_events(id, run_id, round, device_id, unit, noise_multiplier, sample_rate, steps, max_grad_norm)
    device_epsilon(run_id, device_id, unit, round, epsilon, target_delta)   epsilon so far
    budget_events(run_id, device_id, unit, round, epsilon)       removed from selection (budget)
    example_holdings(run_id, round, device_id, uid)              continual setting: which examples
                                                                 (stable uid) a device held when it trained
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs(
    run_id TEXT PRIMARY KEY, created REAL, target_delta REAL, accountant TEXT,
    selection_constant REAL, calibration_note TEXT);
CREATE TABLE IF NOT EXISTS devices(
    run_id TEXT, device_id INTEGER, activity INTEGER, sample_rate REAL,
    PRIMARY KEY(run_id, device_id));
CREATE TABLE IF NOT EXISTS rounds(
    run_id TEXT, round INTEGER, completed REAL, cohort_size INTEGER,
    PRIMARY KEY(run_id, round));
CREATE TABLE IF NOT EXISTS privacy_events(
    id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, round INTEGER NOT NULL, device_id INTEGER NOT NULL,
    unit TEXT NOT NULL CHECK(unit IN ('example', 'device')),
    noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL, steps INTEGER NOT NULL,
    max_grad_norm REAL NOT NULL,
    UNIQUE(run_id, round, device_id, unit));
CREATE INDEX IF NOT EXISTS privacy_events_device ON privacy_events(run_id, device_id, unit);
CREATE TABLE IF NOT EXISTS device_epsilon(
    run_id TEXT, device_id INTEGER, unit TEXT, round INTEGER, epsilon REAL, target_delta REAL,
    PRIMARY KEY(run_id, device_id, unit));
CREATE TABLE IF NOT EXISTS budget_events(
    run_id TEXT, device_id INTEGER, unit TEXT, round INTEGER, epsilon REAL);
CREATE TABLE IF NOT EXISTS example_holdings(
    run_id TEXT, round INTEGER, device_id INTEGER, uid INTEGER,
    PRIMARY KEY(run_id, round, device_id, uid));
CREATE TRIGGER IF NOT EXISTS privacy_events_append_only_u BEFORE UPDATE ON privacy_events
    BEGIN SELECT RAISE(ABORT, 'privacy_events is append-only'); END;
CREATE TRIGGER IF NOT EXISTS privacy_events_append_only_d BEFORE DELETE ON privacy_events
    BEGIN SELECT RAISE(ABORT, 'privacy_events is append-only'); END;
"""


@dataclass(frozen=True)
class EventRow:
    """One privacy event: ``steps`` applications of a Poisson-subsampled Gaussian mechanism."""

    device_id: int
    unit: str  # "example" or "device"
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float


class Ledger:
    """Writer for ``ledger.sqlite`` (one per run directory).

    Parameters
    ----------
    path : pathlib.Path
        The database file (created with the schema if absent).
    run_id : str
    """

    def __init__(self, path: Path, run_id: str):
        self.path = Path(path)
        self.run_id = run_id
        self.conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(SCHEMA)

    def start_run(self, *, target_delta: float, accountant: str, selection_constant: float, calibration_note: str) -> None:
        """Record the run's fixed accounting settings (idempotent on resume)."""
        self.conn.execute(
            "INSERT OR IGNORE INTO runs VALUES (?,?,?,?,?,?)",
            (self.run_id, time.time(), target_delta, accountant, selection_constant, calibration_note),
        )

    def record_devices(self, activity: Iterable[int], sample_rate: Iterable[float]) -> None:
        """Record each device's starting activity a_k and inclusion probability q_k."""
        rows = [(self.run_id, k, int(a), float(q)) for k, (a, q) in enumerate(zip(activity, sample_rate))]
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.executemany("INSERT OR REPLACE INTO devices VALUES (?,?,?,?)", rows)

    def commit_round(
        self,
        round_: int,
        cohort_size: int,
        events: list[EventRow],
        epsilons: dict[tuple[int, str], float],
        target_delta: float,
        budget_hits: list[tuple[int, str, float]] = (),
        holdings: list[tuple[int, int]] = (),
    ) -> None:
        """Write a round's events, epsilons so far, budget hits and holdings in ONE transaction.

        Raises
        ------
        sqlite3.IntegrityError
            If the round's events were already written (a round is never counted twice).
        """
        cur = self.conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            cur.executemany(
                "INSERT INTO privacy_events(run_id, round, device_id, unit, noise_multiplier, sample_rate, steps, max_grad_norm)"
                " VALUES (?,?,?,?,?,?,?,?)",
                [
                    (self.run_id, round_, e.device_id, e.unit, e.noise_multiplier, e.sample_rate, e.steps, e.max_grad_norm)
                    for e in events
                ],
            )
            cur.executemany(
                "INSERT OR REPLACE INTO device_epsilon VALUES (?,?,?,?,?,?)",
                [(self.run_id, d, u, round_, float(eps), target_delta) for (d, u), eps in epsilons.items()],
            )
            cur.executemany(
                "INSERT INTO budget_events VALUES (?,?,?,?,?)",
                [(self.run_id, d, u, round_, float(eps)) for d, u, eps in budget_hits],
            )
            cur.executemany(
                "INSERT INTO example_holdings VALUES (?,?,?,?)",
                [(self.run_id, round_, d, u) for d, u in holdings],
            )
            cur.execute("INSERT INTO rounds VALUES (?,?,?,?)", (self.run_id, round_, time.time(), cohort_size))
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def events(self, unit: str) -> dict[int, list[tuple[float, float, int]]]:
        """Each device's events of ``unit`` in round order: device -> [(sigma, q, steps), ...]."""
        out: dict[int, list[tuple[float, float, int]]] = {}
        for d, s, q, n in self.conn.execute(
            "SELECT device_id, noise_multiplier, sample_rate, steps FROM privacy_events"
            " WHERE run_id=? AND unit=? ORDER BY round, id",
            (self.run_id, unit),
        ):
            out.setdefault(d, []).append((s, q, n))
        return out

    def last_round(self) -> int:
        """The last round whose transaction committed (0 if none)."""
        row = self.conn.execute("SELECT MAX(round) FROM rounds WHERE run_id=?", (self.run_id,)).fetchone()
        return int(row[0] or 0)

    def close(self) -> None:
        self.conn.close()
