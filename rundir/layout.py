"""The run directory: where each file lives, the resolved config, checkpoints.

::

    RUN_DIR/config.toml      the resolved RunConfig
    RUN_DIR/metrics.jsonl    one JSON line per round (rundir/metrics.py)
    RUN_DIR/ledger.sqlite    the privacy ledger (rundir/ledger.py)
    RUN_DIR/canaries.json    the audit canaries of a ``--canaries M`` run (rundir/records.py)
    RUN_DIR/checkpoints/     the last complete round: global-r<T>.pt (global model), server-r<T>.pkl
                             (strategy state, e.g. FedAdam's m_t/v_t, and the device-DP noise rng),
                             state.json (round T, selection rng state, attempt, the round's
                             metrics line; written last, atomically: it names the checkpoint),
                             global.pt (the latest global model under a fixed name, for readers: a hard
                             link to global-r<T>.pt)
    RUN_DIR/report/          report.md, report.html, *.png, summary.json (rundir/records.py)
    RUN_DIR/audit/           audit.json, roc.json (rundir/records.py)
    RUN_DIR/run.lock         locked (flock) by the process running the rounds, while it runs

A round is complete when ``state.json`` names it; ``--resume`` continues from there.

This module imports nothing of the project: it is the bottom layer, beside the config.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ._files import (
    AUDIT_DIR, AUDIT_FILE, CANARIES_FILE, CHECKPOINTS_DIR, CONFIG_FILE, DELETIONS_FILE, GLOBAL_MODEL_FILE, LEDGER_FILE,
    METRICS_FILE, REPORT_DIR, ROC_FILE, ROUNDS_DIR, STATE_FILE, SUMMARY_FILE, atomic_write,
)
from . import metrics as _metrics

__all__ = [
    "RunDir", "RunDirError", "atomic_write", "config_path", "ledger_path", "metrics_path", "canaries_path",
    "global_model_path", "report_dir", "audit_dir", "is_run_dir", "read_checkpoint_state", "hold_run_lock",
    "release_run_lock", "run_in_progress", "load_global_model", "load_model_file", "load_model_state", "RUN_LOCK_FILE",
    "CONFIG_FILE", "METRICS_FILE", "LEDGER_FILE", "CANARIES_FILE", "CHECKPOINTS_DIR", "STATE_FILE",
    "GLOBAL_MODEL_FILE", "REPORT_DIR", "SUMMARY_FILE", "AUDIT_DIR", "AUDIT_FILE", "ROC_FILE",
]


class RunDirError(ValueError):
    """The run directory cannot be used (message says why and what to do)."""


def config_path(run_dir: str | os.PathLike) -> Path:
    """``RUN_DIR/config.toml`` (the resolved RunConfig; may not exist yet)."""
    return Path(run_dir) / CONFIG_FILE


def ledger_path(run_dir: str | os.PathLike) -> Path:
    """``RUN_DIR/ledger.sqlite`` (may not exist yet)."""
    return Path(run_dir) / LEDGER_FILE


def metrics_path(run_dir: str | os.PathLike) -> Path:
    """``RUN_DIR/metrics.jsonl`` (may not exist yet)."""
    return Path(run_dir) / METRICS_FILE


def canaries_path(run_dir: str | os.PathLike) -> Path:
    """``RUN_DIR/canaries.json`` (only runs made with ``--canaries M`` have it)."""
    return Path(run_dir) / CANARIES_FILE


def global_model_path(run_dir: str | os.PathLike) -> Path:
    """``RUN_DIR/checkpoints/global.pt``: the last checkpointed global model (torch state dict)."""
    return Path(run_dir) / CHECKPOINTS_DIR / GLOBAL_MODEL_FILE


def report_dir(run_dir: str | os.PathLike) -> Path:
    """``RUN_DIR/report/`` (written by ``dpfl report``; may not exist yet)."""
    return Path(run_dir) / REPORT_DIR


def audit_dir(run_dir: str | os.PathLike) -> Path:
    """``RUN_DIR/audit/`` (written by ``dpfl audit``; may not exist yet)."""
    return Path(run_dir) / AUDIT_DIR


def is_run_dir(run_dir: str | os.PathLike) -> bool:
    """True when ``run_dir`` holds any of config.toml, metrics.jsonl or ledger.sqlite."""
    p = Path(run_dir)
    return any((p / n).exists() for n in (CONFIG_FILE, METRICS_FILE, LEDGER_FILE))


def read_checkpoint_state(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``checkpoints/state.json`` of ``run_dir`` (``round``, ``model``, ``server``, rng states...).

    Returns None when absent or unreadable (a reader's question "which round is checkpointed?"
    then has no answer); never raises for a missing or torn file.
    """
    path = Path(run_dir) / CHECKPOINTS_DIR / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def load_global_model(run_dir: str | os.PathLike, model) -> int | None:
    """Load ``run_dir``'s last checkpointed global model into ``model`` (the run's model, built from
    its settings); return the checkpoint's round (None for an older run without ``state.json``).

    A run whose encoder is frozen (``--trainable head`` or ``lora``) checkpoints only the trained
    parameters (``state.json``'s ``frozen_from`` names the base model and seed they sit on): the
    frozen ones keep what ``model`` was built with, which is that base. Any other checkpoint is a
    whole state dict and is loaded strictly.

    Raises
    ------
    RunDirError
        If there is no checkpoint, or it does not fit ``model`` (a key it lacks or does not know).
    """
    path = global_model_path(run_dir)
    if not path.is_file():
        raise RunDirError(f"{run_dir}: no checkpoint yet ({path} is missing): let the run finish a round")
    try:
        load_model_file(path, model)
    except (RuntimeError, OSError, ValueError, EOFError, IndexError, pickle.UnpicklingError) as exc:
        raise RunDirError(f"cannot load {path} into the run's model: {str(exc).splitlines()[0][:200]}") from exc
    return (read_checkpoint_state(run_dir) or {}).get("round")


def load_model_file(path: str | os.PathLike, model) -> None:
    """Load the state dict in ``path`` into ``model``: a run's checkpoint (``checkpoints/global.pt``,
    trained parameters only where the ``state.json`` beside it names ``frozen_from``) or any
    whole state dict.

    Raises
    ------
    ValueError
        If the file holds something other than a state dict.
    RuntimeError, OSError, pickle.UnpicklingError, EOFError
        If it cannot be read or does not fit ``model``.
    """
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"it holds a {type(sd).__name__}, not a state dict")
    beside = Path(path).parent / STATE_FILE
    try:
        state = json.loads(beside.read_text(encoding="utf-8")) if beside.is_file() else {}
    except ValueError:  # a torn state.json: the file is read as a whole state dict
        state = {}
    load_model_state(model, sd, state.get("frozen_from") if isinstance(state, dict) else None)


def load_model_state(model, state_dict: Mapping[str, Any], frozen_from: Mapping[str, Any] | None) -> None:
    """Load a checkpoint's ``state_dict`` into ``model``: strictly, or (``frozen_from`` given: a
    checkpoint of the trained parameters only) every key it holds, none it lacks being trainable
    in ``model``'s run.

    Raises
    ------
    RuntimeError
        If a key does not fit ``model``.
    """
    if frozen_from is None:
        model.load_state_dict(state_dict)
        return
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if unexpected:
        raise RuntimeError(f"the checkpoint holds keys the model lacks: {unexpected[:3]}")


#: Created with O_EXCL in a new run's directory by :func:`claim_run_dir`: the run that made it owns the directory.
CLAIM_FILE = ".dpfl-run"


def claim_run_dir(run_dir: str | os.PathLike) -> Path:
    """Claim a new run's directory atomically (creating it and its parents as needed); return it.

    The claim is the file :data:`CLAIM_FILE`, created with ``O_CREAT | O_EXCL``: of two runs
    given (or generating) the same path, exactly one creates it and the other is refused, so
    two runs can never share a directory. An existing empty directory (a folder the user made
    for the run) can be claimed.

    Raises
    ------
    RunDirError
        If ``run_dir`` is a file, or a directory that is claimed or not empty.
    """
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--run-dir {path} is a file; choose a new --run-dir")
    path.mkdir(parents=True, exist_ok=True)
    busy = RunDirError(f"--run-dir {path} already exists and is not empty (another run may be using it); "
                       "choose a new --run-dir, or --resume the run there")
    if any(p.name != CLAIM_FILE for p in path.iterdir()):
        raise busy
    try:
        fd = os.open(path / CLAIM_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise busy from None
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{os.getpid()}\n")
    return path


#: Locked by the process that runs a run's rounds (``flock``: released when that process ends, a
#: SIGKILL included).
RUN_LOCK_FILE = "run.lock"
_held_locks: dict[tuple[int, int], Any] = {}  # (st_dev, st_ino) of run.lock -> its open file, for the runs this process runs


def _lock_key(run_dir: str | os.PathLike) -> tuple[int, int] | None:
    """The identity of ``RUN_DIR/run.lock`` (device, inode): the same file after the folder moved."""
    try:
        st = os.stat(Path(run_dir) / RUN_LOCK_FILE)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def hold_run_lock(run_dir: str | os.PathLike) -> None:
    """Lock ``RUN_DIR/run.lock`` for this process until it ends (again for the same run, even moved:
    a no-op).

    Two processes never run one run's rounds at once, and :func:`run_in_progress` tells a
    report whether the rounds it reads may still grow.

    Raises
    ------
    RunDirError
        If another process holds the lock (the run is running).
    """
    import fcntl

    key = _lock_key(run_dir)
    if key is not None and key in _held_locks:
        return
    fh = open(Path(run_dir) / RUN_LOCK_FILE, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise RunDirError(f"{run_dir}: another process is running this run (it holds {RUN_LOCK_FILE}); wait for "
                          "it to end or stop it before resuming") from None
    st = os.fstat(fh.fileno())
    _held_locks[(st.st_dev, st.st_ino)] = fh


def release_run_lock(run_dir: str | os.PathLike) -> None:
    """Release this process's lock of ``run_dir`` (:func:`hold_run_lock`), if it holds one."""
    fh = _held_locks.pop(_lock_key(run_dir), None)
    if fh is not None:
        fh.close()


def run_in_progress(run_dir: str | os.PathLike) -> bool:
    """True while a process holds ``RUN_DIR/run.lock`` (this one included): the run is running.

    False for a run that finished, stopped (Ctrl-C, SIGTERM, SIGKILL, a crash) or predates the lock.
    """
    import fcntl

    key = _lock_key(run_dir)
    if key is None:
        return False
    if key in _held_locks:
        return True
    with open(Path(run_dir) / RUN_LOCK_FILE, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return False


class RunDir:
    """Files of one run (the server's writer). Creating it on a directory that already holds a run is refused.

    Parameters
    ----------
    path : pathlib.Path
        The run directory (created with its ``checkpoints/`` folder if absent).
    resume : bool
        Continue a run already there (its ``config.toml`` is expected).

    Raises
    ------
    RunDirError
        If ``path`` already holds another run's ``config.toml`` and ``resume`` is False.
    """

    def __init__(self, path: Path, resume: bool = False):
        self.path = Path(path)
        if config_path(self.path).exists() and not resume:
            raise RunDirError(f"--run-dir {self.path} already holds a run; choose a new --run-dir")
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / CHECKPOINTS_DIR).mkdir(exist_ok=True)

    @property
    def ledger_path(self) -> Path:
        """``RUN_DIR/ledger.sqlite``."""
        return ledger_path(self.path)

    @property
    def metrics_path(self) -> Path:
        """``RUN_DIR/metrics.jsonl``."""
        return metrics_path(self.path)

    def write_config(self, cfg) -> None:
        """Write ``config.toml`` atomically from ``cfg.to_toml()`` (any object with that method)."""
        atomic_write(config_path(self.path), cfg.to_toml().encode())

    def append_metrics(self, line: str) -> None:
        """Append one round's JSON line to ``metrics.jsonl`` and fsync it (see :func:`rundir.metrics.append_line`)."""
        _metrics.append_line(self.metrics_path, line)

    def save_checkpoint(self, state_dict: Mapping[str, Any], round_: int, state: dict | None = None,
                        server_state: object = None, frozen_from: Mapping[str, Any] | None = None) -> None:
        """Write round ``round_``'s checkpoint; ``state.json`` is replaced last and names it.

        Parameters
        ----------
        state_dict : mapping of str to torch.Tensor or numpy.ndarray
            The global model's parameters (a torch state dict; numpy arrays are converted to
            tensors, so ``global-r<T>.pt`` is always a torch state dict).
        round_ : int
            The round just completed.
        state : dict, optional
            JSON-able (rng states, attempt, metrics line); goes into ``state.json``.
        server_state : object, optional
            Any picklable object (strategy moments, rngs); goes into ``server-r<T>.pkl``.
        frozen_from : dict, optional
            ``state_dict`` holds the trained parameters only; the rest are the base model's
            (``{"model", "seed"}``: rebuilt from them, see :func:`load_global_model`).

        A crash at any point leaves either the previous complete checkpoint or this one.
        """
        ck = self.path / CHECKPOINTS_DIR
        model_name, server_name = f"global-r{round_}.pt", f"server-r{round_}.pkl"
        sd = {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v)
              for k, v in state_dict.items()}
        atomic_write(ck / server_name, pickle.dumps(server_state))
        tmp = ck / (model_name + ".tmp")
        with open(tmp, "wb") as fh:
            torch.save(sd, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, ck / model_name)
        record = {**(state or {}), "round": round_, "model": model_name, "server": server_name}
        if frozen_from is not None:
            record["frozen_from"] = dict(frozen_from)
        atomic_write(ck / STATE_FILE, json.dumps(record).encode())
        # global.pt: a second name for the same file (a hard link), not a second serialisation.
        tmp = ck / (GLOBAL_MODEL_FILE + ".tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(ck / model_name, tmp)
        except OSError:  # file systems without hard links
            shutil.copyfile(ck / model_name, tmp)
        os.replace(tmp, ck / GLOBAL_MODEL_FILE)
        for old in list(ck.glob("global-r*.pt")) + list(ck.glob("server-r*.pkl")):
            if old.name not in (model_name, server_name):
                old.unlink(missing_ok=True)

    @property
    def deletions_path(self) -> Path:
        """``RUN_DIR/deletions.txt``: the run's copy of its deletion requests."""
        return self.path / DELETIONS_FILE

    def keep_deletions(self, source: str | os.PathLike) -> Path:
        """Copy the deletion requests file into the run directory (``deletions.txt``) and return the copy's path.

        Raises
        ------
        RunDirError
            If ``source`` cannot be read (naming it).
        """
        dest = self.deletions_path
        src = Path(source)
        if src.resolve() == dest.resolve():
            return dest
        try:
            data = src.read_bytes()
        except OSError as exc:
            raise RunDirError(f"--deletions {src}: cannot read it ({exc.strerror or exc})") from exc
        atomic_write(dest, data)
        return dest

    def write_deletions(self, requests: Mapping[int, int]) -> Path:
        """Write ``deletions.txt`` (lines ``DEVICE_ID ROUND``, by device) from ``requests`` {device: round}; return its path."""
        atomic_write(self.deletions_path, "".join(f"{d} {r}\n" for d, r in sorted(requests.items())).encode())
        return self.deletions_path

    def save_round_copy(self, round_: int, trainable: Mapping[str, Any], state: dict | None, server_state: object) -> None:
        """Keep round ``round_``'s trainable parameters, ``state.json`` content and server state under
        ``checkpoints/rounds/`` (``--round-checkpoints``), so that ``dpfl retrain`` can start again
        from it. The frozen parameters never change and live in ``global.pt``."""
        d = self.path / CHECKPOINTS_DIR / ROUNDS_DIR
        d.mkdir(exist_ok=True)
        sd = {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v) for k, v in trainable.items()}
        buf = io.BytesIO()
        torch.save(sd, buf)
        atomic_write(d / f"server-r{round_}.pkl", pickle.dumps(server_state))
        atomic_write(d / f"state-r{round_}.json", json.dumps({**(state or {}), "round": round_}).encode())
        atomic_write(d / f"trainable-r{round_}.pt", buf.getvalue())  # last: its presence marks a complete copy

    def rounds_kept(self) -> list[int]:
        """Rounds whose copy :meth:`save_round_copy` kept, ascending."""
        d = self.path / CHECKPOINTS_DIR / ROUNDS_DIR
        return sorted(int(p.stem.split("-r")[1]) for p in d.glob("trainable-r*.pt")) if d.is_dir() else []

    def load_round_copy(self, round_: int) -> tuple[dict, dict, object]:
        """(trainable state dict, state.json content, server state) kept for round ``round_``.

        Raises
        ------
        RunDirError
            If no complete copy of that round is kept.
        """
        d = self.path / CHECKPOINTS_DIR / ROUNDS_DIR
        model = d / f"trainable-r{round_}.pt"
        if not model.exists():
            raise RunDirError(f"{self.path}: no checkpoint of round {round_} is kept (the run needs "
                              "--round-checkpoints, which --deletions turns on)")
        sd = torch.load(model, weights_only=True)
        state = json.loads((d / f"state-r{round_}.json").read_text())
        server_state = pickle.loads((d / f"server-r{round_}.pkl").read_bytes())
        return sd, state, server_state

    def start_from(self, parent: str | os.PathLike, round_: int) -> None:
        """Make this (new) run directory continue ``parent``'s round ``round_`` (for ``dpfl retrain``):
        its checkpoint is the parent's kept copy of that round (trainable parameters over the
        parent's frozen ones, state, server state) and ``metrics.jsonl`` holds the parent's
        lines of rounds 1..``round_``. ``round_`` 0 copies nothing (the run starts afresh).

        Raises
        ------
        RunDirError
            If the parent kept no copy of ``round_`` or has no ``global.pt``.
        """
        if round_ <= 0:
            return
        src = RunDir(Path(parent), resume=True)
        trainable, state, server_state = src.load_round_copy(round_)
        full = src.path / CHECKPOINTS_DIR / GLOBAL_MODEL_FILE
        if not full.exists():
            raise RunDirError(f"{src.path}: no {CHECKPOINTS_DIR}/{GLOBAL_MODEL_FILE} to take the frozen parameters from")
        sd = torch.load(full, weights_only=True)
        missing = sorted(set(trainable) - set(sd))
        if missing:
            raise RunDirError(f"{src.path}: the round {round_} copy has parameters the model lacks ({missing[:3]})")
        sd.update(trainable)
        frozen_from = (read_checkpoint_state(src.path) or {}).get("frozen_from")  # the parent's base, if partial
        state = {k: v for k, v in state.items() if k != "frozen_from"}
        self.save_round_copy(round_, trainable, state, server_state)
        self.save_checkpoint(sd, round_, state, server_state, frozen_from=frozen_from)
        if src.metrics_path.exists():
            atomic_write(self.metrics_path, src.metrics_path.read_bytes())
        self.repair_metrics(round_, state.get("metrics"))

    def load_checkpoint(self) -> tuple[int, dict, dict, object] | None:
        """The last complete round's (round, model state dict, state.json, server state), or None.

        Raises
        ------
        RunDirError
            If ``state.json`` names files that are missing (written by an older dpfl, not resumable).
        """
        ck = self.path / CHECKPOINTS_DIR
        if not (ck / STATE_FILE).exists():
            return None
        state = json.loads((ck / STATE_FILE).read_text())
        if "model" not in state or not (ck / state["model"]).exists():
            raise RunDirError(f"{ck / STATE_FILE}: the checkpoint of round {state.get('round')} is incomplete; the run cannot be resumed")
        sd = torch.load(ck / state["model"], weights_only=True)  # with state["frozen_from"]: trained keys only
        server_state = pickle.loads((ck / state["server"]).read_bytes()) if (ck / state["server"]).exists() else None
        return int(state["round"]), sd, state, server_state

    def repair_metrics(self, last_round: int, last_line: str | None) -> None:
        """Make ``metrics.jsonl`` hold rounds 1..``last_round`` once each (for a resume).

        Drops torn or duplicate lines and lines of rounds after the checkpoint; re-appends the
        checkpointed round's line (kept in ``state.json``) if the crash came before it was written.
        See :func:`rundir.metrics.repair`.
        """
        _metrics.repair(self.metrics_path, last_round, last_line)
