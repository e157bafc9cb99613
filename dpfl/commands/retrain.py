"""``dpfl retrain RUN_DIR --from-round T``: exact removal of the devices that asked to be forgotten.

The run in RUN_DIR recorded deletion requests (``--deletions``; ledger table ``deletions``). A
model released after a deleted device joined may carry its data; DP bounds what it reveals but
does not remove it. Retraining does: the new run starts from RUN_DIR's kept checkpoint of round
T - 1 (``checkpoints/rounds/``, kept with ``--deletions`` or ``--round-checkpoints``), where T is
at most the first round any deleted device joined, and trains rounds T.. without those devices.
Its ledger holds the parent's privacy events of rounds 1..T-1 (those models were released and
are kept), the deletions (in effect from round T) and its ``lineage`` row; the report marks it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpfl.commands.errors import exits

if TYPE_CHECKING:
    from settings.config import RunConfig

__all__ = ["add_parser", "plan_retrain", "prepare_retrain", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``dpfl retrain`` on ``subparsers``; return its parser."""
    p = subparsers.add_parser("retrain", help="remove deleted devices exactly: retrain a run from a round before they joined")
    p.add_argument("run_dir", help="the run whose deletion requests to honour")
    p.add_argument("--from-round", type=int, required=True, dest="from_round",
                   help="first round to retrain (at most the first round a deleted device joined)")
    p.add_argument("--run-dir", default=None, dest="new_run_dir",
                   help="the retrained run's directory (default: RUN_DIR-retrain-rT beside it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def plan_retrain(run_dir: str | Path, from_round: int) -> tuple[list[int], dict[int, int | None], str]:
    """(devices to remove, device -> first round it joined (None: never), the parent's run id).

    Raises
    ------
    settings.config.ConfigError
        If the run has no deletion request on record, ``from_round`` is < 1 or after a deleted
        device first joined, or the run kept no checkpoint of round ``from_round - 1``.
    """
    from settings.config import ConfigError
    from rundir import LedgerReader, RunDir

    with LedgerReader(run_dir) as reader:
        requests = reader.deletions()
        runs = reader.runs()
        events = reader.events()
    if not requests:
        raise ConfigError(f"{run_dir}: no deletion request is on record in its ledger (run with --deletions FILE); "
                          "nothing to remove")
    removed = sorted({d.device_id for d in requests})
    joined: dict[int, int | None] = {d: None for d in removed}
    for e in events:
        if e.device_id in joined and (joined[e.device_id] is None or e.round < joined[e.device_id]):
            joined[e.device_id] = e.round
    if from_round < 1:
        raise ConfigError(f"--from-round: must be >= 1, got {from_round}")
    first = min((j for j in joined.values() if j is not None), default=None)
    if first is not None and from_round > first:
        who = min((d for d, j in joined.items() if j == first))
        raise ConfigError(f"--from-round {from_round}: device {who} first joined in round {first}, so every model "
                          f"from round {first} on may carry its data; retrain from round {first} or earlier")
    kept = RunDir(Path(run_dir), resume=True).rounds_kept() if from_round > 1 else []
    if from_round > 1 and from_round - 1 not in kept:
        raise ConfigError(f"--from-round {from_round}: {run_dir} kept no checkpoint of round {from_round - 1} "
                          f"(kept: {', '.join(map(str, kept[-5:])) or 'none'}; a run keeps them with --deletions "
                          "or --round-checkpoints); use --from-round 1 to retrain from scratch")
    return removed, joined, runs[0].run_id if runs else ""


def prepare_retrain(run_dir: str | Path, from_round: int, new_run_dir: str | Path | None = None) -> "RunConfig":
    """Build the retrained run's directory, ready to resume at round ``from_round``; return its RunConfig.

    The new directory (default ``RUN_DIR-retrain-rT`` beside RUN_DIR) gets the parent's settings
    with a new run id, ``deletions.txt`` (every deleted device from round T), kept round
    checkpoints, the ledger rows of rounds 1..T-1 plus a ``lineage`` row, and the checkpoint and
    metrics lines of round T-1.

    Requests the parent never applied (their round came after its last round) are written to the
    new run's ``deletions.txt`` as they were, so the retrained run applies them when their round comes.

    Returns
    -------
    settings.config.RunConfig
        The new run's settings (``run_dir`` the new directory), for ``simulate(cfg, resume=True)``.

    Raises
    ------
    settings.config.ConfigError
        See :func:`plan_retrain`; also when T is past the run's last round or the parent's
        deletions file cannot be read.
    rundir.RunDirError
        If the new directory exists and is not empty, or the parent lacks the kept checkpoint
        of round T - 1 or its ``global.pt``.
    rundir.LedgerError
        If the parent's ledger cannot be read.
    """
    from dpfl.commands.simulate import resume_config
    from settings.config import ConfigError
    from rundir import Ledger, RunDir, claim_run_dir, ledger_path

    parent = Path(run_dir)
    cfg = resume_config(str(parent), flag="dpfl retrain")
    t = int(from_round)
    if t > cfg.rounds:
        raise ConfigError(f"--from-round {t}: the run has {cfg.rounds} rounds")
    removed, joined, parent_id = plan_retrain(parent, t)
    later: dict[int, int] = {}
    if cfg.deletions:  # requests for rounds the run never reached: the retrained run keeps them as they are
        from server.deletions import load_deletions

        src = RunDir(parent, resume=True).deletions_path
        later = {d: r for d, r in load_deletions(src if src.exists() else cfg.deletions, cfg.num_devices).items()
                 if d not in removed}
    new = Path(new_run_dir) if new_run_dir else parent.parent / f"{parent.name}-retrain-r{t}"
    claim_run_dir(new)
    rd = RunDir(new)
    deletions = rd.write_deletions({**later, **{d: t for d in removed}})
    cfg = cfg.replace(run_id="", run_dir=str(new), deletions=str(deletions), round_checkpoints=True).with_defaults().validate()
    rd.write_config(cfg)
    ledger = Ledger(rd.ledger_path, cfg.run_id)
    try:
        ledger.copy_rounds_from(ledger_path(parent), parent_id, t - 1)
        ledger.record_lineage(parent_id, str(parent.resolve()), t, removed)
    finally:
        ledger.close()
    rd.start_from(parent, t - 1)
    never = [d for d in removed if joined[d] is None]
    print(f"retraining {parent} from round {t} without devices {', '.join(map(str, removed))}"
          + (f" ({', '.join(map(str, never))} never joined)" if never else "") + f" into {new}", flush=True)
    return cfg


@exits
def run(ns: argparse.Namespace) -> int:
    """``dpfl retrain``: :func:`prepare_retrain`, then resume the new run like ``dpfl simulate --resume``."""
    from dpfl.commands.simulate import print_result, simulate

    cfg = prepare_retrain(ns.run_dir, ns.from_round, ns.new_run_dir)
    result = simulate(cfg, progress=not ns.no_progress, resume=True)
    return print_result(result)
