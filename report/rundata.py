"""Read a run directory for the privacy budget report: config.toml, metrics.jsonl, the ledger
(read-only, so a run still in progress can be reported on), holdout.json, oos.json and audit/audit.json.

Everything is read once into :class:`RunData`; nothing here computes an epsilon.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rundir import LedgerError, LedgerReader, RecordError, config_path, is_run_dir, ledger_path, read_metrics
from rundir import read_holdout, read_oos
from rundir import read_audit as read_audit_record
from rundir.records import audit_path

#: The two privacy units, in the order the report states them.
UNITS = ("example", "device")


class ReportError(ValueError):
    """The run directory cannot be reported on (message says why)."""


@dataclass
class RunData:
    """Everything read from one run directory."""

    run_dir: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    metrics_skipped: int
    run_row: dict[str, Any] | None
    devices: dict[int, dict[str, Any]]  # device_id -> {"activity", "sample_rate"}
    rounds: list[dict[str, Any]]
    # unit -> device_id -> [(round, sigma, q, steps, max_grad_norm)]
    events: dict[str, dict[int, list[tuple[int, float, float, int, float]]]]
    ledger_epsilon: dict[str, dict[int, float]]
    budget_events: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)
    # continual setting: (round, device_id, uid) for every example a training device held
    holdings: list[tuple[int, int, int]] = field(default_factory=list)
    audit: dict[str, Any] | None = None  # RUN_DIR/audit/audit.json when present
    holdout: dict[str, Any] | None = None  # RUN_DIR/holdout.json (--holdout-per-device)
    holdout_releases: list[dict[str, Any]] = field(default_factory=list)  # ledger rows
    oos: dict[str, Any] | None = None  # RUN_DIR/oos.json (--oos-label / --oos-holdout-intents)
    deletions: list[dict[str, Any]] = field(default_factory=list)  # ledger rows (--deletions)
    lineage: dict[str, Any] | None = None  # a `dpfl retrain` run's origin
    # a retrained run: unit -> device -> the parent's (sigma, q, steps) of the rounds it replaced
    replaced: dict[str, dict[int, list[tuple[float, float, int]]]] = field(default_factory=dict)
    # the mechanisms that charged the example-level events (privacy_events.mechanism_name), in order of
    # first appearance; empty for ledgers written before events named their mechanism
    example_mechanisms: tuple[str, ...] = ()
    # unit -> device_id -> each event's dp-accounting DpEvent as JSON (privacy_events.dp_event), aligned with
    # ``events``; None for rows without one (ledgers written before the column, hand-made ledgers)
    dp_events: dict[str, dict[int, list[str | None]]] = field(default_factory=dict)


def read_config(run_dir: Path) -> dict[str, Any]:
    """Parse ``config.toml``; an absent file gives ``{}``. Raises ReportError if unparsable."""
    path = config_path(run_dir)
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ReportError(f"{path} is not valid TOML: {exc}") from exc


def read_audit(run_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``RUN_DIR/audit/audit.json`` written by ``dpfl audit`` (None if absent), and a warning if unreadable."""
    try:
        audit = read_audit_record(run_dir)
    except RecordError as exc:
        return None, f"{audit_path(run_dir)} could not be read ({exc}); the audit section is left out."
    return (audit.to_dict() if audit is not None else None), None


def _dp_events(reader: LedgerReader, unit: str, rows: dict[int, list], warnings: list[str]) -> dict[int, list[str | None]]:
    """Each device's serialised dp-accounting events of ``unit``, aligned with its ``rows`` (both in
    composition order); an event that does not parse, or a device whose count differs, gets None
    (its (sigma, q, steps) columns are composed instead) and a warning."""
    from dp.accounting import dp_event_from_json

    out: dict[int, list[str | None]] = {}
    bad: set[str] = set()
    for d, named in reader.named_events(unit).items():
        texts = [ev for _, ev in named]
        if len(texts) != len(rows.get(d, [])):
            warnings.append(f"{unit}-level events of device {d}: the ledger's serialised events do not match its "
                            "rows; its (sigma, q, steps) columns were composed")
            continue
        for text in set(texts) - {None} - bad:
            try:
                dp_event_from_json(text)
            except ValueError:
                bad.add(text)
                warnings.append(f"an unreadable dp_event in the ledger ({text[:60]!r}); its row's (sigma, q, steps) "
                                "columns were composed")
        out[d] = [None if t in bad else t for t in texts]
    return out


def read_run(run_dir: Path) -> RunData:
    """Read config, metrics and ledger of ``run_dir`` (the ledger read-only).

    Raises
    ------
    ReportError
        If ``run_dir`` does not exist or holds none of config.toml, metrics.jsonl,
        ledger.sqlite, or the ledger cannot be read.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run directory {run_dir} does not exist")
    ledger = ledger_path(run_dir)
    if not is_run_dir(run_dir):
        raise ReportError(
            f"{run_dir} holds no config.toml, metrics.jsonl or ledger.sqlite: not a run directory"
        )
    config = read_config(run_dir)
    metrics, skipped = read_metrics(run_dir)
    data = RunData(
        run_dir=run_dir, config=config, metrics=metrics, metrics_skipped=skipped,
        run_row=None, devices={}, rounds=[], events={u: {} for u in UNITS},
        ledger_epsilon={u: {} for u in UNITS}, budget_events=[],
    )
    data.audit, audit_warning = read_audit(run_dir)
    if audit_warning:
        data.warnings.append(audit_warning)
    try:
        data.holdout = read_holdout(run_dir)
    except RecordError as exc:
        data.warnings.append(f"holdout.json could not be read ({exc}); the holdout section is left out.")
    try:
        data.oos = read_oos(run_dir)
    except RecordError as exc:
        data.warnings.append(f"oos.json could not be read ({exc}); the out-of-scope section is left out.")
    if skipped:
        data.warnings.append(
            f"{skipped} line(s) of metrics.jsonl were incomplete or not JSON and were skipped "
            "(normal for the last line of a run still being written)."
        )
    if not ledger.exists():
        data.warnings.append("ledger.sqlite is absent: no privacy events recorded yet.")
        return data
    try:
        reader = LedgerReader(ledger)
    except LedgerError as exc:
        raise ReportError(str(exc)) from exc
    try:
        run_id = config.get("run_id")
        runs = reader.runs()
        if run_id is None and len(runs) == 1:
            run_id = runs[0].run_id
        match = [r for r in runs if r.run_id == run_id] or runs[:1]
        if match:
            run_id = match[0].run_id
            data.run_row = dataclasses.asdict(match[0])
        if run_id is None:  # no run on record: nothing of the ledger belongs to this run
            return data
        reader.run_id = run_id
        for d, row in reader.devices().items():
            data.devices[d] = {"activity": row.activity, "sample_rate": row.sample_rate}
        data.rounds = [{"round": r.round, "completed": r.completed, "cohort_size": r.cohort_size}
                       for r in reader.rounds()]
        for e in reader.events():
            if e.unit not in UNITS:
                data.warnings.append(f"ignored privacy event with unknown unit {e.unit!r}")
                continue
            data.events[e.unit].setdefault(e.device_id, []).append(
                (e.round, e.noise_multiplier, e.sample_rate, e.steps, e.max_grad_norm))
        for unit in UNITS:
            data.ledger_epsilon[unit] = reader.device_epsilons(unit)
        names = (name for rows in reader.named_events("example").values() for name, _ in rows)
        data.example_mechanisms = tuple(dict.fromkeys(n for n in names if n is not None))
        for unit in UNITS:
            data.dp_events[unit] = _dp_events(reader, unit, data.events[unit], data.warnings)
        data.budget_events = [dataclasses.asdict(b) for b in reader.budget_events()]
        data.holdings = [(h.round, h.device_id, h.uid) for h in reader.holdings()]
        data.holdout_releases = [dataclasses.asdict(h) for h in reader.holdout_releases()]
        data.deletions = [dataclasses.asdict(d) for d in reader.deletions()]
        lin = reader.lineage()
        data.lineage = dataclasses.asdict(lin) if lin is not None else None
        if lin is not None:
            data.replaced = {}
            for e in reader.replaced_events():
                data.replaced.setdefault(e.unit, {}).setdefault(e.device_id, []).append(
                    (e.noise_multiplier, e.sample_rate, e.steps))
    except LedgerError as exc:
        raise ReportError(str(exc)) from exc
    finally:
        reader.close()
    return data
