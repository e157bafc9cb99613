"""``dpfl audit RUN_DIR``: measure a finished run's leakage beside its guarantee.

Loads the run's final global model (``checkpoints/global.pt``) and its canaries
(``canaries.json``; the run must have been made with ``--canaries M``), and runs the audits of
:mod:`audit.run`: membership inference (AUC, TPR at 1% and 0.1% FPR), the empirical epsilon
lower bounds (one-run and Clopper-Pearson), exposure and extraction. Writes
``RUN_DIR/audit/audit.json`` and ``roc.json``, then rebuilds the privacy report
(``RUN_DIR/report/``), which gains an audit section, unless ``--no-report``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dpfl.commands.errors import exits

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``dpfl audit`` on ``subparsers``; return its parser."""
    from settings.config import AUDIT_EXPOSURE_SAMPLES as DEFAULT_EXPOSURE_SAMPLES

    p = subparsers.add_parser(
        "audit",
        help="privacy audit of a finished run: membership inference, canary exposure/extraction, "
        "empirical epsilon lower bound",
        description="Measure leakage of a finished run's final model (membership inference on canaries "
        "and real examples, canary exposure and extraction) and the empirical epsilon LOWER bound it "
        "implies; writes RUN_DIR/audit/ and adds an audit section to the report.",
    )
    p.add_argument("run_dir")
    p.add_argument("--exposure-samples", type=int, default=DEFAULT_EXPOSURE_SAMPLES,
                   help="candidate secrets sampled per canary for exposure; 0 = all 10^4 (exact, about a "
                   f"minute per canary for MiniLM on 2 cores) (default: {DEFAULT_EXPOSURE_SAMPLES})")
    p.add_argument("--extraction-steps", type=int, default=100, help="model-inversion steps per canary (default: 100)")
    p.add_argument("--extraction-restarts", type=int, default=4, help="model-inversion restarts per canary (default: 4)")
    p.add_argument("--extraction-canaries", type=int, default=10,
                   help="canaries attacked by extraction, half included and half excluded; 0 = none, -1 = all "
                   "(default: 10)")
    p.add_argument("--real-samples", type=int, default=500,
                   help="real training and held-out examples scored for membership, each (default: 500)")
    p.add_argument("--confidence", type=float, default=0.95,
                   help="confidence of the epsilon lower bound (default: 0.95)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples and attacks (default: 0)")
    p.add_argument("--no-report", action="store_true", help="do not rebuild RUN_DIR/report afterwards")
    return p


@exits
def run(ns: argparse.Namespace) -> int:
    """Run ``dpfl audit``; 0 on success, 2 on bad input (one ``dpfl: error:`` line)."""
    from audit.run import AuditError, AuditOptions, audit_run
    from report import ReportError, build_report

    opts = AuditOptions(
        exposure_samples=max(0, ns.exposure_samples),
        extraction_steps=ns.extraction_steps,
        extraction_restarts=ns.extraction_restarts,
        extraction_canaries=ns.extraction_canaries,
        real_samples=max(0, ns.real_samples),
        confidence=ns.confidence,
        seed=ns.seed,
        threads=ns.threads,
    )
    run_dir = Path(ns.run_dir)
    if ns.extraction_steps < 1 or ns.extraction_restarts < 1:
        raise AuditError("--extraction-steps and --extraction-restarts must be >= 1")
    audit = audit_run(run_dir, opts, log=lambda s: print(f"audit: {s}", file=sys.stderr))
    s = audit["summary"]
    print(f"audit written to {run_dir / 'audit' / 'audit.json'}")
    print(f"membership ({s['membership_target']}): AUC {s['auc']}, TPR at 1% FPR {s['tpr_at_1pct_fpr']}, "
          f"at 0.1% FPR {s['tpr_at_0_1pct_fpr']}")
    print(f"empirical epsilon LOWER bound: {s['epsilon_lower_bound']} at delta={s['delta']:g}, "
          f"confidence {s['confidence']} (accounted epsilon: {s['epsilon_theoretical']})")
    print(f"mean exposure of included canaries: {s['mean_exposure']} bits (excluded: "
          f"{s['mean_exposure_excluded']}, chance {s['chance_exposure']}); extraction rate: {s['extraction_rate']}")
    if not ns.no_report:
        try:
            build_report(run_dir)
            print(f"report updated: {run_dir / 'report'}")
        except ReportError as exc:
            print(f"dpfl: note: the report was not rebuilt: {exc}", file=sys.stderr)
    return 0
