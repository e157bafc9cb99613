"""File names of a run directory and the durable write shared by rundir/'s modules (private)."""

from __future__ import annotations

import os
from pathlib import Path

#: File and folder names inside a run directory (the one place they are spelled).
CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
LEDGER_FILE = "ledger.sqlite"
CANARIES_FILE = "canaries.json"
HOLDOUT_FILE = "holdout.json"
OOS_FILE = "oos.json"
DELETIONS_FILE = "deletions.txt"
CHECKPOINTS_DIR = "checkpoints"
ROUNDS_DIR = "rounds"  # inside CHECKPOINTS_DIR: per-round copies (--round-checkpoints)
STATE_FILE = "state.json"
GLOBAL_MODEL_FILE = "global.pt"
REPORT_DIR = "report"
SUMMARY_FILE = "summary.json"
AUDIT_DIR = "audit"
AUDIT_FILE = "audit.json"
ROC_FILE = "roc.json"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through ``path.tmp``, fsync, then rename over ``path``.

    A crash leaves either the old file or the new one, never a torn one.

    Raises
    ------
    OSError
        If the folder is not writable.
    """
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
