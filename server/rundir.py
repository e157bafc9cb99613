"""The run directory: resolved config, per-round metrics, ledger path, checkpoints.

::

    RUN_DIR/config.toml      the resolved RunConfig
    RUN_DIR/metrics.jsonl    one JSON line per round
    RUN_DIR/ledger.sqlite    the privacy ledger (server/ledger.py)
    RUN_DIR/checkpoints/     the last complete round: global-r<T>.pt (global model), server-r<T>.pkl
                             (strategy state, e.g. FedAdam's m_t/v_t, and the device-DP noise rng),
                             state.json (round T, selection rng state, attempt, the round's
                             metrics line; written last, atomically: it names the checkpoint),
                             global.pt (the latest global model under a fixed name, for readers: a hard
                             link to global-r<T>.pt)

A round is complete when ``state.json`` names it; ``--resume`` continues from there.
"""

from __future__ import annotations

import json
import os
import shutil
import pickle
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

    def save_checkpoint(self, arrays: ArrayRecord, round_: int, state: dict | None = None, server_state: object = None) -> None:
        """Write round ``round_``'s checkpoint; ``state.json`` is replaced last and names it.

        ``state`` (JSON-able: rng states, attempt, metrics line) goes into ``state.json``;
        ``server_state`` (any picklable object: strategy moments, rngs) into ``server-r<T>.pkl``.
        A crash at any point leaves either the previous complete checkpoint or this one.
        """
        ck = self.path / "checkpoints"
        model_name, server_name = f"global-r{round_}.pt", f"server-r{round_}.pkl"
        sd = arrays.to_torch_state_dict()
        _atomic_write(ck / server_name, pickle.dumps(server_state))
        tmp = ck / (model_name + ".tmp")
        with open(tmp, "wb") as fh:
            torch.save(sd, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, ck / model_name)
        _atomic_write(ck / "state.json", json.dumps({**(state or {}), "round": round_, "model": model_name, "server": server_name}).encode())
        # global.pt: a second name for the same file (a hard link), not a second serialisation.
        tmp = ck / "global.pt.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(ck / model_name, tmp)
        except OSError:  # file systems without hard links
            shutil.copyfile(ck / model_name, tmp)
        os.replace(tmp, ck / "global.pt")
        for old in list(ck.glob("global-r*.pt")) + list(ck.glob("server-r*.pkl")):
            if old.name not in (model_name, server_name):
                old.unlink(missing_ok=True)

    def load_checkpoint(self) -> tuple[int, dict, dict, object] | None:
        """The last complete round's (round, model state dict, state.json, server state), or None.

        Raises
        ------
        RunDirError
            If ``state.json`` names files that are missing (written by an older dpfl, not resumable).
        """
        ck = self.path / "checkpoints"
        if not (ck / "state.json").exists():
            return None
        state = json.loads((ck / "state.json").read_text())
        if "model" not in state or not (ck / state["model"]).exists():
            raise RunDirError(f"{ck / 'state.json'}: the checkpoint of round {state.get('round')} is incomplete; the run cannot be resumed")
        sd = torch.load(ck / state["model"], weights_only=True)
        server_state = pickle.loads((ck / state["server"]).read_bytes()) if (ck / state["server"]).exists() else None
        return int(state["round"]), sd, state, server_state

    def repair_metrics(self, last_round: int, last_line: str | None) -> None:
        """Make ``metrics.jsonl`` hold rounds 1..``last_round`` once each (for a resume).

        Drops torn or duplicate lines and lines of rounds after the checkpoint; re-appends the
        checkpointed round's line (kept in ``state.json``) if the crash came before it was written.
        """
        lines: dict[int, str] = {}
        if self.metrics_path.exists():
            for raw in self.metrics_path.read_text(encoding="utf-8").splitlines():
                try:
                    r = int(json.loads(raw)["round"])
                except (ValueError, KeyError, TypeError):
                    continue
                if 1 <= r <= last_round:
                    lines.setdefault(r, raw)
        if last_round >= 1 and last_round not in lines and last_line:
            lines[last_round] = last_line
        _atomic_write(self.metrics_path, "".join(lines[r] + "\n" for r in sorted(lines)).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
