"""The run directory: resolved config, per-round metrics, ledger path, checkpoints.

::

    RUN_DIR/config.toml      the resolved RunConfig
    RUN_DIR/metrics.jsonl    one JSON line per round
    RUN_DIR/ledger.sqlite    the privacy ledger (server/ledger.py)
    RUN_DIR/checkpoints/     global.pt (latest global model) and state.json (its round)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from flwr.app import ArrayRecord


class RunDirError(ValueError):
    """The run directory cannot be used (message says why and what to do)."""


class RunDir:
    """Files of one run. Creating it on a directory that already holds a run is refused.

    Raises
    ------
    RunDirError
        If ``path`` already holds another run's ``config.toml`` and ``resume`` is False.
    """

    def __init__(self, path: Path, resume: bool = False):
        self.path = Path(path)
        if (self.path / "config.toml").exists() and not resume:
            raise RunDirError(f"--run-dir {self.path} already holds a run; choose a new --run-dir")
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "checkpoints").mkdir(exist_ok=True)

    @property
    def ledger_path(self) -> Path:
        return self.path / "ledger.sqlite"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_config(self, cfg) -> None:
        _atomic_write(self.path / "config.toml", cfg.to_toml().encode())

    def append_metrics(self, line: str) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def save_checkpoint(self, arrays: ArrayRecord, round_: int) -> None:
        """Atomically replace ``checkpoints/global.pt`` and ``checkpoints/state.json``."""
        ck = self.path / "checkpoints"
        tmp = ck / "global.pt.tmp"
        torch.save(arrays.to_torch_state_dict(), tmp)
        os.replace(tmp, ck / "global.pt")
        _atomic_write(ck / "state.json", json.dumps({"round": round_}).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
