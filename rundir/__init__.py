"""The run directory: the only code that knows its layout and file formats.

::

    RUN_DIR/config.toml      the resolved RunConfig                 RunDir.write_config
    RUN_DIR/metrics.jsonl    one JSON line per round                rundir.metrics
    RUN_DIR/ledger.sqlite    privacy events, budgets, canaries      rundir.ledger (Ledger, LedgerReader)
    RUN_DIR/checkpoints/     global model and server state          RunDir.save_checkpoint / load_checkpoint
    RUN_DIR/canaries.json    audit canaries                         rundir.records
    RUN_DIR/report/          report.md, report.html, *.png, summary.json   rundir.records.Summary
    RUN_DIR/audit/           audit.json, roc.json                   rundir.records.Audit

The bottom layer (beside the config): it imports nothing from server, client, dp, partitions,
nlu or dpfl, and not flwr.
"""

from .layout import (
    RunDir,
    RunDirError,
    hold_run_lock,
    load_global_model,
    load_model_file,
    load_model_state,
    release_run_lock,
    run_in_progress,
    audit_dir,
    canaries_path,
    claim_run_dir,
    config_path,
    global_model_path,
    is_run_dir,
    ledger_path,
    metrics_path,
    read_checkpoint_state,
    report_dir,
)
from .ledger import (
    BudgetEvent,
    CanaryRow,
    Deletion,
    DeviceRow,
    EventRow,
    Holding,
    HoldoutRelease,
    Ledger,
    LedgerError,
    LedgerReader,
    Lineage,
    LostUpdate,
    PrivacyEvent,
    RoundRow,
    RunRow,
    record_canaries,
)
from .metrics import MetricsError, append_line, read_metric_lines, read_metrics
from .records import (
    Audit,
    RecordError,
    Summary,
    read_audit,
    read_canaries_file,
    read_holdout,
    read_oos,
    read_roc,
    read_summary,
    write_audit,
    write_canaries_file,
    write_holdout,
    write_oos,
    write_summary,
)

__all__ = [
    "RunDir", "RunDirError", "audit_dir", "canaries_path", "claim_run_dir", "config_path", "global_model_path", "is_run_dir",
    "ledger_path", "metrics_path", "read_checkpoint_state", "report_dir", "hold_run_lock", "release_run_lock", "load_global_model", "load_model_file", "load_model_state",
    "run_in_progress",
    "Ledger", "LedgerReader", "LedgerError", "EventRow", "record_canaries",
    "RunRow", "DeviceRow", "RoundRow", "PrivacyEvent", "LostUpdate", "BudgetEvent", "Holding", "CanaryRow",
    "HoldoutRelease", "Deletion", "Lineage", "write_holdout", "read_holdout", "write_oos", "read_oos",
    "read_metrics", "read_metric_lines", "append_line", "MetricsError",
    "Summary", "Audit", "RecordError", "write_summary", "read_summary", "write_audit", "read_audit", "read_roc",
    "write_canaries_file", "read_canaries_file",
]
