"""Build the privacy budget report of a run directory: compute every section, write report.md,
report.html, the plots and summary.json.

Each section (:mod:`report.sections`, one module each, in reading order) computes a typed object
from the run (:mod:`report.rundata`, :mod:`report.context`) and renders its own blocks; this module
runs them and assembles ``summary.json`` from their contributions. The numbers are recomputed from the ledger's privacy events with the run's accountant
(:mod:`dp.accounting`), not copied from the ledger's cached ``device_epsilon`` table;
the cached values are shown beside them as a cross-check.

``summary.json`` schema (the record is :class:`rundir.records.Summary`; all epsilons in nats, at ``delta``; an infinite epsilon is
written as the string ``"inf"`` because JSON has no infinity)::

    {
      "not_private": str,                          # FIRST key, present only for a run without a
                                                   # guarantee (no DP, or --reproducible-noise): why
      "run_id": str, "status": "finished" | "running" | "stopped", "rounds_completed": int,
      "rounds_planned": int | null, "dp": bool, "device_dp": bool, "guarantee": "yes" | "none",
      "noise_at": "device" | "aggregate" | "secure" | null,   # example-level noise placement (null: dp = false)
      "reproducible_noise": bool, "noise_source": "secret" | "reproducible" | null,
      "trust_model": {"example": {"name", "trusted", "holds_against"} | null,
                      "device":  {"name", "trusted", "holds_against"} | null},
      "delta": float | null, "accountant": "pld" | "rdp",   # the one the epsilons were composed with:
                                                   # "rdp" (integer orders) for a secure run, whatever
                                                   # config.toml names
      "num_devices": int, "num_examples": int | null,
      "epsilon": {
        "example": {"max", "median", "median_all_devices", "p90", "min", "mean",
                    "devices_accounted", "tier", "max_device", "ledger_max",
                    "by_activity_quartile": [{"quartile", "activity_min", "activity_max", "devices",
                                              "devices_joined", "rounds_joined_mean",
                                              "epsilon_median", "epsilon_max"}],   # Q1 = lightest
                    "over_examples": {"max", "median", "p90", "mean", "examples",
                                      "examples_trained", "source"}},
        "device":  {... same keys ...} | null      # null when device-level DP is off
      },                                           # dp = false with device_dp: "example" is the bound
                                                   # implied by device level, {"max", "median", "tier",
                                                   # "delta", "implied_by": "device", ...} (2 eps_dev)
      "per_device_withheld": {"units": [str], "reason": str},   # present only under device-level DP with
                                                   # per-device figures withheld (see below)
      "devices_over_budget": int,                  # devices removed from selection for a budget
      "budget_events": [{"device_id", "unit", "round", "epsilon"}],   # epsilon the next round would reach
      "budget": {"max_epsilon", "target_epsilon", "target_epsilon_device",
                 "epsilon_budget", "device_epsilon_budget",           # the budgets the server enforced
                 "example" | "device": {"epsilon", "from", "devices_reached", "devices_reached_ids",
                                        "devices_over"} | null},
      "train_loss_reported": bool,                 # only runs without DP carry a training loss
      "final_accuracy": float | null, "final_macro_f1": float | null,
      "final_slot_f1": float | null, "final_sentence_accuracy": float | null,   # slots/joint tasks
      "baseline": {"final_accuracy", "final_macro_f1", "final_slot_f1",
                   "final_sentence_accuracy", "run_dir"} | null,
      "releases": [{"round", "accuracy", "nfr", "pfr", "nfr_baseline", "pfr_baseline"}],
                                                   # present only when some round's model is a release
                                                   # ("release": true in metrics.jsonl), in round order;
                                                   # nfr/pfr: flip rates on the test split against the
                                                   # previous release (null at the first), *_baseline
                                                   # against --baseline-model (null without one)
      "metrics_lines_skipped": int, "warnings": [str],
      "audit": {"epsilon_lower_bound", "confidence", "delta", "auc", "tpr_at_1pct_fpr",
                "tpr_at_0_1pct_fpr", "mean_exposure", "extraction_rate", ...} | null
                                                   # from RUN_DIR/audit/audit.json (dpfl audit);
                                                   # null when no audit was run
      "out_of_scope": {"threshold", "threshold_source": "public" | "holdout", "quantile" | null, "score",
                       "oos_label", "oos_intents": [str], "oos_index" | null, "in_scope_accuracy",
                       "closed_set_accuracy", "oos_recall", "oos_precision", "overall_accuracy",
                       "in_scope_rejected", "auroc", "in_scope", "out_of_scope",
                       "threshold_epsilon"} | null
                                                   # from RUN_DIR/oos.json (--oos-label /
                                                   # --oos-holdout-intents); figures on the test
                                                   # split; threshold_epsilon: the holdout's epsilon
                                                   # when the threshold came from the holdout, else 0
    }

``median`` is over the devices that have at least one event of that unit (devices that
never trained contributed nothing); ``median_all_devices`` includes the others at 0.

Under device-level DP (``device_dp``) which devices joined a round is secret (the device-level
guarantee is amplified by the secret Poisson selection of devices), so the report is a release of
aggregates only for every unit whose per-device figures depend on participation
(:func:`report.context.withheld_units`; ``per_device_withheld`` lists them): for such a unit
``epsilon.<unit>`` has no ``max_device`` and no ``per_device``, ``budget.<unit>`` has no
``devices_reached_ids`` and no ``devices_over`` (``devices_over_count`` instead), ``budget_events``
leaves out the unit's events, and the epsilon-against-activity plot leaves out the unit. A deletion
row then has no ``first_joined``, ``rounds_joined``, ``last_joined``, ``epsilon_example`` or ``group``
(:func:`report.sections.deletions.withheld_fields`). Without device-level DP nothing is withheld.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from report.context import Facts, not_private_reason, resolve
from report.rundata import UNITS, ReportError, RunData, read_audit, read_config, read_run
from report.sections import compute_all, render_all, summary_of
from report.stats import finite_or_str
from rundir import Summary, write_summary

__all__ = ["build_report", "compute_summary", "compute_sections", "json_summary", "read_run", "ReportError",
           "RunData", "not_private_reason", "read_config", "read_audit", "UNITS", "SUMMARY_KEYS"]

MAX_CURVE_POINTS = 8

#: The summary's top-level keys in their order (``compute_summary``'s dict; ``summary.json`` is then
#: written by :class:`rundir.records.Summary`, its declared fields first). Each key is given by
#: exactly one section (its ``SECTION.keys``); ``metrics`` is left out of the file.
SUMMARY_KEYS = (
    "not_private", "run_id", "status", "rounds_completed", "rounds_planned", "dp", "device_dp", "guarantee",
    "noise_at", "reproducible_noise", "noise_source", "trust_model", "delta", "accountant", "num_devices",
    "num_examples", "selection", "config", "warnings", "metrics_lines_skipped", "epsilon", "curves", "per_device_withheld",
    "devices_over_budget", "budget_events", "budget", "train_loss_reported", "final_accuracy", "final_macro_f1",
    "final_slot_f1", "final_sentence_accuracy", "metrics", "releases", "pc_weight", "holdout", "out_of_scope",
    "deletions", "lineage", "skipped_rounds", "delta_vs_units", "baseline", "audit",
)


def compute_sections(data: RunData, baseline: RunData | None = None,
                     max_curve_points: int = MAX_CURVE_POINTS) -> tuple[Facts, dict[str, Any]]:
    """The run's shared facts and every section's typed object by name (None: nothing to state).

    Raises
    ------
    ReportError
        If no delta is recorded in the ledger or config of a DP run.
    """
    ctx = resolve(data, baseline, max_curve_points)
    return ctx.facts, compute_all(ctx)


def compute_summary(data: RunData, baseline: RunData | None = None,
                    max_curve_points: int = MAX_CURVE_POINTS) -> dict[str, Any]:
    """Everything the report states, as a dict in :data:`SUMMARY_KEYS` order (inf kept as ``math.inf``;
    epsilons in nats at ``delta``).

    Raises
    ------
    ReportError
        If no delta is recorded in the ledger or config of a DP run.
    """
    _, objects = compute_sections(data, baseline, max_curve_points)
    return summary_of(objects, SUMMARY_KEYS)


def json_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The subset written to ``summary.json`` (no per-round metrics copy), inf as "inf"."""

    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, float):
            return finite_or_str(x) if not math.isnan(x) else None
        return x

    out = {k: v for k, v in summary.items() if k not in ("metrics",)}
    if out.get("baseline"):
        out["baseline"] = {k: v for k, v in out["baseline"].items() if k != "metrics"}
    return clean(out)


def build_report(run_dir: Path, baseline_dir: Path | None = None, *,
                 max_curve_points: int = MAX_CURVE_POINTS) -> dict[str, Any]:
    """Write ``RUN_DIR/report/`` (report.md, report.html, *.png, summary.json).

    Works on a finished run and on one still running (the ledger is opened read-only;
    a half-written last metrics line is skipped).

    Parameters
    ----------
    run_dir : pathlib.Path
        The run directory (config.toml, metrics.jsonl, ledger.sqlite).
    baseline_dir : pathlib.Path, optional
        A non-private run of the same task, for utility comparison.
    max_curve_points : int
        Rounds at which the epsilon-vs-round curves are recomputed from the ledger.

    Returns
    -------
    dict
        The JSON summary as written to ``summary.json`` (see module docstring).

    Raises
    ------
    ReportError
        If the run directory (or baseline directory) is missing or unreadable, or
        a DP run has no recorded delta.
    """
    from report import plots, render

    run_dir = Path(run_dir)
    data = read_run(run_dir)
    baseline = read_run(Path(baseline_dir)) if baseline_dir is not None else None
    facts, objects = compute_sections(data, baseline, max_curve_points)
    summary = summary_of(objects, SUMMARY_KEYS)
    out_dir = run_dir / "report"
    out_dir.mkdir(exist_ok=True)
    eps = objects["epsilon"]
    images = plots.make_plots(summary, data, out_dir,
                              per_device={u: s.per_device for u, s in eps.accounted.items()},
                              withheld=facts.withheld)
    js = json_summary(summary)
    js["plots"] = {k: p.name for k, p in images.items()}
    blocks = render_all(objects, facts, images)
    title = objects["title"]
    (out_dir / "report.md").write_text(render.markdown(blocks, images), encoding="utf-8")
    (out_dir / "report.html").write_text(render.html(blocks, images, run_id=title.run_id,
                                                     not_private=title.not_private), encoding="utf-8")
    write_summary(run_dir, _NotPrivateFirst.from_dict(js))
    return js


class _NotPrivateFirst(Summary):
    """The summary record with ``not_private`` (when present) as the file's first key.

    :class:`rundir.records.Summary` writes keys it does not declare last; a run without a
    guarantee must say so in the first line of ``summary.json``.
    """

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`Summary.to_dict`, with ``not_private`` moved to the front."""
        d = super().to_dict()
        if "not_private" in d:
            d = {"not_private": d.pop("not_private"), **d}
        return d
