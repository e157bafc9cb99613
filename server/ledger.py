"""The privacy ledger: an append-only SQLite database in the run directory.

Every round's privacy events are written in one transaction, and that transaction commits
before the round's model is released (checkpointed or reported), so a crash never leaves the
ledger showing less privacy spent than was spent. WAL journaling with ``synchronous=FULL``
makes each commit durable.

Schema (``ledger.sqlite``)::

    runs(run_id PK, created, target_delta, accountant, selection_constant, calibration_note)
    devices(run_id, device_id, activity, sample_rate)           starting a_k and q_k
    rounds(run_id, round, completed, cohort_size, attempt)       one row per finished (checkpointed) round
    privacy_events(id, run_id, round, device_id, unit, noise_multiplier, sample_rate, steps, max_grad_norm, attempt)
    lost_updates(run_id, round, attempt, device_id, reason, detail)   a device that may have trained but
                                                                 whose update was not averaged in:
                                                                 reason 'error' | 'timeout' | 'rejected'

    device_epsilon(run_id, device_id, unit, round, epsilon, target_delta)   epsilon so far
    budget_events(run_id, device_id, unit, round, epsilon)       removed from selection (budget)
    example_holdings(run_id, round, device_id, uid)              continual setting: which examples
                                                                 (stable uid) a device held when it trained

Write order of one round (server/app.py): (1) before the training messages leave, ONE
transaction with the example-level event of every device in the cohort (the mechanism the
server asks it to run), the device-level events, epsilons so far, budget hits and holdings:
so a device can never have trained without its event being in the ledger, whatever happens
next (failure, timeout, rejected update, crash); (2) the lost updates of the round; (3) the
checkpoint (server/rundir.py); (4) the ``rounds`` row (:meth:`Ledger.complete_round`); (5)
the metrics line. ``attempt`` numbers the server sessions of a run (0, then one more per
``--resume``): a round that crashed after (1) keeps its events (privacy was spent) and its
re-run after a resume writes its own under the next attempt, so both are composed.
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
    run_id TEXT, round INTEGER, completed REAL, cohort_size INTEGER, attempt INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY(run_id, round));
CREATE TABLE IF NOT EXISTS privacy_events(
    id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, round INTEGER NOT NULL, device_id INTEGER NOT NULL,
    unit TEXT NOT NULL CHECK(unit IN ('example', 'device')),
    noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL, steps INTEGER NOT NULL,
    max_grad_norm REAL NOT NULL, attempt INTEGER NOT NULL DEFAULT 0,
    UNIQUE(run_id, round, attempt, device_id, unit));
CREATE INDEX IF NOT EXISTS privacy_events_device ON privacy_events(run_id, device_id, unit);
CREATE TABLE IF NOT EXISTS device_epsilon(
    run_id TEXT, device_id INTEGER, unit TEXT, round INTEGER, epsilon REAL, target_delta REAL,
    PRIMARY KEY(run_id, device_id, unit));
CREATE TABLE IF NOT EXISTS budget_events(
    run_id TEXT, device_id INTEGER, unit TEXT, round INTEGER, epsilon REAL);
CREATE TABLE IF NOT EXISTS example_holdings(
    run_id TEXT, round INTEGER, device_id INTEGER, uid INTEGER,
    PRIMARY KEY(run_id, round, device_id, uid));
CREATE TABLE IF NOT EXISTS lost_updates(
    run_id TEXT, round INTEGER, attempt INTEGER, device_id INTEGER, reason TEXT, detail TEXT,
    PRIMARY KEY(run_id, round, attempt, device_id));
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
        for table in ("privacy_events", "rounds"):  # ledgers written before `attempt` existed
            cols = {r[1] for r in self.conn.execute(f"PRAGMA table_info({table})")}
            if "attempt" not in cols:
                self.conn.execute(f"ALTER TABLE {table} ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0")

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
        attempt: int = 0,
        complete: bool = True,
    ) -> None:
        """Write a round's events, epsilons so far, budget hits and holdings in ONE transaction.

        The server calls it with ``complete=False`` before the round's messages leave (the
        ``rounds`` row is written by :meth:`complete_round` once the round is checkpointed);
        ``complete=True`` also writes the ``rounds`` row in the same transaction.

        Raises
        ------
        sqlite3.IntegrityError
            If the round's events of this attempt were already written (never counted twice).
        """
        cur = self.conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            cur.executemany(
                "INSERT INTO privacy_events(run_id, round, device_id, unit, noise_multiplier, sample_rate, steps,"
                " max_grad_norm, attempt) VALUES (?,?,?,?,?,?,?,?,?)",
                [
                    (self.run_id, round_, e.device_id, e.unit, e.noise_multiplier, e.sample_rate, e.steps, e.max_grad_norm, attempt)
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
                "INSERT OR IGNORE INTO example_holdings VALUES (?,?,?,?)",
                [(self.run_id, round_, d, u) for d, u in holdings],
            )
            if complete:
                cur.execute("INSERT INTO rounds VALUES (?,?,?,?,?)", (self.run_id, round_, time.time(), cohort_size, attempt))
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def record_lost(self, round_: int, attempt: int, lost: list[tuple[int, str, str]]) -> None:
        """Record devices of the round whose update was not averaged in: (device, reason, detail).

        Their privacy events were written before the round's messages left (they may have trained).
        """
        if not lost:
            return
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.executemany(
                "INSERT OR REPLACE INTO lost_updates VALUES (?,?,?,?,?,?)",
                [(self.run_id, round_, attempt, int(d), reason, detail[:300]) for d, reason, detail in lost],
            )

    def complete_round(self, round_: int, cohort_size: int, attempt: int) -> None:
        """Mark ``round_`` finished (after its checkpoint is on disk); idempotent."""
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.execute(
                "INSERT OR IGNORE INTO rounds VALUES (?,?,?,?,?)", (self.run_id, round_, time.time(), cohort_size, attempt)
            )

    def next_attempt(self) -> int:
        """The attempt number of a new server session: one more than any attempt with events (0 for a new run)."""
        row = self.conn.execute("SELECT MAX(attempt) FROM privacy_events WHERE run_id=?", (self.run_id,)).fetchone()
        row2 = self.conn.execute("SELECT MAX(attempt) FROM rounds WHERE run_id=?", (self.run_id,)).fetchone()
        known = [int(r[0]) for r in (row, row2) if r[0] is not None]
        return max(known) + 1 if known else 0

    def exhausted(self) -> dict[int, tuple[str, float]]:
        """Devices removed from selection for their budget (from ``budget_events``)."""
        return {
            int(d): (u, float(e))
            for d, u, e in self.conn.execute("SELECT device_id, unit, epsilon FROM budget_events WHERE run_id=?", (self.run_id,))
        }

    def epsilons(self, unit: str) -> dict[int, float]:
        """Each device's latest recorded epsilon of ``unit``."""
        return {
            int(d): float(e)
            for d, e in self.conn.execute("SELECT device_id, epsilon FROM device_epsilon WHERE run_id=? AND unit=?", (self.run_id, unit))
        }

    def events(self, unit: str) -> dict[int, list[tuple[float, float, int]]]:
        """Each device's events of ``unit`` in round order: device -> [(sigma, q, steps), ...]."""
        out: dict[int, list[tuple[float, float, int]]] = {}
        for d, s, q, n in self.conn.execute(
            "SELECT device_id, noise_multiplier, sample_rate, steps FROM privacy_events"
            " WHERE run_id=? AND unit=? ORDER BY round, attempt, id",
            (self.run_id, unit),
        ):
            out.setdefault(d, []).append((s, q, n))
        return out

    def last_round(self) -> int:
        """The last round marked complete (0 if none)."""
        row = self.conn.execute("SELECT MAX(round) FROM rounds WHERE run_id=?", (self.run_id,)).fetchone()
        return int(row[0] or 0)

    def close(self) -> None:
        self.conn.close()
