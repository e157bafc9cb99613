"""The report's opening: the NOT PRIVATE alert of a run without a guarantee, the title, and how far the run got."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rundir import run_in_progress
from report.blocks import Block, fmt
from report.context import Context
from report.sections.base import Doc, Section


@dataclass(frozen=True)
class Title:
    """The run's id and progress, and why it has no guarantee (``not_private``; None when it has one).

    ``status`` is ``"finished"`` when all ``rounds_planned`` rounds are committed, else ``"running"``
    while a process holds the run's lock (:func:`rundir.run_in_progress`), else ``"stopped"``.
    """

    run_id: str
    status: str
    rounds_completed: int
    rounds_planned: int | None
    not_private: str | None

    def to_json(self) -> dict[str, Any]:
        """``not_private`` (only without a guarantee), ``run_id``, ``status``, rounds and ``guarantee``."""
        out: dict[str, Any] = {} if self.not_private is None else {"not_private": self.not_private}
        return {**out, "run_id": self.run_id, "status": self.status, "rounds_completed": self.rounds_completed,
                "rounds_planned": self.rounds_planned, "guarantee": "yes" if self.not_private is None else "none"}


def compute(ctx: Context) -> Title:
    """The title facts of the run (its id from config.toml, else the ledger, else the directory name)."""
    planned = ctx.cfg.get("rounds")
    done = ctx.rounds_completed
    return Title(run_id=ctx.cfg.get("run_id") or ctx.run.get("run_id") or ctx.data.run_dir.name,
                 status="finished" if planned is not None and done >= int(planned)
                 else "running" if run_in_progress(ctx.data.run_dir) else "stopped",
                 rounds_completed=done, rounds_planned=planned, not_private=ctx.facts.not_private)


def render(t: Title, doc: Doc) -> list[Block]:
    """The alert (without a guarantee), the title, and how far the run got.

    A run still in progress (or stopped early) says that its numbers cover the committed rounds only.
    """
    out: list[Block] = []
    if t.not_private:
        out.append(("alert", f"NOT PRIVATE: {t.not_private}."))
    out.append(("h", 1, f"Privacy budget report: run {t.run_id}"))
    if t.status == "finished":
        state = f"Finished: {t.rounds_completed} of {fmt(t.rounds_planned)} rounds."
    elif t.status == "running":
        state = (f"Running: {t.rounds_completed} round(s) committed so far of {fmt(t.rounds_planned)} planned. "
                 "Numbers cover the committed rounds only.")
    else:
        state = (f"Stopped after {t.rounds_completed} of {fmt(t.rounds_planned)} planned rounds (no process is "
                 "running it; `dpfl simulate --resume` continues it). Numbers cover the committed rounds only.")
    out.append(("p", state))
    return out


SECTION = Section("title", Title, compute, render,
                  keys=("not_private", "run_id", "status", "rounds_completed", "rounds_planned", "guarantee"))
