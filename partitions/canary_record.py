"""The canaries of a run on record: ``RUN_DIR/canaries.json`` and the ledger's ``canaries`` table.

The population (partitions/population.py) inserts the audit canaries; the server writes what
was inserted, once, before round 1, through :func:`write_canaries`, so that ``dpfl audit``
(audit/run.py, which reads it back) knows which canaries were included and on which
device. The files' formats belong to rundir/ (:func:`rundir.write_canaries_file`,
:func:`rundir.ledger.record_canaries`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rundir import write_canaries_file
from rundir.ledger import record_canaries as ledger_record_canaries

__all__ = ["canaries_payload", "record_canaries", "write_canaries"]


def canaries_payload(population) -> dict[str, Any]:
    """The ``canaries.json`` content for a :class:`partitions.population.Population`."""
    dev = population.canary_device()
    uids: dict[int, list[int]] = {}
    for r in population.canary_records:
        uids.setdefault(int(r.canary_id), []).append(int(r.uid))
    entries = []
    for c in population.canaries:
        d = c.to_dict()
        d["label"] = str(c.label)
        d["device_id"] = dev.get(c.canary_id) if c.included else None
        d["uids"] = uids.get(c.canary_id, [])
        entries.append(d)
    return {
        "version": 1,
        "m": len(entries),
        "included": sum(1 for c in population.canaries if c.included),
        "repeats": population.canaries[0].repeats if population.canaries else None,
        "n_digits": population.canaries[0].n_digits if population.canaries else None,
        "inclusion_prob": 0.5,
        "note": "Each canary was included independently with probability 1/2; all copies of an "
        "included canary are on one device (device_id). Excluded canaries are in no device's data.",
        "canaries": entries,
    }


def write_canaries(run_dir: str | os.PathLike, population, ledger_path: str | os.PathLike | None = None,
                   run_id: str | None = None) -> Path | None:
    """Write ``RUN_DIR/canaries.json`` (atomically); nothing when the run has no canaries.

    With ``ledger_path`` (and ``run_id``) also marks the canaries in the ledger
    (:func:`record_canaries`), so the server needs one call::

        write_canaries(self.rundir.path, self.pop, self.rundir.ledger_path, cfg.run_id)

    Returns
    -------
    pathlib.Path or None
        The file written.
    """
    if not getattr(population, "canaries", ()):
        return None
    path = write_canaries_file(run_dir, canaries_payload(population))
    if ledger_path is not None:
        record_canaries(ledger_path, run_id or "", population)
    return path


def _entries(canaries) -> list[dict[str, Any]]:
    if hasattr(canaries, "canaries") and hasattr(canaries, "canary_records"):  # a Population
        return canaries_payload(canaries)["canaries"]
    if isinstance(canaries, dict):
        return list(canaries.get("canaries", []))
    return [c if isinstance(c, dict) else c.to_dict() for c in canaries]


def record_canaries(ledger_path: str | os.PathLike, run_id: str, canaries) -> int:
    """Mark the run's canaries (and which were included) in the ledger's ``canaries`` table.

    Converts ``canaries`` to entries and writes them with :func:`rundir.ledger.record_canaries`
    (its own connection, one transaction); rows already present are kept (``INSERT OR IGNORE``),
    so calling it again on resume changes nothing.

    Parameters
    ----------
    ledger_path : path
        ``RUN_DIR/ledger.sqlite`` (created if absent).
    run_id : str
    canaries : Population, canaries.json dict, or iterable of canary dicts / Canary
        Entries need ``canary_id``, ``included``, ``repeats`` and optionally ``device_id``,
        ``label``, ``secret``, ``text``.

    Returns
    -------
    int
        Number of canaries given (0 writes nothing, not even the table).
    """
    return ledger_record_canaries(ledger_path, run_id, _entries(canaries))
