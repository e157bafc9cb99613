"""Read a run directory and compute what the privacy budget report states.

The numbers are recomputed from the ledger's privacy events with the run's accountant
(:mod:`dp.accounting`), not copied from the ledger's cached ``device_epsilon`` table;
the cached values are shown beside them as a cross-check.

``summary.json`` schema (the record is :class:`rundir.records.Summary`; all epsilons in nats, at ``delta``; an infinite epsilon is
written as the string ``"inf"`` because JSON has no infinity)::

    {
      "not_private": str,                          # FIRST key, present only for a run without a
                                                   # guarantee (no DP, or --reproducible-noise): why
      "run_id": str, "status": "finished" | "running", "rounds_completed": int,
      "rounds_planned": int | null, "dp": bool, "device_dp": bool, "guarantee": "yes" | "none",
      "noise_at": "device" | "aggregate" | null,   # example-level noise placement (null: dp = false)
      "reproducible_noise": bool, "noise_source": "secret" | "reproducible" | null,
      "trust_model": {"example": {"name", "trusted", "holds_against"} | null,
                      "device":  {"name", "trusted", "holds_against"} | null},
      "delta": float | null, "accountant": "pld" | "rdp",
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
    }

``median`` is over the devices that have at least one event of that unit (devices that
never trained contributed nothing); ``median_all_devices`` includes the others at 0.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dp.accounting import (
    ACCOUNTANTS,
    DEFAULT_VALUE_DISCRETIZATION_INTERVAL,
    SubsampledGaussianEvent,
    compute_epsilon,
    compute_epsilons,
    privacy_tier,
)
from partitions.activity import activity_quartiles
from rundir import LedgerError, LedgerReader, RecordError, config_path, is_run_dir, ledger_path, read_metrics, write_summary
from rundir import Summary, read_holdout
from rundir import read_audit as read_audit_record
from rundir.records import audit_path

UNITS = ("example", "device")
MAX_CURVE_POINTS = 8
# Intermediate curve points use a 4x coarser PLD grid (still a pessimistic upper bound);
# the final point is the exact summary value.
CURVE_INTERVAL_FACTOR = 4.0


class ReportError(ValueError):
    """The run directory cannot be reported on (message says why)."""


# ----------------------------------------------------------------------------- reading


@dataclass
class RunData:
    """Everything read from one run directory."""

    run_dir: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    metrics_skipped: int
    run_row: dict[str, Any] | None
    devices: dict[int, dict[str, Any]]  # device_id -> {"activity", "sample_rate"}
    rounds: list[dict[str, Any]]
    # unit -> device_id -> [(round, sigma, q, steps, max_grad_norm)]
    events: dict[str, dict[int, list[tuple[int, float, float, int, float]]]]
    ledger_epsilon: dict[str, dict[int, float]]
    budget_events: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)
    # continual setting: (round, device_id, uid) for every example a training device held
    holdings: list[tuple[int, int, int]] = field(default_factory=list)
    audit: dict[str, Any] | None = None  # RUN_DIR/audit/audit.json when present
    holdout: dict[str, Any] | None = None  # RUN_DIR/holdout.json (--holdout-per-device)
    holdout_releases: list[dict[str, Any]] = field(default_factory=list)  # ledger rows
    deletions: list[dict[str, Any]] = field(default_factory=list)  # ledger rows (--deletions)
    lineage: dict[str, Any] | None = None  # a `dpfl retrain` run's origin
    # a retrained run: unit -> device -> the parent's (sigma, q, steps) of the rounds it replaced
    replaced: dict[str, dict[int, list[tuple[float, float, int]]]] = field(default_factory=dict)


def read_config(run_dir: Path) -> dict[str, Any]:
    """Parse ``config.toml``; an absent file gives ``{}``. Raises ReportError if unparsable."""
    path = config_path(run_dir)
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ReportError(f"{path} is not valid TOML: {exc}") from exc


def read_audit(run_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``RUN_DIR/audit/audit.json`` written by ``dpfl audit`` (None if absent), and a warning if unreadable."""
    try:
        audit = read_audit_record(run_dir)
    except RecordError as exc:
        return None, f"{audit_path(run_dir)} could not be read ({exc}); the audit section is left out."
    return (audit.to_dict() if audit is not None else None), None


def read_run(run_dir: Path) -> RunData:
    """Read config, metrics and ledger of ``run_dir`` (the ledger read-only).

    Raises
    ------
    ReportError
        If ``run_dir`` does not exist or holds none of config.toml, metrics.jsonl,
        ledger.sqlite, or the ledger cannot be read.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run directory {run_dir} does not exist")
    ledger = ledger_path(run_dir)
    if not is_run_dir(run_dir):
        raise ReportError(
            f"{run_dir} holds no config.toml, metrics.jsonl or ledger.sqlite: not a run directory"
        )
    config = read_config(run_dir)
    metrics, skipped = read_metrics(run_dir)
    data = RunData(
        run_dir=run_dir, config=config, metrics=metrics, metrics_skipped=skipped,
        run_row=None, devices={}, rounds=[], events={u: {} for u in UNITS},
        ledger_epsilon={u: {} for u in UNITS}, budget_events=[],
    )
    data.audit, audit_warning = read_audit(run_dir)
    if audit_warning:
        data.warnings.append(audit_warning)
    try:
        data.holdout = read_holdout(run_dir)
    except RecordError as exc:
        data.warnings.append(f"holdout.json could not be read ({exc}); the holdout section is left out.")
    if skipped:
        data.warnings.append(
            f"{skipped} line(s) of metrics.jsonl were incomplete or not JSON and were skipped "
            "(normal for the last line of a run still being written)."
        )
    if not ledger.exists():
        data.warnings.append("ledger.sqlite is absent: no privacy events recorded yet.")
        return data
    try:
        reader = LedgerReader(ledger)
    except LedgerError as exc:
        raise ReportError(str(exc)) from exc
    try:
        run_id = config.get("run_id")
        runs = reader.runs()
        if run_id is None and len(runs) == 1:
            run_id = runs[0].run_id
        match = [r for r in runs if r.run_id == run_id] or runs[:1]
        if match:
            run_id = match[0].run_id
            data.run_row = dataclasses.asdict(match[0])
        if run_id is None:  # no run on record: nothing of the ledger belongs to this run
            return data
        reader.run_id = run_id
        for d, row in reader.devices().items():
            data.devices[d] = {"activity": row.activity, "sample_rate": row.sample_rate}
        data.rounds = [{"round": r.round, "completed": r.completed, "cohort_size": r.cohort_size}
                       for r in reader.rounds()]
        for e in reader.events():
            if e.unit not in UNITS:
                data.warnings.append(f"ignored privacy event with unknown unit {e.unit!r}")
                continue
            data.events[e.unit].setdefault(e.device_id, []).append(
                (e.round, e.noise_multiplier, e.sample_rate, e.steps, e.max_grad_norm))
        for unit in UNITS:
            data.ledger_epsilon[unit] = reader.device_epsilons(unit)
        data.budget_events = [dataclasses.asdict(b) for b in reader.budget_events()]
        data.holdings = [(h.round, h.device_id, h.uid) for h in reader.holdings()]
        data.holdout_releases = [dataclasses.asdict(h) for h in reader.holdout_releases()]
        data.deletions = [dataclasses.asdict(d) for d in reader.deletions()]
        lin = reader.lineage()
        data.lineage = dataclasses.asdict(lin) if lin is not None else None
        if lin is not None:
            data.replaced = {}
            for e in reader.replaced_events():
                data.replaced.setdefault(e.unit, {}).setdefault(e.device_id, []).append(
                    (e.noise_multiplier, e.sample_rate, e.steps))
    except LedgerError as exc:
        raise ReportError(str(exc)) from exc
    finally:
        reader.close()
    return data


# ------------------------------------------------------------------------- computing


def _finite_or_str(x: float | None) -> float | str | None:
    if x is None:
        return None
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return x


def _quantile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    if any(math.isinf(x) for x in xs):
        # Nearest rank (interpolation with inf is undefined).
        return xs[min(len(xs) - 1, max(0, math.ceil(p * len(xs)) - 1))]
    pos = p * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    if any(math.isinf(x) for x in values):
        return _quantile(values, 0.5)
    return float(statistics.median(values))


def _events_upto(rows, last_round: int | None = None) -> list[SubsampledGaussianEvent]:
    return [
        SubsampledGaussianEvent(s, q, n)
        for t, s, q, n, _ in rows
        if last_round is None or t <= last_round
    ]


def unit_epsilons(data: RunData, unit: str, delta: float, accountant: str,
                  last_round: int | None = None,
                  interval: float = DEFAULT_VALUE_DISCRETIZATION_INTERVAL) -> dict[int, float]:
    """Each device's epsilon for ``unit`` composed over its events up to ``last_round``."""
    histories = {d: _events_upto(rows, last_round) for d, rows in data.events[unit].items()}
    return compute_epsilons(histories, delta, accountant, value_discretization_interval=interval)


def example_epsilons_over_examples(
    data: RunData, delta: float, accountant: str, device_eps: dict[int, float]
) -> dict[str, Any]:
    """Example-level epsilon of each training example (not each device), at ``delta``.

    An example's privacy loss composes only the device events of the rounds in which its device
    trained *while holding it*: in the static setting that is every event of its device (so
    each example inherits its device's epsilon, and the distribution is the per-device one
    weighted by activity); in the continual setting the ledger's ``example_holdings`` say which
    examples (by stable uid) each device held in each round, so an example that arrived late or
    was deleted early composes fewer events. Examples with identical (device, rounds) histories
    are accounted once.

    Returns
    -------
    dict
        ``{"max", "median", "p90", "mean", "examples", "examples_trained", "source"}``;
        ``examples`` counts the examples the statistics are over (static: every example on a
        device; continual: every example some training device held), ``examples_trained`` those
        with at least one event; ``source`` is ``"holdings"`` or ``"device activity"``.
    """
    events = data.events["example"]
    values: list[tuple[float, int]] = []  # (epsilon, number of examples with it)
    if data.holdings:
        rounds_of: dict[tuple[int, int], list[int]] = {}
        for t, d, u in data.holdings:
            rounds_of.setdefault((d, u), []).append(t)
        groups: dict[tuple, int] = {}
        for (d, _u), ts in rounds_of.items():
            key = (d, tuple(sorted(set(ts))))
            groups[key] = groups.get(key, 0) + 1
        histories = {}
        for i, (d, ts) in enumerate(groups):
            held = set(ts)
            histories[i] = [SubsampledGaussianEvent(s, q, n) for t, s, q, n, _ in events.get(d, []) if t in held]
        eps = compute_epsilons(histories, delta, accountant)
        values = [(eps[i], n) for i, n in enumerate(groups.values())]
        source = "holdings"
    else:
        for d, info in data.devices.items():
            n = int(info.get("activity") or 0)
            if n:
                values.append((float(device_eps.get(d, 0.0)), n))
        source = "device activity"
    total = sum(n for _, n in values)
    if not total:
        return {"max": 0.0, "median": 0.0, "p90": 0.0, "mean": 0.0, "examples": 0,
                "examples_trained": 0, "source": source}
    values.sort()

    def weighted_quantile(p: float) -> float:
        need, seen = p * total, 0
        for e, n in values:
            seen += n
            if seen >= need:
                return e
        return values[-1][0]

    return {
        "max": values[-1][0],
        "median": weighted_quantile(0.5),
        "p90": weighted_quantile(0.9),
        "mean": sum(e * n for e, n in values) / total,
        "examples": total,
        "examples_trained": sum(n for e, n in values if e > 0),
        "source": source,
    }


def _curve_rounds(rounds: list[int], max_points: int) -> list[int]:
    if len(rounds) <= max_points:
        return list(rounds)
    idx = {round(i * (len(rounds) - 1) / (max_points - 1)) for i in range(max_points)}
    return [rounds[i] for i in sorted(idx)]


def epsilon_curve(data: RunData, unit: str, delta: float, accountant: str,
                  max_points: int = MAX_CURVE_POINTS) -> list[dict[str, Any]]:
    """Max and median (over devices with events so far) epsilon after selected rounds."""
    rounds = sorted({t for rows in data.events[unit].values() for t, *_ in rows}
                    | {r["round"] for r in data.rounds})
    out = []
    points = _curve_rounds(rounds, max_points)
    for t in points:
        interval = DEFAULT_VALUE_DISCRETIZATION_INTERVAL * (1.0 if t == points[-1] else CURVE_INTERVAL_FACTOR)
        eps = [e for d, e in unit_epsilons(data, unit, delta, accountant, t, interval).items()
               if any(r[0] <= t for r in data.events[unit][d])]
        out.append({"round": t, "max": max(eps) if eps else 0.0, "median": _median(eps) or 0.0})
    return out


def _param_range(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": _median(values), "max": max(values)}


def by_activity_quartile(data: RunData, unit: str, eps: dict[int, float]) -> list[dict[str, Any]]:
    """Per-device epsilon by activity quartile: who spends the privacy.

    The devices holding data are sorted by starting activity a_k (training examples; ties by
    device id) and split into four groups of (nearly) equal size, Q1 the lightest. For each:
    ``quartile`` (1-4), ``activity_min`` / ``activity_max``, ``devices``, ``devices_joined``
    (with at least one privacy event), ``rounds_joined_mean`` (events per device, devices that
    never joined counted as 0), ``epsilon_median`` / ``epsilon_max`` (0 for a device that never
    joined). Empty list with fewer than 4 such devices.
    """
    activity = {d: int(info.get("activity") or 0) for d, info in data.devices.items()}
    out = []
    for q, group in enumerate(activity_quartiles(activity)):
        values = [float(eps.get(d, 0.0)) for d in group]
        joined = [len({r[0] for r in data.events[unit].get(d, [])}) for d in group]
        out.append({
            "quartile": q + 1,
            "activity_min": activity[group[0]],
            "activity_max": activity[group[-1]],
            "devices": len(group),
            "devices_joined": sum(1 for j in joined if j > 0),
            "rounds_joined_mean": sum(joined) / len(group),
            "epsilon_median": _median(values),
            "epsilon_max": max(values),
        })
    return out


def _unit_stats(data: RunData, unit: str, eps: dict[int, float]) -> dict[str, Any]:
    values = list(eps.values())
    all_devices = set(data.devices) | set(eps)
    with_zeros = values + [0.0] * (len(all_devices) - len(values))
    ledger = data.ledger_epsilon[unit]
    max_device = max(eps, key=lambda d: eps[d]) if eps else None
    rows = [r for rs in data.events[unit].values() for r in rs]
    return {
        "max": max(values) if values else 0.0,
        "median": _median(values) if values else 0.0,
        "median_all_devices": _median(with_zeros) if with_zeros else 0.0,
        "p90": _quantile(values, 0.9) if values else 0.0,
        "min": min(values) if values else 0.0,
        "mean": (sum(values) / len(values)) if values else 0.0,
        "devices_accounted": len(values),
        "tier": privacy_tier(max(values) if values else 0.0),
        "max_device": max_device,
        "ledger_max": max(ledger.values()) if ledger else None,
        "per_device": dict(sorted(eps.items())),
        "by_activity_quartile": by_activity_quartile(data, unit, eps),
        "mechanism": {
            "noise_multiplier": _param_range([r[1] for r in rows]),
            "sample_rate": _param_range([r[2] for r in rows]),
            "steps_per_event": _param_range([float(r[3]) for r in rows]),
            "max_grad_norm": _param_range([float(r[4]) for r in rows if r[4] is not None]),
            "events": len(rows),
            "total_steps_max_device": max(
                (sum(r[3] for r in rs) for rs in data.events[unit].values()), default=0
            ),
        },
    }


RELEASE_KEYS = ("accuracy", "nfr", "pfr", "nfr_baseline", "pfr_baseline")


def _number(x: Any) -> float | None:
    """``x`` as a float when it is a number (not a bool), else None."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def releases(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The release rounds of ``metrics`` (lines with ``"release": true``), in round order.

    Each is ``{"round", "accuracy", "nfr", "pfr", "nfr_baseline", "pfr_baseline"}``: the release's
    test accuracy and its negative / positive flip rates on the test split against the previous
    release (None at the first release) and against the ``--baseline-model`` (None without one).
    Empty for a run without releases (older runs have no such keys).
    """
    rows = [m for m in metrics if m.get("release") is True]
    return [{"round": m["round"], **{k: _number(m.get(k)) for k in RELEASE_KEYS}}
            for m in sorted(rows, key=lambda m: m["round"])]


def _final(metrics: list[dict[str, Any]], key: str) -> float | None:
    for row in reversed(metrics):
        v = row.get(key)
        if _number(v) is not None:
            return float(v)
    return None


#: The trust model of each placement of the example-level noise (``noise_at`` in config.toml).
TRUST_MODELS: dict[str, dict[str, str]] = {
    "device": {
        "name": "local DP: noise on the device (trusts nobody)",
        "trusted": "nobody",
        "holds_against": "everyone who sees a device's update: the server, the other devices and every "
                         "observer of the released models",
    },
    "aggregate": {
        "name": "central DP: noise on the aggregate (trusts the aggregator)",
        "trusted": "the aggregator (the server), to add the noise and not to look at the individual clipped sums",
        "holds_against": "observers of the released models, and an aggregator that sees the cohort but only the "
                         "noisy sum (as with secure aggregation with noise shares on the devices; dpfl simulates "
                         "the noise at the server)",
    },
}
#: The trust model of device-level DP (DP-FedAvg: the server clips each update and adds the noise).
DEVICE_TRUST_MODEL: dict[str, str] = {
    "name": "central DP: DP-FedAvg on the server (trusts the aggregator)",
    "trusted": "the server, to clip each device's update and add the noise; it sees the individual updates",
    "holds_against": "observers of the released models",
}
# A recomputed epsilon counts as over its budget only above budget * (1 + this) (float noise).
OVER_BUDGET_TOLERANCE = 1e-9


def not_private_reason(any_dp: bool, reproducible: bool, zero_noise: tuple[str, ...] = ()) -> str | None:
    """Why the run has no privacy guarantee (None when it has one); the report's first line states it.

    Parameters
    ----------
    any_dp : bool
        Example-level (``dp``) or device-level (``device_dp``) DP was on.
    reproducible : bool
        ``reproducible_noise`` in config.toml: the noise was derived from the recorded seed.
    zero_noise : tuple of str
        The DP levels that were on with a noise multiplier of 0 (``--allow-zero-noise``):
        ``"example"`` and/or ``"device"``.
    """
    if zero_noise:
        return (f"the {' and '.join(zero_noise)}-level noise multiplier is 0 (--allow-zero-noise): updates were "
                "clipped but no noise was added, so epsilon is infinite and no differential privacy guarantee "
                "holds")
    if not any_dp:
        return ("dp = false and device_dp = false; no noise was added, so no differential privacy "
                "guarantee holds")
    if reproducible:
        return ("this run used --reproducible-noise; its noise can be regenerated from the seed in config.toml "
                "(so can its secret sampling decisions), so no differential privacy guarantee holds")
    return None


def noise_source_statement(reproducible: bool, any_dp: bool) -> str | None:
    """``"secret"`` (OS entropy, never recorded), ``"reproducible"`` (from the seed), or None without DP."""
    if not any_dp:
        return None
    return "reproducible" if reproducible else "secret"


def trust_model(noise_at: str | None, device_dp: bool) -> dict[str, dict[str, str] | None]:
    """The trust model each privacy unit's guarantee assumes: ``{"example": ..., "device": ...}``.

    ``noise_at`` is the example-level placement (None when example-level DP is off); each value
    is ``{"name", "trusted", "holds_against"}`` or None when that unit has no noise of its own.
    """
    return {
        "example": dict(TRUST_MODELS[noise_at]) if noise_at in TRUST_MODELS else None,
        "device": dict(DEVICE_TRUST_MODEL) if device_dp else None,
    }


def example_implied_by_device(device_stats: dict[str, Any], delta: float) -> dict[str, Any]:
    """The example-level bound implied by device-level DP when no example-level noise was added.

    One example is part of one device's data: adding, removing or changing it changes that
    device's data, which is at most removing the device and adding it back with the changed
    data (with the example counts held fixed as public metadata, so the device's q_k is the
    same in both). Device-level DP is accounted for add/remove-one-device, so group privacy over
    those two steps gives, for a device with device-level (eps_k, delta),
    (2 eps_k, (1 + e^eps_k) delta) at example level. The factor 2 is needed: one changed example
    can move a device's clipped update by up to 2 S (the clip norm), twice the sensitivity the
    device-level accounting assumes.

    Returns
    -------
    dict
        ``{"max", "median", "tier", "delta", "implied_by": "device", "device_epsilon_max",
        "devices_accounted"}``; ``delta`` is (1 + e^eps) delta at the maximum device epsilon
        (capped at 1, where the bound says nothing).
    """
    emax = float(device_stats.get("max") or 0.0)
    med = float(device_stats.get("median") or 0.0)
    d = min(1.0, (1.0 + math.exp(min(emax, 700.0))) * delta) if math.isfinite(emax) else 1.0
    return {
        "max": 2.0 * emax,
        "median": 2.0 * med,
        "tier": privacy_tier(2.0 * emax),
        "delta": d,
        "implied_by": "device",
        "device_epsilon_max": emax,
        "devices_accounted": device_stats.get("devices_accounted", 0),
    }


def budgets(cfg: dict[str, Any], dp_on: bool, device_dp: bool, budget_events: list[dict[str, Any]],
            epsilon: dict[str, Any]) -> dict[str, Any]:
    """Every per-device epsilon budget the server enforced, with how many devices reached or passed it.

    The server's example-level budget is min(``max_epsilon``, ``target_epsilon``) (both
    per-device example-level budgets; ``target_epsilon`` also calibrates sigma), its
    device-level budget ``target_epsilon_device``. A device *reached* a budget when the ledger
    has a budget event of that unit for it (its next round would have passed the budget, so it
    was not selected again); it is *over* a budget when its recomputed epsilon exceeds it,
    which the server should never allow.

    Returns
    -------
    dict
        ``{"max_epsilon", "target_epsilon", "target_epsilon_device", "epsilon_budget",
        "device_epsilon_budget", "example": unit | None, "device": unit | None}``, unit =
        ``{"epsilon", "from": [setting names], "devices_reached", "devices_reached_ids",
        "devices_over"}`` (``epsilon`` None when budget events exist but no budget is in
        config.toml).
    """
    max_eps, target, tdev = cfg.get("max_epsilon"), cfg.get("target_epsilon"), cfg.get("target_epsilon_device")
    out: dict[str, Any] = {"max_epsilon": max_eps, "target_epsilon": target, "target_epsilon_device": tdev,
                           "epsilon_budget": None, "device_epsilon_budget": None, "example": None, "device": None}
    settings = {
        "example": [(k, v) for k, v in (("max_epsilon", max_eps), ("target_epsilon", target))
                    if v is not None] if dp_on else [],
        "device": [("target_epsilon_device", tdev)] if device_dp and tdev is not None else [],
    }
    for unit in UNITS:
        reached = sorted({int(b["device_id"]) for b in budget_events if b.get("unit") == unit})
        if not settings[unit] and not reached:
            continue
        budget = min(float(v) for _, v in settings[unit]) if settings[unit] else None
        per = (epsilon.get(unit) or {}).get("per_device") or {}
        over = sorted(int(d) for d, e in per.items()
                      if budget is not None and e > budget * (1 + OVER_BUDGET_TOLERANCE))
        out[unit] = {"epsilon": budget, "from": [k for k, _ in settings[unit]], "devices_reached": len(reached),
                     "devices_reached_ids": reached, "devices_over": over}
        out["epsilon_budget" if unit == "example" else "device_epsilon_budget"] = budget
    return out


def holdout_section(data: RunData, example_stats: dict[str, Any] | None, accountant: str,
                    delta: float | None) -> dict[str, Any] | None:
    """The holdout evaluation by activity quartile, beside the training examples' epsilon by the same quartiles.

    Reads ``holdout.json`` (server.holdout) and recomputes the holdout examples' epsilon from
    the ledger's ``holdout_releases`` rows: every holdout example was read by each such release,
    one Gaussian mechanism of its noise multiplier (sensitivity 1), composed by ``accountant``.

    Returns
    -------
    dict or None
        ``{"fraction", "round", "noise_at", "noise_multiplier", "releases", "epsilon" (inf when
        not noised), "devices_asked", "devices_replied", "quartiles": [holdout.json's quartile
        + "epsilon_median" / "epsilon_max" of its training examples], "incomplete" (a release on
        record without its result file: no quartiles), "task"}``; None without a holdout.
    """
    hold = data.holdout
    rows = data.holdout_releases
    if not hold and not rows:
        return None
    if not hold:  # recorded (the counts left the devices) but stopped before holdout.json was written
        last = rows[-1]
        hold = {"round": last["round"], "noise_at": last["noise_at"], "noise_multiplier": last["noise_multiplier"],
                "devices_asked": last["devices"], "devices_replied": None, "quartiles": [], "incomplete": True}
    eps = None
    if rows and delta is not None:
        if all(float(r["noise_multiplier"]) > 0 for r in rows):
            events = [SubsampledGaussianEvent(float(r["noise_multiplier"]), 1.0, 1) for r in rows]
            eps = compute_epsilon(events, delta, accountant)
        else:
            eps = math.inf
    by_q = {q["quartile"]: q for q in (example_stats or {}).get("by_activity_quartile") or []}
    quartiles = [{**q, "epsilon_median": by_q.get(q["quartile"], {}).get("epsilon_median"),
                  "epsilon_max": by_q.get(q["quartile"], {}).get("epsilon_max")} for q in hold.get("quartiles", [])]
    return {"fraction": hold.get("fraction"), "round": hold.get("round"), "noise_at": hold.get("noise_at"),
            "noise_multiplier": hold.get("noise_multiplier"), "releases": len(rows), "epsilon": eps,
            "devices_asked": hold.get("devices_asked"), "devices_replied": hold.get("devices_replied"),
            "quartiles": quartiles, "incomplete": bool(hold.get("incomplete")), "task": data.config.get("task", "intent")}


def lineage_section(data: RunData, delta: float | None, accountant: str) -> dict[str, Any] | None:
    """A retrained run's origin, and its example- and device-level epsilon (max over devices) if the
    parent's models of the replaced rounds stay released: this run's events composed with the
    parent's events of those rounds (``replaced_events``).

    Returns
    -------
    dict or None
        The ledger's lineage fields (``parent_run_id``, ``parent_dir``, ``from_round``,
        ``removed_devices``), ``replaced_events`` (how many of the parent's events this run
        replaced) and ``epsilon_if_parent_kept``: unit -> epsilon (nats, at ``delta``; empty
        without delta or replaced events). None for a run trained from scratch.
    """
    if not data.lineage:
        return None
    out = dict(data.lineage)
    out["epsilon_if_parent_kept"] = {}
    out["replaced_events"] = sum(len(v) for per in data.replaced.values() for v in per.values())
    if delta is None:
        return out
    for unit in UNITS:
        mine = {d: [SubsampledGaussianEvent(s, q, n) for _, s, q, n, _ in rows] for d, rows in data.events[unit].items()}
        theirs = data.replaced.get(unit, {})
        if not theirs:
            continue
        both = {d: mine.get(d, []) + [SubsampledGaussianEvent(s, q, n) for s, q, n in theirs.get(d, [])]
                for d in set(mine) | set(theirs)}
        eps = compute_epsilons(both, delta, accountant)
        out["epsilon_if_parent_kept"][unit] = max(eps.values()) if eps else 0.0
    return out


def deletion_section(data: RunData, epsilon: dict[str, Any], delta: float | None) -> list[dict[str, Any]]:
    """Each deletion request with what the run's guarantee says about the deleted device's data.

    For device k deleted from round r: ``first_joined``, ``rounds_joined`` (its rounds with an
    example- or device-level event, all before r), ``examples`` (its starting activity n_k),
    ``epsilon_example`` (per example, at ``delta``) and ``epsilon_device`` (device level, when
    the run has it), and ``group`` (example-level DP extended to all n_k examples by group
    privacy: (n_k eps, n_k e^((n_k - 1) eps) delta), Dwork & Roth 2014, Theorem 2.2 and its
    approximate-DP form; ``delta`` None when that exceeds 1, where the bound says nothing).
    """
    out = []
    ex = ((epsilon.get("example") or {}).get("per_device") or {})
    dv = ((epsilon.get("device") or {}).get("per_device") or {})
    for d in data.deletions:
        k = int(d["device_id"])
        joined = sorted({r[0] for u in UNITS for r in data.events[u].get(k, [])})
        n = int((data.devices.get(k) or {}).get("activity") or 0)
        e = ex.get(k)
        group = None
        if e is not None and n > 0 and delta is not None and math.isfinite(e):
            g_delta = n * math.exp(min((n - 1) * e, 700.0)) * delta
            group = {"epsilon": n * e, "delta": g_delta if g_delta <= 1 else None}
        out.append({"device_id": k, "round": int(d["round"]), "first_joined": d.get("first_joined"),
                    "rounds_joined": len(joined), "last_joined": joined[-1] if joined else None, "examples": n,
                    "epsilon_example": e if k in ex else (0.0 if not joined else None),
                    "epsilon_device": dv.get(k), "group": group})
    return out


def compute_summary(data: RunData, baseline: RunData | None = None,
                    max_curve_points: int = MAX_CURVE_POINTS) -> dict[str, Any]:
    """Everything the report states, as a dict (inf kept as ``math.inf`` here).

    Raises
    ------
    ReportError
        If no delta is recorded in the ledger or config of a DP run.
    """
    cfg = data.config
    run = data.run_row or {}
    dp_on = bool(cfg.get("dp", True))
    device_dp = bool(cfg.get("device_dp", bool(data.events["device"])))
    any_dp = dp_on or device_dp
    noise_at = str(cfg.get("noise_at") or "device") if dp_on else None
    reproducible = bool(cfg.get("reproducible_noise", False))
    delta = run.get("target_delta") if run.get("target_delta") is not None else cfg.get("target_delta")
    accountant = run.get("accountant") or cfg.get("accountant") or "pld"
    warnings = list(data.warnings)
    if accountant not in ACCOUNTANTS:
        warnings.append(f"unknown accountant {accountant!r} in the ledger; recomputed with 'pld'")
        accountant = "pld"
    if noise_at is not None and noise_at not in TRUST_MODELS:
        warnings.append(f"unknown noise placement noise_at = {noise_at!r} in config.toml; the report assumes "
                        "'device' for its wording, and the epsilons come from the ledger's events as recorded")
        noise_at = "device"
    if delta is None and any_dp:
        raise ReportError(
            "no target_delta in ledger.sqlite (runs table) or config.toml: cannot state epsilon"
        )
    rounds_done = max([r["round"] for r in data.rounds] + [m["round"] for m in data.metrics], default=0)
    planned = cfg.get("rounds")
    status = "finished" if planned is not None and rounds_done >= int(planned) else "running"
    num_devices = len(data.devices) or cfg.get("num_devices")
    num_examples = (
        sum(int(v["activity"] or 0) for v in data.devices.values()) if data.devices else None
    )

    summary: dict[str, Any] = {}
    zero_noise = tuple(level for level, on, key in (("example", dp_on, "noise_multiplier"),
                                                     ("device", device_dp, "device_noise_multiplier"))
                       if on and cfg.get(key) is not None and float(cfg[key]) == 0.0)
    reason = not_private_reason(any_dp, reproducible, zero_noise)
    if reason is not None:
        summary["not_private"] = reason  # first key, so the file's first line says it
    summary.update({
        "run_id": cfg.get("run_id") or run.get("run_id") or data.run_dir.name,
        "status": status,
        "rounds_completed": rounds_done,
        "rounds_planned": planned,
        "dp": dp_on,
        "device_dp": device_dp,
        "guarantee": "yes" if reason is None else "none",
        "noise_at": noise_at,
        "reproducible_noise": reproducible,
        "noise_source": noise_source_statement(reproducible, any_dp),
        "trust_model": trust_model(noise_at, device_dp),
        "delta": delta,
        "accountant": accountant,
        "num_devices": num_devices,
        "num_examples": num_examples,
        "selection": {
            "mode": cfg.get("selection"),
            "activity_exponent": cfg.get("activity_exponent"),
            "selection_constant": run.get("selection_constant", cfg.get("selection_constant")),
            "calibration_note": run.get("calibration_note"),
            "expected_cohort_size": cfg.get("cohort_size"),
        },
        "config": cfg,
        "warnings": warnings,
        "metrics_lines_skipped": data.metrics_skipped,
        "epsilon": {"example": None, "device": None},
        "curves": {"example": [], "device": []},
    })

    for unit in UNITS:
        if (unit == "example" and not dp_on) or (unit == "device" and not device_dp):
            continue
        eps = unit_epsilons(data, unit, delta, accountant)
        stats = _unit_stats(data, unit, eps)
        ledger_max = stats["ledger_max"]
        if ledger_max is not None and stats["max"] < ledger_max * (1 - 1e-2):
            warnings.append(
                f"{unit}-level: the ledger's cached epsilon ({ledger_max:.4g}) exceeds the value "
                f"recomputed from its events ({stats['max']:.4g}); the larger is the safe one."
            )
        if unit == "example":
            stats["over_examples"] = example_epsilons_over_examples(data, delta, accountant, eps)
        summary["epsilon"][unit] = stats
        summary["curves"][unit] = epsilon_curve(data, unit, delta, accountant, max_curve_points)
    if not dp_on:
        dv = summary["epsilon"]["device"]
        summary["epsilon"]["example"] = (
            example_implied_by_device(dv, delta) if dv is not None
            else {"max": math.inf, "median": math.inf, "tier": "none"}
        )

    summary["devices_over_budget"] = len({b["device_id"] for b in data.budget_events})
    summary["budget_events"] = data.budget_events
    summary["budget"] = budgets(cfg, dp_on, device_dp, data.budget_events, summary["epsilon"])
    for unit in UNITS:
        over = (summary["budget"].get(unit) or {}).get("devices_over") or []
        if over:
            warnings.append(
                f"{unit}-level: {len(over)} device(s) have an epsilon ABOVE their budget of "
                f"{summary['budget'][unit]['epsilon']:g} (devices {', '.join(map(str, over[:20]))}"
                f"{', ...' if len(over) > 20 else ''}); the server should never let this happen."
            )
    summary["train_loss_reported"] = any(
        isinstance(m.get("train_loss"), (int, float)) and not isinstance(m.get("train_loss"), bool)
        for m in data.metrics
    )
    summary["final_accuracy"] = _final(data.metrics, "accuracy")
    summary["final_macro_f1"] = _final(data.metrics, "macro_f1")
    # slot filling (--task slots | joint): span-level F1 and sentence accuracy, when evaluated
    summary["final_slot_f1"] = _final(data.metrics, "slot_f1")
    summary["final_sentence_accuracy"] = _final(data.metrics, "sentence_accuracy")
    summary["metrics"] = data.metrics
    rel = releases(data.metrics)
    if rel:
        summary["releases"] = rel
    summary["pc_weight"] = float(cfg.get("pc_weight") or 0.0)
    summary["holdout"] = holdout_section(data, summary["epsilon"].get("example"), accountant, delta)
    summary["deletions"] = deletion_section(data, summary["epsilon"], delta)
    summary["lineage"] = lineage_section(data, delta, accountant)
    summary["skipped_rounds"] = [m["round"] for m in data.metrics if m.get("skipped")]
    if delta is not None:
        summary["delta_vs_units"] = {
            "one_over_examples": (1.0 / num_examples) if num_examples else None,
            "one_over_devices": (1.0 / num_devices) if num_devices else None,
        }
    if baseline is not None:
        summary["baseline"] = {
            "run_dir": str(baseline.run_dir),
            "dp": bool(baseline.config.get("dp", False)),
            "final_accuracy": _final(baseline.metrics, "accuracy"),
            "final_macro_f1": _final(baseline.metrics, "macro_f1"),
            "final_slot_f1": _final(baseline.metrics, "slot_f1"),
            "final_sentence_accuracy": _final(baseline.metrics, "sentence_accuracy"),
            "metrics": baseline.metrics,
        }
        if summary["baseline"]["dp"]:
            warnings.append("the baseline run directory has dp = true; it is not a non-private baseline")
    else:
        summary["baseline"] = None
    summary["audit"] = _audit_summary(data.audit)
    return summary


def _audit_summary(audit: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``audit`` object of the summary: audit.json's summary plus what the report shows."""
    if not audit:
        return None
    out = dict(audit["summary"])
    out["details"] = {k: audit.get(k) for k in (
        "membership", "epsilon_lower_bound", "theoretical", "exposure", "extraction", "canaries",
        "checkpoint_round", "warnings")}
    out["file"] = "audit/audit.json"
    return out


def json_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The subset written to ``summary.json`` (no per-round metrics copy), inf as "inf"."""

    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, float):
            return _finite_or_str(x) if not math.isnan(x) else None
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
    summary = compute_summary(data, baseline, max_curve_points)
    out_dir = run_dir / "report"
    out_dir.mkdir(exist_ok=True)
    images = plots.make_plots(summary, data, out_dir)
    js = json_summary(summary)
    js["plots"] = {k: p.name for k, p in images.items()}
    (out_dir / "report.md").write_text(render.markdown(summary, images), encoding="utf-8")
    (out_dir / "report.html").write_text(render.html(summary, images), encoding="utf-8")
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
