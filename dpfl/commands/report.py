"""``dpfl report RUN_DIR``: write the privacy budget report of a run directory (RUN_DIR/report/)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dpfl.commands.errors import exits

__all__ = ["add_parser", "run"]


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
    print(f"report written to {Path(ns.run_dir) / 'report'}")
    print(f"example-level epsilon max: {summary.get('epsilon', {}).get('example', {}).get('max')}")
    return 0
