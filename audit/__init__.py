"""Privacy audits: measured leakage to set beside the accounted guarantee.

Plain PyTorch / numpy / scipy (no flwr). Every epsilon here is an empirical LOWER
bound (an audit can show a run is *less* private than some epsilon, never that it is
private).

Modules
-------
bounds
    Epsilon lower bounds: one-run audit (Steinke, Nasr & Jagielski 2023) and
    Clopper-Pearson (Jagielski, Ullman & Oprea 2020).
membership
    Membership inference metrics (AUC, ROC, TPR at low FPR) and loss scores.
canaries
    Label index and secret token layout of a canary; re-exports the canaries themselves,
    which are data generation (:mod:`partitions.canaries`).
exposure
    Exposure of canary secrets (Carlini et al. 2019).
extraction
    Secret extraction by model inversion (Parikh et al. 2022).
"""

from .bounds import (
    ClopperPearsonSweepResult,
    OneRunAuditResult,
    clopper_pearson_epsilon_lower_bound,
    clopper_pearson_threshold_sweep,
    one_run_audit_from_scores,
    one_run_epsilon_lower_bound,
    one_run_p_value,
)
from .canaries import Canary, CanaryRecord, canary_uid, label_index, make_canaries, parse_uid
from .exposure import (
    canary_exposure,
    candidate_losses,
    expected_exposure_uniform,
    exposure_from_losses,
    exposures,
)
from .extraction import ExtractionReport, ExtractionResult, extract_secret, extraction_audit
from .membership import (
    MembershipMetrics,
    auc,
    loss_scores,
    membership_metrics,
    per_example_loss,
    roc_curve,
    tpr_at_fpr,
)

__all__ = [
    "Canary", "CanaryRecord", "ClopperPearsonSweepResult", "ExtractionReport",
    "ExtractionResult", "MembershipMetrics", "OneRunAuditResult", "auc", "canary_exposure",
    "canary_uid", "candidate_losses", "clopper_pearson_epsilon_lower_bound",
    "clopper_pearson_threshold_sweep", "expected_exposure_uniform", "exposure_from_losses",
    "exposures", "extract_secret", "extraction_audit", "label_index", "loss_scores",
    "make_canaries", "membership_metrics", "one_run_audit_from_scores",
    "one_run_epsilon_lower_bound", "one_run_p_value", "parse_uid", "per_example_loss",
    "roc_curve", "tpr_at_fpr",
]
