"""The privacy ledger: an append-only SQLite database in the run directory.

Every round's privacy events are written in one transaction, and that transaction commits
before the round's model is released (checkpointed or reported), so a crash never leaves the
ledger showing less privacy spent than was spent. WAL journaling with ``synchronous=FULL``
makes each commit durable.

Schema (``ledger.sqlite``)::

    runs(run_id PK, created, target_delta, accountant, selection_constant, calibration_note)
    devices(run_id, device_id, activity, sample_rate)           starting a_k and q_k
    rounds(run_id, round, completed, cohort_size, attempt)       one row per finished (checkpointed) round
    privacy_events(id, run_id, round, device_id, unit, noise_multiplier, sample_rate, steps, max_grad_norm, attempt,
                   mechanism_name, dp_event)                     ``mechanism_name``: the mechanism that
                                                                 charged it (mechanisms/, e.g. 'aggregate');
                                                                 ``dp_event``: the dp-accounting DpEvent as
                                                                 JSON (dp.accounting.dp_event_to_json); both
                                                                 NULL in ledgers written before they existed
    lost_updates(run_id, round, attempt, device_id, reason, detail)   a device that may have trained but
                                                                 whose update was not averaged in:
                                                                 reason 'error' | 'timeout' | 'rejected'

    device_epsilon(run_id, device_id, unit, round, epsilon, target_delta)   epsilon so far
    budget_events(run_id, device_id, unit, round, epsilon)       removed from selection (budget)
    example_holdings(run_id, round, device_id, uid)              continual setting: which examples
                                                                 (stable uid) a device held when it trained
    canaries(run_id, canary_id, included, device_id, repeats, label, secret, text)
                                                                 audit canaries of a ``--canaries M`` run
                                                                 (created only by :func:`record_canaries`)
    holdout_releases(run_id, round, attempt, noise_multiplier, noise_at, devices, examples)
                                                                 a holdout evaluation (--holdout-per-device):
                                                                 one Gaussian mechanism (sensitivity 1) on
                                                                 every holdout example, written before
                                                                 the evaluation messages leave
    deletions(run_id, device_id, round, recorded, first_joined)  a deletion request (--deletions): from
                                                                 ``round`` on the device is never selected;
                                                                 ``first_joined``: its first round with an event
    lineage(run_id, parent_run_id, parent_dir, from_round, removed_devices, created)
                                                                 a run made by ``dpfl retrain``: rounds
                                                                 1..from_round-1 are the parent's, retrained
                                                                 from there without ``removed_devices`` (JSON)
    replaced_events(run_id, round, attempt, device_id, unit, noise_multiplier, sample_rate, steps, max_grad_norm)
                                                                 a retrained run's copy of the parent's events
                                                                 of the rounds it replaces (not composed into
                                                                 its guarantee, which assumes those models are
                                                                 withdrawn; the report gives both)

Units: epsilons in nats at the stated ``target_delta``; ``sample_rate`` is a probability;
``max_grad_norm`` in the gradient's (or update's, device level) L2 norm; ``completed`` and
``created`` are Unix times in seconds.

Write order of one round (server/app.py): (1) before the training messages leave, ONE
transaction with the example-level event of every device in the cohort (the mechanism the
server asks it to run), the device-level events, epsilons so far, budget hits and holdings:
so a device can never have trained without its event being in the ledger, whatever happens
next (failure, timeout, rejected update, crash); (2) the lost updates of the round; (3) the
checkpoint (:meth:`rundir.RunDir.save_checkpoint`); (4) the ``rounds`` row (:meth:`Ledger.complete_round`); (5)
the metrics line (rundir/layout.py and rundir/metrics.py). ``attempt`` numbers the server sessions of a run (0, then one more per
``--resume``): a round that crashed after (1) keeps its events (privacy was spent) and its
re-run after a resume writes its own under the next attempt, so both are composed.

Writers: :class:`Ledger` (the server; one per run directory) and :func:`record_canaries`.
Readers: :class:`LedgerReader` (read-only; safe beside a running server).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from ._files import LEDGER_FILE

__all__ = [
    "SCHEMA", "CANARIES_SCHEMA", "EventRow", "Ledger", "LedgerError", "LedgerReader", "record_canaries",
    "RunRow", "DeviceRow", "RoundRow", "PrivacyEvent", "LostUpdate", "BudgetEvent", "Holding", "CanaryRow",
    "HoldoutRelease", "Deletion", "Lineage",
]


class LedgerError(ValueError):
    """The ledger cannot be opened or read (message names the file and the SQLite error)."""

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
    max_grad_norm REAL NOT NULL, attempt INTEGER NOT NULL DEFAULT 0, mechanism_name TEXT, dp_event TEXT,
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
CREATE TABLE IF NOT EXISTS holdout_releases(
    run_id TEXT, round INTEGER, attempt INTEGER, noise_multiplier REAL, noise_at TEXT, devices INTEGER,
    examples INTEGER, PRIMARY KEY(run_id, round, attempt));
CREATE TABLE IF NOT EXISTS deletions(
    run_id TEXT, device_id INTEGER, round INTEGER, recorded REAL, first_joined INTEGER,
    PRIMARY KEY(run_id, device_id));
CREATE TABLE IF NOT EXISTS replaced_events(
    run_id TEXT, round INTEGER, attempt INTEGER, device_id INTEGER, unit TEXT, noise_multiplier REAL,
    sample_rate REAL, steps INTEGER, max_grad_norm REAL);
CREATE TABLE IF NOT EXISTS lineage(
    run_id TEXT PRIMARY KEY, parent_run_id TEXT, parent_dir TEXT, from_round INTEGER, removed_devices TEXT,
    created REAL);
CREATE TRIGGER IF NOT EXISTS privacy_events_append_only_u BEFORE UPDATE ON privacy_events
    BEGIN SELECT RAISE(ABORT, 'privacy_events is append-only'); END;
CREATE TRIGGER IF NOT EXISTS privacy_events_append_only_d BEFORE DELETE ON privacy_events
    BEGIN SELECT RAISE(ABORT, 'privacy_events is append-only'); END;
"""

#: The ``canaries`` table: created by :func:`record_canaries` only (a run without canaries has none).
CANARIES_SCHEMA = """
CREATE TABLE IF NOT EXISTS canaries(
    run_id TEXT NOT NULL, canary_id INTEGER NOT NULL, included INTEGER NOT NULL,
    device_id INTEGER, repeats INTEGER NOT NULL, label TEXT, secret TEXT, text TEXT,
    PRIMARY KEY(run_id, canary_id));
"""


@dataclass(frozen=True)
class EventRow:
    """One privacy event the server writes: ``steps`` applications of a Poisson-subsampled Gaussian mechanism.

    ``noise_multiplier`` is sigma (noise std / ``max_grad_norm``), ``sample_rate`` the Poisson
    rate q (per example at example level, the device's q_k at device level), ``max_grad_norm``
    the clipping norm C (or S, device level). ``mechanism_name`` names the mechanism that
    charged it and ``dp_event`` is its dp-accounting ``DpEvent`` as JSON
    (:func:`dp.accounting.dp_event_to_json`), so a reader can compose it with any accountant.
    """

    device_id: int
    unit: str  # "example" or "device"
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    mechanism_name: str | None = None
    dp_event: str | None = None


class Ledger:
    """Writer for ``ledger.sqlite`` (one per run directory).

    Parameters
    ----------
    path : pathlib.Path
        The database file (created with the schema if absent).
    run_id : str
        The run's id; every row written carries it.

    Raises
    ------
    sqlite3.Error
        If the file cannot be opened or created.
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
        cols = {r[1] for r in self.conn.execute("PRAGMA table_info(privacy_events)")}
        for col in ("mechanism_name", "dp_event"):  # ledgers written before events named their mechanism
            if col not in cols:
                self.conn.execute(f"ALTER TABLE privacy_events ADD COLUMN {col} TEXT")

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
                " max_grad_norm, attempt, mechanism_name, dp_event) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                [
                    (self.run_id, round_, e.device_id, e.unit, e.noise_multiplier, e.sample_rate, e.steps, e.max_grad_norm, attempt,
                     e.mechanism_name, e.dp_event)
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
        """The attempt number of a new server session: one more than any attempt with events, rounds or
        holdout releases (0 for a new run). A session that only redoes the holdout evaluation writes
        no event and no round, so without its holdout row the next session would reuse its number
        and its release would replace the earlier one's row: an under-counted release."""
        rows = [self.conn.execute(f"SELECT MAX(attempt) FROM {table} WHERE run_id=?", (self.run_id,)).fetchone()
                for table in ("privacy_events", "rounds", "holdout_releases")]
        known = [int(r[0]) for r in rows if r[0] is not None]
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

    def events(self, unit: str) -> dict[int, list[tuple[float, float, int] | str]]:
        """Each device's events of ``unit`` in composition order: device -> [event, ...], each the
        row's serialised dp-accounting event (JSON, :func:`dp.accounting.dp_event_from_json`) when
        it has one, else its ``(sigma, q, steps)`` (rows of ledgers from before the column)."""
        out: dict[int, list[tuple[float, float, int] | str]] = {}
        for d, s, q, n, ev in self.conn.execute(
            "SELECT device_id, noise_multiplier, sample_rate, steps, dp_event FROM privacy_events"
            " WHERE run_id=? AND unit=? ORDER BY round, attempt, id",
            (self.run_id, unit),
        ):
            out.setdefault(d, []).append(ev if ev is not None else (s, q, n))
        return out

    def record_holdout(self, round_: int, attempt: int, noise_multiplier: float, noise_at: str, devices: int,
                       examples: int) -> None:
        """Record a holdout evaluation (before its messages leave): every holdout example is read
        once by a Gaussian mechanism of noise multiplier ``noise_multiplier`` (std over its L2
        sensitivity: sigma_h for the count alone, sigma_h / sqrt(2) with the out-of-scope
        histogram, server/holdout.py); ``noise_at`` is ``"device"``, ``"aggregate"`` or ``"none"``
        (a non-private run)."""
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.execute("INSERT OR REPLACE INTO holdout_releases VALUES (?,?,?,?,?,?,?)",
                              (self.run_id, round_, attempt, float(noise_multiplier), noise_at, int(devices), int(examples)))

    def holdout_release_count(self) -> int:
        """How many holdout evaluations are on record (every attempt)."""
        return int(self.conn.execute("SELECT COUNT(*) FROM holdout_releases WHERE run_id=?", (self.run_id,)).fetchone()[0])

    def record_deletions(self, requests: Iterable[tuple[int, int, int | None]]) -> None:
        """Record deletion requests ``(device_id, round, first_joined)`` (idempotent: a device's first request stands)."""
        rows = [(self.run_id, int(d), int(t), time.time(), None if j is None else int(j)) for d, t, j in requests]
        if not rows:
            return
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.executemany("INSERT OR IGNORE INTO deletions VALUES (?,?,?,?,?)", rows)

    def record_lineage(self, parent_run_id: str, parent_dir: str, from_round: int, removed_devices: list[int]) -> None:
        """Record that this run retrains ``parent_run_id`` from round ``from_round`` without ``removed_devices``."""
        import json

        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.execute("INSERT OR IGNORE INTO lineage VALUES (?,?,?,?,?,?)",
                              (self.run_id, parent_run_id, parent_dir, int(from_round),
                               json.dumps(sorted(int(d) for d in removed_devices)), time.time()))

    def copy_rounds_from(self, parent: Path, parent_run_id: str, last_round: int) -> None:
        """Copy into this ledger, under this run's id (for ``dpfl retrain``): the parent run's devices,
        and its privacy events, budget hits, holdings, lost updates and completed rounds of rounds
        1..``last_round`` (the rounds the retrain keeps: their models were released and are part of
        this run); the parent's events of later rounds go to ``replaced_events`` (the models this
        run replaces, accounted apart)."""
        self.conn.execute("ATTACH DATABASE ? AS parent", (f"file:{Path(parent)}?mode=ro",))
        try:
            with self.conn:
                self.conn.execute("BEGIN")
                p = (self.run_id, parent_run_id)
                self.conn.execute("INSERT OR REPLACE INTO devices SELECT ?, device_id, activity, sample_rate "
                                  "FROM parent.devices WHERE run_id=?", p)
                named = {r[1] for r in self.conn.execute("PRAGMA parent.table_info(privacy_events)")} >= {"mechanism_name", "dp_event"}
                extra = ", mechanism_name, dp_event" if named else ""
                self.conn.execute("INSERT INTO privacy_events(run_id, round, device_id, unit, noise_multiplier, sample_rate,"
                                  f" steps, max_grad_norm, attempt{extra}) SELECT ?, round, device_id, unit, noise_multiplier,"
                                  f" sample_rate, steps, max_grad_norm, attempt{extra} FROM parent.privacy_events"
                                  " WHERE run_id=? AND round<=? ORDER BY id", (*p, last_round))
                self.conn.execute("INSERT INTO replaced_events SELECT ?, round, attempt, device_id, unit, noise_multiplier,"
                                  " sample_rate, steps, max_grad_norm FROM parent.privacy_events"
                                  " WHERE run_id=? AND round>? ORDER BY id", (*p, last_round))
                if self.conn.execute("SELECT 1 FROM parent.sqlite_master WHERE name='replaced_events'").fetchone():
                    self.conn.execute("INSERT INTO replaced_events SELECT ?, round, attempt, device_id, unit,"
                                      " noise_multiplier, sample_rate, steps, max_grad_norm FROM parent.replaced_events"
                                      " WHERE run_id=? ORDER BY rowid", p)  # a retrain of a retrain: its own parent's too
                self.conn.execute("INSERT OR REPLACE INTO budget_events SELECT ?, device_id, unit, round, epsilon"
                                  " FROM parent.budget_events WHERE run_id=? AND round<=?", (*p, last_round))
                self.conn.execute("INSERT OR REPLACE INTO example_holdings SELECT ?, round, device_id, uid"
                                  " FROM parent.example_holdings WHERE run_id=? AND round<=?", (*p, last_round))
                self.conn.execute("INSERT OR REPLACE INTO lost_updates SELECT ?, round, attempt, device_id, reason, detail"
                                  " FROM parent.lost_updates WHERE run_id=? AND round<=?", (*p, last_round))
                self.conn.execute("INSERT OR REPLACE INTO rounds SELECT ?, round, completed, cohort_size, attempt"
                                  " FROM parent.rounds WHERE run_id=? AND round<=?", (*p, last_round))
        finally:
            self.conn.execute("DETACH DATABASE parent")

    def first_joined(self, devices: Iterable[int]) -> dict[int, int]:
        """device -> the first round with a privacy event of any unit (devices that never joined are absent)."""
        out = {}
        for d in devices:
            row = self.conn.execute("SELECT MIN(round) FROM privacy_events WHERE run_id=? AND device_id=?",
                                    (self.run_id, int(d))).fetchone()
            if row[0] is not None:
                out[int(d)] = int(row[0])
        return out

    def deletions(self) -> dict[int, int]:
        """device_id -> the round from which it is deleted (``deletions`` table)."""
        return {int(d): int(t) for d, t in self.conn.execute("SELECT device_id, round FROM deletions WHERE run_id=?",
                                                               (self.run_id,))}

    def last_round(self) -> int:
        """The last round marked complete (0 if none)."""
        row = self.conn.execute("SELECT MAX(round) FROM rounds WHERE run_id=?", (self.run_id,)).fetchone()
        return int(row[0] or 0)

    def close(self) -> None:
        """Close the connection (every write is already committed)."""
        self.conn.close()


# ----------------------------------------------------------------------------- canaries


def record_canaries(ledger_path: str | Path, run_id: str, entries: Iterable[Mapping[str, Any]]) -> int:
    """Mark the run's canaries (and which were included) in the ledger's ``canaries`` table.

    Opens the SQLite file itself (its own connection, one transaction); rows already present
    are kept (``INSERT OR IGNORE``), so calling it again on resume changes nothing.

    Parameters
    ----------
    ledger_path : path
        ``RUN_DIR/ledger.sqlite`` (created if absent).
    run_id : str
    entries : iterable of mapping
        One per canary: ``canary_id``, ``included``, ``repeats`` (default 1) and optionally
        ``device_id``, ``label``, ``secret``, ``text`` (the ``canaries.json`` entries).

    Returns
    -------
    int
        Number of canaries given (0 writes nothing, not even the table).

    Raises
    ------
    KeyError
        If an entry lacks ``canary_id`` or ``included``.
    sqlite3.Error
        If the database cannot be written.
    """
    rows = [
        (str(run_id), int(e["canary_id"]), int(bool(e["included"])),
         None if e.get("device_id") is None else int(e["device_id"]), int(e.get("repeats", 1)),
         None if e.get("label") is None else str(e["label"]), e.get("secret"), e.get("text"))
        for e in entries
    ]
    if not rows:
        return 0
    conn = sqlite3.connect(str(ledger_path), timeout=30.0, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout=30000")
        conn.executescript(CANARIES_SCHEMA)
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT OR IGNORE INTO canaries VALUES (?,?,?,?,?,?,?,?)", rows)
        conn.execute("COMMIT")
    finally:
        conn.close()
    return len(rows)


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class RunRow:
    """The ``runs`` row: the run's fixed accounting settings (``created``: Unix seconds)."""

    run_id: str
    created: float | None
    target_delta: float | None
    accountant: str | None
    selection_constant: float | None
    calibration_note: str | None


@dataclass(frozen=True)
class DeviceRow:
    """A ``devices`` row: device ``device_id``'s starting activity a_k (examples) and inclusion probability q_k."""

    device_id: int
    activity: int | None
    sample_rate: float | None


@dataclass(frozen=True)
class RoundRow:
    """A ``rounds`` row: a finished (checkpointed) round, its cohort size and the attempt that finished it."""

    round: int
    completed: float | None
    cohort_size: int | None
    attempt: int


@dataclass(frozen=True)
class PrivacyEvent:
    """A ``privacy_events`` row as read back: an :class:`EventRow` with its round and attempt.

    ``id`` is the row's insertion order. ``max_grad_norm`` may be None in hand-made ledgers.
    """

    id: int
    round: int
    attempt: int
    device_id: int
    unit: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float | None

    @property
    def mechanism(self) -> tuple[float, float, int]:
        """(noise_multiplier, sample_rate, steps): what an accountant composes."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class LostUpdate:
    """A ``lost_updates`` row: a device asked to train whose update was not averaged in.

    ``reason`` is ``'error'``, ``'timeout'`` or ``'rejected'``; ``detail`` at most 300 characters.
    """

    round: int
    attempt: int
    device_id: int
    reason: str
    detail: str | None


@dataclass(frozen=True)
class BudgetEvent:
    """A ``budget_events`` row: device removed from selection in ``round`` at ``epsilon`` (nats) of ``unit``."""

    device_id: int
    unit: str
    round: int
    epsilon: float | None


@dataclass(frozen=True)
class Holding:
    """An ``example_holdings`` row: device ``device_id`` held example ``uid`` when it trained in ``round``."""

    round: int
    device_id: int
    uid: int


@dataclass(frozen=True)
class CanaryRow:
    """A ``canaries`` row (see :func:`record_canaries`)."""

    canary_id: int
    included: bool
    device_id: int | None
    repeats: int
    label: str | None
    secret: str | None
    text: str | None


@dataclass(frozen=True)
class HoldoutRelease:
    """A ``holdout_releases`` row: one Gaussian mechanism (noise multiplier ``noise_multiplier``: std over
    L2 sensitivity) on every holdout example, after round ``round``; ``noise_at`` ``"device"``,
    ``"aggregate"`` or ``"none"``."""

    round: int
    attempt: int
    noise_multiplier: float
    noise_at: str
    devices: int
    examples: int


@dataclass(frozen=True)
class Deletion:
    """A ``deletions`` row: ``device_id``'s data is gone from round ``round`` on; ``first_joined`` is the
    first round it had a privacy event (None if it never joined before the request)."""

    device_id: int
    round: int
    first_joined: int | None


@dataclass(frozen=True)
class Lineage:
    """A ``lineage`` row: this run retrains ``parent_run_id`` (in ``parent_dir``) from round ``from_round``
    on without ``removed_devices``."""

    parent_run_id: str
    parent_dir: str
    from_round: int
    removed_devices: tuple


class LedgerReader:
    """Read-only view of ``ledger.sqlite``; safe while the server writes (WAL, ``mode=ro``).

    Every method returns what is committed at the time of the call (a round being written by
    the server in an open transaction is not seen). Ledgers written by older versions (no
    ``attempt`` column, no ``lost_updates`` / ``example_holdings`` / ``canaries`` table) read
    as attempt 0 and empty tables.

    Parameters
    ----------
    path : path
        The ledger file (``RUN_DIR/ledger.sqlite``), or the run directory holding it.
    run_id : str, optional
        Read only this run's rows (a ledger normally holds one run); None reads every row.

    Raises
    ------
    LedgerError
        If the file does not exist or cannot be opened read-only (here), or a query fails
        (from any method).

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: str | Path, run_id: str | None = None):
        p = Path(path)
        if p.is_dir():
            p = p / LEDGER_FILE
        self.path = p
        self.run_id = run_id
        if not p.exists():
            raise LedgerError(f"cannot open {p} read-only: no such file")
        try:
            self.conn = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
            self.conn.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open {p} read-only: {exc}") from exc

    def __enter__(self) -> "LedgerReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the read-only connection."""
        self.conn.close()

    # -- helpers
    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        try:
            return self.conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot read {self.path}: {exc}") from exc

    def _columns(self, table: str) -> set[str]:
        return {r[1] for r in self._query(f"PRAGMA table_info({table})")}

    def has_table(self, table: str) -> bool:
        """Whether the ledger has ``table`` (older ledgers lack some)."""
        return bool(self._query("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)))

    def _where(self, **filters: Any) -> tuple[str, tuple]:
        conds, params = [], []
        if self.run_id is not None:
            conds.append("run_id=?")
            params.append(self.run_id)
        for col, val in filters.items():
            if val is not None:
                conds.append(f"{col}=?")
                params.append(val)
        return (" WHERE " + " AND ".join(conds)) if conds else "", tuple(params)

    # -- tables
    def runs(self) -> list[RunRow]:
        """Every ``runs`` row (all runs in the file, whatever ``run_id`` was given), in insertion order."""
        return [RunRow(*r) for r in self._query(
            "SELECT run_id, created, target_delta, accountant, selection_constant, calibration_note FROM runs")]

    def devices(self) -> dict[int, DeviceRow]:
        """device_id -> its ``devices`` row (starting activity a_k, inclusion probability q_k), by device id."""
        where, params = self._where()
        return {int(d): DeviceRow(int(d), a, q) for d, a, q in self._query(
            f"SELECT device_id, activity, sample_rate FROM devices{where} ORDER BY device_id", params)}

    def rounds(self) -> list[RoundRow]:
        """The finished rounds, by round."""
        att = "attempt" if "attempt" in self._columns("rounds") else "0"
        where, params = self._where()
        return [RoundRow(int(t), c, n, int(a or 0)) for t, c, n, a in self._query(
            f"SELECT round, completed, cohort_size, {att} FROM rounds{where} ORDER BY round", params)]

    def events(self, unit: str | None = None, *, round: int | None = None, device_id: int | None = None,
               attempt: int | None = None) -> list[PrivacyEvent]:
        """Privacy events (every unit when ``unit`` is None), optionally of one round / device / attempt.

        Ordered by round, then attempt, then insertion (the order the server composes them).
        """
        has_att = "attempt" in self._columns("privacy_events")
        if attempt is not None and not has_att:
            return [] if attempt != 0 else self.events(unit, round=round, device_id=device_id)
        where, params = self._where(unit=unit, round=round, device_id=device_id,
                                    attempt=attempt if has_att else None)
        att = "attempt" if has_att else "0"
        order = "round, attempt, id" if has_att else "round, id"
        return [PrivacyEvent(int(i), int(t), int(a or 0), int(d), u, float(s), float(q), int(n), c)
                for i, t, a, d, u, s, q, n, c in self._query(
                    f"SELECT id, round, {att}, device_id, unit, noise_multiplier, sample_rate, steps, max_grad_norm"
                    f" FROM privacy_events{where} ORDER BY {order}", params)]

    def named_events(self, unit: str) -> dict[int, list[tuple[str | None, str | None]]]:
        """device_id -> its events of ``unit`` in composition order as (mechanism_name, dp_event JSON);
        both None for rows of ledgers written before events named their mechanism."""
        cols = self._columns("privacy_events")
        if not {"mechanism_name", "dp_event"} <= cols:
            return {d: [(None, None)] * len(evs) for d, evs in self.events_by_device(unit).items()}
        order = "round, attempt, id" if "attempt" in cols else "round, id"
        out: dict[int, list[tuple[str | None, str | None]]] = {}
        where, params = self._where(unit=unit)
        for d, name, ev in self._query(f"SELECT device_id, mechanism_name, dp_event FROM privacy_events{where}"
                                       f" ORDER BY {order}", params):
            out.setdefault(int(d), []).append((name, ev))
        return out

    def events_by_device(self, unit: str) -> dict[int, list[PrivacyEvent]]:
        """device_id -> its events of ``unit`` in composition order (see :meth:`events`)."""
        out: dict[int, list[PrivacyEvent]] = {}
        for e in self.events(unit):
            out.setdefault(e.device_id, []).append(e)
        return out

    def trained_devices(self, unit: str = "example") -> list[int]:
        """Sorted ids of the devices with at least one event of ``unit`` (asked to train at least once)."""
        where, params = self._where(unit=unit)
        return sorted(int(d) for (d,) in self._query(f"SELECT DISTINCT device_id FROM privacy_events{where}", params))

    def device_epsilons(self, unit: str) -> dict[int, float]:
        """device_id -> the server's cached epsilon so far of ``unit`` (nats; ``device_epsilon`` table).

        Rows with a NULL epsilon are left out. The report recomputes epsilons from :meth:`events`.
        """
        where, params = self._where(unit=unit)
        return {int(d): float(e) for d, e in self._query(
            f"SELECT device_id, epsilon FROM device_epsilon{where}", params) if e is not None}

    def budget_events(self, unit: str | None = None) -> list[BudgetEvent]:
        """Devices removed from selection for their budget, by round then device."""
        where, params = self._where(unit=unit)
        return [BudgetEvent(int(d), u, int(t), e) for d, u, t, e in self._query(
            f"SELECT device_id, unit, round, epsilon FROM budget_events{where} ORDER BY round, device_id", params)]

    def lost_updates(self, round: int | None = None) -> list[LostUpdate]:
        """Lost updates (optionally of one round), by round, attempt, device; [] for older ledgers."""
        if not self.has_table("lost_updates"):
            return []
        where, params = self._where(round=round)
        return [LostUpdate(int(t), int(a), int(d), r, det) for t, a, d, r, det in self._query(
            f"SELECT round, attempt, device_id, reason, detail FROM lost_updates{where}"
            " ORDER BY round, attempt, device_id", params)]

    def holdings(self) -> list[Holding]:
        """Every ``example_holdings`` row (continual setting); [] when the table is absent or empty."""
        if not self.has_table("example_holdings"):
            return []
        where, params = self._where()
        return [Holding(int(t), int(d), int(u)) for t, d, u in self._query(
            f"SELECT round, device_id, uid FROM example_holdings{where}", params)]

    def holdout_releases(self) -> list[HoldoutRelease]:
        """Every holdout evaluation on record, by round and attempt; [] when there is none."""
        if not self.has_table("holdout_releases"):
            return []
        where, params = self._where()
        return [HoldoutRelease(int(t), int(a), float(s), str(p), int(d), int(n)) for t, a, s, p, d, n in self._query(
            f"SELECT round, attempt, noise_multiplier, noise_at, devices, examples FROM holdout_releases{where}"
            " ORDER BY round, attempt", params)]

    def replaced_events(self) -> list[PrivacyEvent]:
        """A retrained run's copy of its parent's events of the replaced rounds (``id`` is their order); [] otherwise."""
        if not self.has_table("replaced_events"):
            return []
        where, params = self._where()
        return [PrivacyEvent(i, int(t), int(a), int(d), u, float(s), float(q), int(n), m)
                for i, (t, a, d, u, s, q, n, m) in enumerate(self._query(
                    f"SELECT round, attempt, device_id, unit, noise_multiplier, sample_rate, steps, max_grad_norm"
                    f" FROM replaced_events{where} ORDER BY rowid", params))]

    def deletions(self) -> list[Deletion]:
        """Deletion requests on record, by round and device; [] when there is none."""
        if not self.has_table("deletions"):
            return []
        where, params = self._where()
        return [Deletion(int(d), int(t), None if j is None else int(j)) for d, t, j in self._query(
            f"SELECT device_id, round, first_joined FROM deletions{where} ORDER BY round, device_id", params)]

    def lineage(self) -> Lineage | None:
        """The run's ``dpfl retrain`` origin, or None for a run trained from scratch."""
        import json

        if not self.has_table("lineage"):
            return None
        where, params = self._where()
        rows = self._query(f"SELECT parent_run_id, parent_dir, from_round, removed_devices FROM lineage{where}", params)
        if not rows:
            return None
        pid, pdir, t, removed = rows[0]
        return Lineage(str(pid), str(pdir), int(t), tuple(int(d) for d in json.loads(removed or "[]")))

    def canaries(self) -> list[CanaryRow]:
        """The audit canaries on record, by canary id; [] when the run inserted none."""
        if not self.has_table("canaries"):
            return []
        where, params = self._where()
        return [CanaryRow(int(i), bool(inc), None if d is None else int(d), int(r), lab, sec, txt)
                for i, inc, d, r, lab, sec, txt in self._query(
                    f"SELECT canary_id, included, device_id, repeats, label, secret, text FROM canaries{where}"
                    " ORDER BY canary_id", params)]
