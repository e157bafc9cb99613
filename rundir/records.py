"""Typed records of the run directory's JSON files, with the one writer and reader of each.

=========================  ===============================  ==========================================
file                       record                           written by / read by
=========================  ===============================  ==========================================
``report/summary.json``    :class:`Summary`                 ``dpfl report`` (report) / tools, tests
``audit/audit.json``       :class:`Audit`                   ``dpfl audit`` (audit) / report
``audit/roc.json``         ``{"canaries", "real"}`` ROCs    ``dpfl audit`` / report plots
``canaries.json``          ``{"version", "m", ...,          the server at run start (audit) /
                           "canaries": [entry]}``           ``dpfl audit``
=========================  ===============================  ==========================================

Conventions shared by every file: epsilons in nats at the stated delta; an infinite number is
written as the string ``"inf"`` and NaN as ``null`` (JSON has neither); files are replaced
atomically (a reader never sees a half-written one). The records keep the files' key order, so a
file read and written back is unchanged; keys a record does not know are kept in ``extra``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

from ._files import (
    AUDIT_DIR, AUDIT_FILE, CANARIES_FILE, HOLDOUT_FILE, OOS_FILE, REPORT_DIR, ROC_FILE, SUMMARY_FILE, atomic_write,
)

__all__ = [
    "RecordError", "Summary", "Audit", "write_summary", "read_summary", "write_audit", "read_audit",
    "read_roc", "write_canaries_file", "read_canaries_file", "summary_path", "audit_path",
]


class RecordError(ValueError):
    """A record file is not valid JSON of the expected shape (the message says why)."""


class _Record:
    """Shared (de)serialisation: fields in declaration order, ``_omit_if_none`` left out when None."""

    _omit_if_none: ClassVar[frozenset[str]] = frozenset()

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the file, in the file's key order (``extra`` keys last)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if v is None and f.name in self._omit_if_none:
                continue
            out[f.name] = v
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Build the record from the file's JSON object.

        Raises
        ------
        RecordError
            If ``d`` is not an object or lacks a required key.
        """
        if not isinstance(d, Mapping):
            raise RecordError(f"{cls.__name__}: not a JSON object")
        names = [f.name for f in dataclasses.fields(cls) if f.name != "extra"]
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise RecordError(f"{cls.__name__}: missing {', '.join(missing)}")
        known = {k: d[k] for k in names if k in d}
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})


# ----------------------------------------------------------------------------- summary.json


@dataclass
class Summary(_Record):
    """``RUN_DIR/report/summary.json``: what the privacy budget report states (``dpfl report``).

    Epsilons in nats at ``delta``; ``"inf"`` for an infinite epsilon (a non-private run).

    Attributes
    ----------
    run_id, status : str
        ``status`` is ``"finished"`` (all planned rounds completed), ``"running"`` or ``"stopped"``.
    rounds_completed : int
    rounds_planned : int or None
    dp, device_dp : bool
        Example-level DP on; device-level DP (DP-FedAvg) on.
    guarantee : str
        ``"yes"`` or ``"none"``.
    delta : float or None
    accountant : str
        ``"pld"`` or ``"rdp"``.
    num_devices : int or None
    num_examples : int or None
        Sum of the devices' starting activities.
    selection : dict
        ``{"mode", "activity_exponent", "selection_constant", "calibration_note", "expected_cohort_size"}``.
    config : dict
        The run's ``config.toml``.
    warnings : list of str
    metrics_lines_skipped : int
        Incomplete lines of ``metrics.jsonl``.
    epsilon : dict
        ``{"example": stats, "device": stats | None}``; stats: ``{"max", "median",
        "median_all_devices", "p90", "min", "mean", "devices_accounted", "tier", "max_device",
        "ledger_max", "per_device", "mechanism", "over_examples" (example level: {"max",
        "median", "p90", "mean", "examples", "examples_trained", "source"})}``.
    curves : dict
        unit -> ``[{"round", "max", "median"}]`` (epsilon after selected rounds).
    devices_over_budget : int
    budget_events : list of dict
        ``[{"device_id", "unit", "round", "epsilon"}]``.
    budget : dict
        ``{"target_epsilon", "epsilon_budget", "device_epsilon_budget"}``.
    final_accuracy, final_macro_f1, final_slot_f1, final_sentence_accuracy : float or None
        The last evaluated value of each metric (slot metrics for slots/joint tasks).
    skipped_rounds : list of int
    delta_vs_units : dict or None
        ``{"one_over_examples", "one_over_devices"}``; absent from the file when no delta.
    baseline : dict or None
        ``{"run_dir", "dp", "final_accuracy", "final_macro_f1", "final_slot_f1",
        "final_sentence_accuracy"}`` of a non-private run, when given.
    audit : dict or None
        audit.json's ``summary`` plus ``details`` and ``file``; None when no audit was run.
    plots : dict
        plot name -> PNG file name in ``report/``.
    extra : dict
        Keys not listed here (kept on read and write).
    """

    _omit_if_none: ClassVar[frozenset[str]] = frozenset({"delta_vs_units"})

    run_id: str
    status: str
    rounds_completed: int
    rounds_planned: int | None
    dp: bool
    device_dp: bool
    guarantee: str
    delta: float | None
    accountant: str
    num_devices: int | None
    num_examples: int | None
    selection: dict[str, Any]
    config: dict[str, Any]
    warnings: list[str]
    metrics_lines_skipped: int
    epsilon: dict[str, Any]
    curves: dict[str, Any]
    devices_over_budget: int
    budget_events: list[dict[str, Any]]
    budget: dict[str, Any]
    final_accuracy: float | None
    final_macro_f1: float | None
    final_slot_f1: float | None = None
    final_sentence_accuracy: float | None = None
    skipped_rounds: list[int] = field(default_factory=list)
    delta_vs_units: dict[str, Any] | None = None
    baseline: dict[str, Any] | None = None
    audit: dict[str, Any] | None = None
    plots: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def summary_path(run_dir: str | os.PathLike) -> Path:
    """``RUN_DIR/report/summary.json``."""
    return Path(run_dir) / REPORT_DIR / SUMMARY_FILE


def write_summary(run_dir: str | os.PathLike, summary: Summary | Mapping[str, Any]) -> Path:
    """Write ``RUN_DIR/report/summary.json`` atomically (indent 2, strict JSON).

    Parameters
    ----------
    run_dir : path
    summary : Summary or dict
        A dict must already be JSON-ready (inf as ``"inf"``); it is checked for :class:`Summary`'s
        required keys and written as given (its key order; keys :class:`Summary` does not list too).

    Returns
    -------
    pathlib.Path
        The file written.

    Raises
    ------
    RecordError
        If a dict lacks a required key.
    ValueError
        If a value is NaN or infinite (strict JSON).
    """
    if isinstance(summary, Summary):
        obj = summary.to_dict()
    else:
        Summary.from_dict(summary)  # the required keys are there
        obj = dict(summary)  # written in the caller's key order
    path = summary_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(obj, indent=2, allow_nan=False).encode("utf-8"))
    return path


def read_summary(run_dir: str | os.PathLike) -> Summary:
    """``RUN_DIR/report/summary.json`` as a :class:`Summary`.

    Raises
    ------
    FileNotFoundError
        If no report was built.
    RecordError
        If the file is not JSON or lacks a required key.
    """
    path = summary_path(run_dir)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RecordError(f"{path} is not JSON: {exc}") from exc
    return Summary.from_dict(d)


# ----------------------------------------------------------------------------- audit.json


@dataclass
class Audit(_Record):
    """``RUN_DIR/audit/audit.json``: measured leakage of a run's final model (``dpfl audit``).

    Epsilons in nats; an audit's epsilon is a LOWER bound at ``confidence``.

    Attributes
    ----------
    version : int
        1.
    run_id, run_dir, model : str
    checkpoint_round : int or None
        The round of the audited ``checkpoints/global.pt``.
    dp, device_dp : bool
    delta : float or None
    confidence : float
    canaries : dict
        ``{"m", "included", "repeats", "n_digits", "source"}``.
    membership : dict
        ``{"canaries": mi | None, "real": mi | None, "real_members", "real_nonmembers"}``;
        mi: ``{"auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "n_members", "n_nonmembers"}``.
    epsilon_lower_bound : dict
        ``{"value", "confidence", "per_method_confidence", "one_run", "clopper_pearson", "note"}``.
    theoretical : dict
        ``{"epsilon_example_max", "epsilon_example_canary_devices", "epsilon_device_max",
        "group_size", "epsilon_group", "delta_group"}``.
    exposure : dict or None
        ``{"method", "n_candidates", "samples", "chance", "mean_included", "mean_excluded", "max_included"}``.
    extraction : dict or None
        ``{"steps", "restarts", "chance_rate", "chance_digit_accuracy", "included", "excluded"}``.
    per_canary : list of dict
        ``[{"canary_id", "included", "device_id", "label", "secret", "text", "loss", "exposure", "extracted"}]``.
    options : dict
        The ``dpfl audit`` settings.
    seconds : dict
        Wall time per stage.
    warnings : list of str
    summary : dict
        ``{"epsilon_lower_bound", "confidence", "delta", "membership_target", "auc",
        "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "auc_real", "mean_exposure",
        "mean_exposure_excluded", "chance_exposure", "extraction_rate", "extraction_rate_excluded",
        "epsilon_lower_bound_ceiling", "epsilon_theoretical", "epsilon_theoretical_group",
        "canaries", "canary_repeats"}`` (what the report shows).
    extra : dict
        Keys not listed here.
    """

    version: int
    run_id: str
    run_dir: str
    model: str
    checkpoint_round: int | None
    dp: bool
    device_dp: bool
    delta: float | None
    confidence: float
    canaries: dict[str, Any]
    membership: dict[str, Any]
    epsilon_lower_bound: dict[str, Any]
    theoretical: dict[str, Any]
    exposure: dict[str, Any] | None
    extraction: dict[str, Any] | None
    per_canary: list[dict[str, Any]]
    options: dict[str, Any]
    seconds: dict[str, Any]
    warnings: list[str]
    summary: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


def audit_path(run_dir: str | os.PathLike) -> Path:
    """``RUN_DIR/audit/audit.json``."""
    return Path(run_dir) / AUDIT_DIR / AUDIT_FILE


def write_audit(run_dir: str | os.PathLike, audit: Audit | Mapping[str, Any], roc: Mapping[str, Any]) -> Path:
    """Write ``RUN_DIR/audit/roc.json`` then ``audit.json`` (each atomically, indent 1, strict JSON).

    Parameters
    ----------
    run_dir : path
    audit : Audit or dict
        JSON-ready (numbers as Python floats, inf as ``"inf"``, NaN as None); a dict is checked
        for :class:`Audit`'s required keys and written as given.
    roc : dict
        ``{"canaries": {"fpr", "tpr"} | None, "real": {"fpr", "tpr"} | None}``.

    Returns
    -------
    pathlib.Path
        ``audit.json``.

    Raises
    ------
    RecordError
        If a dict lacks a required key.
    ValueError
        If a value is NaN or infinite.
    """
    if isinstance(audit, Audit):
        obj = audit.to_dict()
    else:
        Audit.from_dict(audit)  # the required keys are there
        obj = dict(audit)  # written in the caller's key order
    out_dir = Path(run_dir) / AUDIT_DIR
    out_dir.mkdir(exist_ok=True)
    atomic_write(out_dir / ROC_FILE, json.dumps(dict(roc), indent=1, allow_nan=False).encode("utf-8"))
    atomic_write(out_dir / AUDIT_FILE, json.dumps(obj, indent=1, allow_nan=False).encode("utf-8"))
    return out_dir / AUDIT_FILE


def read_audit(run_dir: str | os.PathLike) -> Audit | None:
    """``RUN_DIR/audit/audit.json`` as an :class:`Audit`; None when no audit was run.

    Raises
    ------
    RecordError
        If the file cannot be read, is not JSON, or has no ``summary`` object (message: the cause
        alone, for the caller to prefix with the path).
    """
    path = audit_path(run_dir)
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RecordError(str(exc)) from exc
    if not isinstance(d, dict) or not isinstance(d.get("summary"), dict):
        raise RecordError("no summary object")
    return Audit.from_dict(d)


def read_roc(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``RUN_DIR/audit/roc.json`` (``{"canaries", "real"}``, each ``{"fpr", "tpr"}`` or None); None if absent or unreadable."""
    path = Path(run_dir) / AUDIT_DIR / ROC_FILE
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


# ----------------------------------------------------------------------------- canaries.json


def write_canaries_file(run_dir: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``RUN_DIR/canaries.json`` atomically (indent 1).

    ``payload``: ``{"version": 1, "m", "included", "repeats", "n_digits", "inclusion_prob",
    "note", "canaries": [{"canary_id", "text", "prefix", "secret", "label", "included",
    "repeats", "suffix", "device_id", "uids", ...}]}`` (built by ``audit.canaries_payload``).

    Returns
    -------
    pathlib.Path
        The file written.
    """
    path = Path(run_dir) / CANARIES_FILE
    atomic_write(path, json.dumps(dict(payload), indent=1).encode("utf-8"))
    return path


def read_canaries_file(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``RUN_DIR/canaries.json`` as a dict with a ``canaries`` list; None if absent.

    Raises
    ------
    RecordError
        If the file is not JSON or has no ``canaries`` list (message: the cause alone).
    """
    return _read_json_with_list(Path(run_dir) / CANARIES_FILE, "canaries", name_file=False)


def _read_json_with_list(path: Path, key: str, name_file: bool = True) -> dict[str, Any] | None:
    """The JSON object in ``path`` (None if absent), which must hold a list under ``key``.

    Raises
    ------
    RecordError
        If the file is not JSON or has no such list (the message names the file when ``name_file``).
    """
    if not path.exists():
        return None
    where = f"{path}: " if name_file else ""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise RecordError(f"{where}{exc}") from exc
    if not isinstance(d, dict) or not isinstance(d.get(key), list):
        raise RecordError(f"{where}no '{key}' list")
    return d


# ----------------------------------------------------------------------------- holdout.json


def write_holdout(run_dir: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``RUN_DIR/holdout.json`` atomically: the holdout evaluation (``--holdout-per-device``).

    ``payload``: ``{"version": 1, "round", "fraction", "noise_multiplier", "noise_at", "epsilon",
    "target_delta", "accountant", "devices_asked", "devices_replied", "quartiles": [{"quartile",
    "activity_min", "activity_max", "devices", "devices_evaluated", "examples", "accuracy",
    "noise_std_accuracy"}]}`` (built by ``server.holdout``); only noised counts.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    return _write_json(Path(run_dir) / HOLDOUT_FILE, payload)


def read_holdout(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``RUN_DIR/holdout.json`` as a dict with a ``quartiles`` list; None if absent.

    Raises
    ------
    RecordError
        If the file is not JSON or has no ``quartiles`` list.
    """
    return _read_json_with_list(Path(run_dir) / HOLDOUT_FILE, "quartiles")


def write_oos(run_dir: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``RUN_DIR/oos.json`` atomically: the out-of-scope evaluation of the final model.

    ``payload``: ``{"version": 1, "round", "score", "threshold", "threshold_source" ("public" or
    "holdout"), "quantile", "oos_label", "oos_intents": [...], "oos_index", "test": {the metrics of
    nlu.oos.oos_metrics}, "trade_off": [{"quantile", "threshold", "in_scope_accuracy",
    "in_scope_rejected", "oos_recall", "oos_precision", "overall_accuracy"}]}`` (built by
    ``server.out_of_scope``): figures on the test split and the threshold, a post-processing of
    the holdout's noised histogram or a public value. Returns the path written.
    """
    return _write_json(Path(run_dir) / OOS_FILE, payload)


def _write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented JSON (no NaN) to ``path`` atomically; return ``path``."""
    atomic_write(path, json.dumps(dict(payload), indent=1, allow_nan=False).encode("utf-8"))
    return path


def read_oos(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``RUN_DIR/oos.json`` as a dict with an ``oos_intents`` list; None if absent.

    Raises
    ------
    RecordError
        If the file is not JSON or has no ``oos_intents`` list.
    """
    return _read_json_with_list(Path(run_dir) / OOS_FILE, "oos_intents")
