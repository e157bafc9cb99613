"""``dpfl report RUN_DIR``: write the privacy budget report of a run directory (RUN_DIR/report/)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dpfl.commands.errors import exits

__all__ = ["add_parser", "headline", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``dpfl report`` on ``subparsers``; return its parser."""
    p = subparsers.add_parser("report", help="write the privacy budget report of a run directory")
    p.add_argument("run_dir")
    p.add_argument("--baseline", default=None, help="a non-private run directory to compare utility with")
    return p


@exits
def run(ns: argparse.Namespace) -> int:
    """Build the report of ``ns.run_dir`` (beside ``ns.baseline`` when given); return the exit code."""
    from report import build_report

    summary = build_report(Path(ns.run_dir), Path(ns.baseline) if ns.baseline else None)
    print(f"report written to {Path(ns.run_dir) / 'report'} (report.md, report.html, summary.json)")
    print(headline(summary))
    return 0


def headline(summary: dict) -> str:
    """The report's figures for the terminal, rounded: status and rounds, the final accuracy (and
    slot F1 for a slot task), each unit's epsilon at delta (max over devices) or NOT PRIVATE."""
    from dpfl.commands.simulate import round_figure

    lines = [f"status: {summary.get('status')} ({summary.get('rounds_completed')} of "
             f"{summary.get('rounds_planned')} rounds)"]
    figures = [f"{name} {round_figure(summary.get(key))}" for name, key in
               (("accuracy", "final_accuracy"), ("macro-F1", "final_macro_f1"), ("slot F1", "final_slot_f1"))
               if summary.get(key) is not None]
    if figures:
        lines.append(", ".join(figures) + " (final model, test split)")
    if summary.get("not_private"):
        lines.append(f"NOT PRIVATE: {summary['not_private']}")
    delta = summary.get("delta")
    at = f"at delta {float(delta):g}" if delta is not None else "(no delta recorded)"
    for unit in ("example", "device"):
        eps = (summary.get("epsilon") or {}).get(unit)
        if isinstance(eps, dict) and summary.get("dp" if unit == "example" else "device_dp"):
            lines.append(f"{unit}-level epsilon {round_figure(eps.get('max'), 2)} {at} (max over devices)")
    return "\n".join(lines)
