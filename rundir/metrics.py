"""``RUN_DIR/metrics.jsonl``: one JSON object per line, one line per finished round.

The one reader and writer of the file. The server appends one line per round
(:func:`append_line`, fsynced); a resume first repairs the file (:func:`repair`) so that it
holds rounds 1..T once each. Each line has at least ``"round"`` (int); the other keys are the
round's outcome (cohort, losses, accuracy, timings, ...), written by the server and read as-is.

Readers:

* :func:`read_metrics` -- the report's view: tolerant (a half-written last line of a run still
  being written is skipped and counted), one row per round (the last line written for it),
  sorted by round.
* :func:`read_metric_lines` -- every line as written, in file order (what tests and tools that
  check the file itself need: duplicates and order are visible).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ._files import METRICS_FILE, atomic_write

__all__ = ["MetricsError", "read_metrics", "read_metric_lines", "append_line", "repair"]


class MetricsError(ValueError):
    """A line of ``metrics.jsonl`` is not a JSON object (strict reading only)."""


def _path(run_dir_or_file: str | os.PathLike) -> Path:
    p = Path(run_dir_or_file)
    return p if p.suffix == ".jsonl" and not p.is_dir() else p / METRICS_FILE


def read_metrics(run_dir: str | os.PathLike) -> tuple[list[dict[str, Any]], int]:
    """Parse ``metrics.jsonl``, skipping lines that are not complete JSON objects.

    A run still being written may have a half-written last line; it is skipped (and
    counted) rather than failing the report. A line without an int ``"round"`` is skipped
    too. A resumed run may repeat a round: the last line written for it is kept.

    Parameters
    ----------
    run_dir : path
        The run directory (or the ``metrics.jsonl`` file itself). An absent file gives no rows.

    Returns
    -------
    (rows, skipped) : list of dict sorted by round, int
    """
    path = _path(run_dir)
    if not path.exists():
        return [], 0
    rows: list[dict[str, Any]] = []
    skipped = 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if not isinstance(row, dict) or not isinstance(row.get("round"), int):
                skipped += 1
                continue
            rows.append(row)
    by_round = {r["round"]: r for r in rows}
    return [by_round[k] for k in sorted(by_round)], skipped


def read_metric_lines(run_dir: str | os.PathLike, *, strict: bool = True) -> list[dict[str, Any]]:
    """Every line of ``metrics.jsonl`` as a dict, in file order (no de-duplication, no sorting).

    Blank lines are ignored. An absent file gives ``[]``.

    Parameters
    ----------
    run_dir : path
        The run directory (or the ``metrics.jsonl`` file itself).
    strict : bool
        True: a line that is not a JSON object raises. False: such lines (a torn last line)
        are skipped.

    Raises
    ------
    MetricsError
        In strict mode, for a line that is not a JSON object (message names the line number).
    """
    path = _path(run_dir)
    if not path.exists():
        return []
    out: list[dict[str, Any]] = []
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if strict:
                raise MetricsError(f"{path}:{i}: not JSON ({exc})") from exc
            continue
        if not isinstance(row, dict):
            if strict:
                raise MetricsError(f"{path}:{i}: not a JSON object")
            continue
        out.append(row)
    return out


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one round's JSON ``line`` (no newline) to ``metrics.jsonl`` and fsync it.

    Parameters
    ----------
    path : path
        The run directory or the ``metrics.jsonl`` file itself (created if absent).
    """
    with open(_path(path), "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def repair(path: str | os.PathLike, last_round: int, last_line: str | None) -> None:
    """Make ``metrics.jsonl`` hold rounds 1..``last_round`` once each (for a resume).

    Drops torn or duplicate lines (the first line of a round is kept) and lines of rounds after
    the checkpoint; appends ``last_line`` (the checkpointed round's line, kept in ``state.json``)
    if the crash came before it was written. The file is rewritten atomically; lines kept are
    byte-identical.

    Parameters
    ----------
    path : path
        The run directory or the ``metrics.jsonl`` file itself.
    last_round : int
        The last checkpointed round (0: no round; the file is emptied).
    last_line : str or None
        That round's metrics line.
    """
    path = _path(path)
    lines: dict[int, str] = {}
    if path.exists():
        for raw in path.read_text(encoding="utf-8").splitlines():
            try:
                r = int(json.loads(raw)["round"])
            except (ValueError, KeyError, TypeError):
                continue
            if 1 <= r <= last_round:
                lines.setdefault(r, raw)
    if last_round >= 1 and last_round not in lines and last_line:
        lines[last_round] = last_line
    atomic_write(path, "".join(lines[r] + "\n" for r in sorted(lines)).encode())
