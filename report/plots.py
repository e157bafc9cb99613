"""PNG plots of the privacy budget report (matplotlib, headless Agg backend).

The per-device epsilons come from the epsilon section (``per_device``: unit -> device -> epsilon),
not from summary.json, which leaves them out for a unit whose per-device figures are withheld under
device-level DP (:func:`report.context.withheld_units`). Such a unit is not drawn against activity
(one point per device, at its public activity, would show which devices joined); its distribution
over devices (a histogram, no device ids) and its max and median against round are aggregates and
are drawn."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Collection, Mapping

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

UNIT_LABEL = {"example": "example level (one utterance)", "device": "device level (all of a device's data)"}
COLORS = {"example": "#1f77b4", "device": "#d62728"}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _save_metric_axes(fig, ax, xlabel: str, ylabel: str, path: Path) -> Path:
    """Finish a per-round metric plot (integer rounds on x, y from 0, legend, grid) and save it."""
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


PerDevice = Mapping[str, Mapping[int, float]]


def _per_device(summary: dict[str, Any], per_device: PerDevice | None) -> PerDevice:
    """Unit -> device -> epsilon of the units accounted from the ledger (not an implied bound), in unit
    order: ``per_device`` when given, else what summary.json's ``per_device`` objects hold."""
    if per_device is None:
        per_device = {u: summary["epsilon"][u]["per_device"] for u in ("example", "device")
                      if summary["epsilon"].get(u) and summary["epsilon"][u].get("per_device") is not None}
    return {u: per_device[u] for u in ("example", "device") if u in per_device}


def epsilon_vs_round(summary: dict[str, Any], path: Path, per_device: PerDevice | None = None) -> Path | None:
    """Max and median epsilon over devices after each (sampled) round, per unit."""
    units = [u for u in _per_device(summary, per_device) if summary["curves"].get(u)]
    if not units:
        return None
    fig, axes = plt.subplots(1, len(units), figsize=(5.2 * len(units), 3.6), squeeze=False)
    for ax, unit in zip(axes[0], units):
        pts = [p for p in summary["curves"][unit] if math.isfinite(p["max"])]
        rounds = [p["round"] for p in pts]
        ax.plot(rounds, [p["max"] for p in pts], "o-", color=COLORS[unit], label="max over devices")
        ax.plot(rounds, [p["median"] for p in pts], "s--", color=COLORS[unit], alpha=0.6,
                label="median (devices with events)")
        top = max([p["max"] for p in pts] or [0.0])
        budget = (summary.get("budget") or {}).get("epsilon_budget" if unit == "example" else "device_epsilon_budget")
        for level, name in ((1.0, "1 (strong)"), (10.0, "10 (weak above)")):
            if top >= level * 0.5 and level != budget:
                ax.axhline(level, color="grey", lw=0.8, ls=":")
                # at the right edge, above the line: clear of the markers, which start at the left
                ax.text(0.99, level, f"eps={name}", transform=ax.get_yaxis_transform(), ha="right", va="bottom",
                        fontsize=7, color="grey")
        if budget is not None and math.isfinite(float(budget)):
            ax.axhline(float(budget), color="black", lw=1.0, ls="--")
            ax.text(0.99, float(budget), f"budget eps={float(budget):g}", transform=ax.get_yaxis_transform(),
                    ha="right", va="bottom", fontsize=7)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"epsilon at delta={summary['delta']:g}")
        ax.set_title(UNIT_LABEL[unit], fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def epsilon_vs_activity(summary: dict[str, Any], data, path: Path, per_device: PerDevice | None = None,
                        withheld: Collection[str] = ()) -> Path | None:
    """Each device's epsilon against its starting activity (examples held), for the units not ``withheld``."""
    eps = _per_device(summary, per_device)
    units = [u for u in eps if u not in withheld]
    if not units or not data.devices:
        return None
    fig, axes = plt.subplots(1, len(units), figsize=(5.2 * len(units), 3.6), squeeze=False)
    for ax, unit in zip(axes[0], units):
        per = eps[unit]
        xs, ys = [], []
        for d, info in data.devices.items():
            e = per.get(d, 0.0)
            if math.isfinite(e):
                xs.append(info["activity"] or 0)
                ys.append(e)
        ax.scatter(xs, ys, s=14, alpha=0.7, color=COLORS[unit])
        ax.set_xlabel("device activity a_k (training examples at start)")
        ax.set_ylabel(f"epsilon at delta={summary['delta']:g}")
        ax.set_title(UNIT_LABEL[unit], fontsize=10)
        if xs and max(xs) > 0 and min(x for x in xs if x > 0) * 50 < max(xs):
            ax.set_xscale("symlog", linthresh=1)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def epsilon_histogram(summary: dict[str, Any], path: Path, per_device: PerDevice | None = None) -> Path | None:
    """Distribution of per-device epsilon (devices with events) per unit."""
    eps = _per_device(summary, per_device)
    if not eps:
        return None
    fig, axes = plt.subplots(1, len(eps), figsize=(5.2 * len(eps), 3.2), squeeze=False)
    for ax, unit in zip(axes[0], eps):
        vals = [e for e in eps[unit].values() if math.isfinite(e)]
        if vals:
            ax.hist(vals, bins=min(30, max(5, len(vals) // 3)), color=COLORS[unit], alpha=0.8)
        ax.set_xlabel(f"epsilon at delta={summary['delta']:g}")
        ax.set_ylabel("devices")
        ax.set_title(UNIT_LABEL[unit], fontsize=10)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def accuracy_vs_round(summary: dict[str, Any], path: Path) -> Path | None:
    """Accuracy and macro-F1 (and slot F1, sentence accuracy for slot tasks) per round, with the non-private baseline when given."""
    rows = [m for m in summary.get("metrics", []) if m.get("accuracy") is not None or m.get("macro_f1") is not None]
    base = (summary.get("baseline") or {}).get("metrics") or []
    base = [m for m in base if m.get("accuracy") is not None or m.get("macro_f1") is not None]
    if not rows and not base:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for key, style in (("accuracy", "o-"), ("macro_f1", "s-"), ("slot_f1", "^-"), ("sentence_accuracy", "d-")):
        pts = [(m["round"], m[key]) for m in rows if m.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=f"{key} (this run)")
        bpts = [(m["round"], m[key]) for m in base if m.get(key) is not None]
        if bpts:
            ax.plot(*zip(*bpts), style.replace("-", "--"), alpha=0.6, label=f"{key} (non-private baseline)")
    return _save_metric_axes(fig, ax, "round", "test metric", path)


def audit_roc(summary: dict[str, Any], data, path: Path) -> Path | None:
    """ROC curves of the membership attacks (RUN_DIR/audit/roc.json), linear and log-log."""
    from rundir import read_roc

    if not summary.get("audit"):
        return None
    roc = read_roc(data.run_dir)
    if roc is None:
        return None
    curves = [(k, roc.get(k)) for k in ("canaries", "real") if roc.get(k)]
    if not curves:
        return None
    names = {"canaries": "canaries (included vs excluded)", "real": "real examples (train vs test)"}
    fig, axes = plt.subplots(1, 2, figsize=(10.4, 4.0))
    for key, c in curves:
        auc = ((summary["audit"].get("details") or {}).get("membership") or {}).get(key) or {}
        label = f"{names[key]}, AUC {auc.get('auc', float('nan')):.3f}"
        for ax in axes:
            ax.step(c["fpr"], c["tpr"], where="post", label=label)
    lo = 1e-3
    for ax, log in zip(axes, (False, True)):
        grid = [lo, 1.0] if log else [0.0, 1.0]
        ax.plot(grid, grid, color="grey", ls=":", lw=0.8, label="chance")
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(lo, 1.0)
            ax.set_ylim(lo, 1.05)
            ax.set_title("log-log (low FPR)", fontsize=10)
        else:
            ax.set_title("membership inference by loss", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def accuracy_nfr_per_release(summary: dict[str, Any], path: Path) -> Path | None:
    """Accuracy and NFR against the previous release, per release round.

    None (no file) with fewer than two releases: the first release has no NFR, so one point says nothing.
    """
    rel = summary.get("releases") or []
    if len(rel) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    acc = [(r["round"], r["accuracy"]) for r in rel if r["accuracy"] is not None]
    nfr = [(r["round"], r["nfr"]) for r in rel if r["nfr"] is not None]
    lines = []
    if acc:
        lines += ax.plot(*zip(*acc), "o-", label="accuracy (test split, left axis)")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    if nfr:  # flips are a few percent at most: their own axis, or they lie flat on the floor
        right = ax.twinx()
        lines += right.plot(*zip(*nfr), "s-", color="#d62728", label="NFR vs previous release (right axis)")
        right.set_ylim(0, max(max(v for _, v in nfr) * 1.2, 1e-3))
        right.set_ylabel("negative flip rate", color="#d62728")
    ax.set_xlabel("release round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def make_plots(summary: dict[str, Any], data, out_dir: Path, per_device: PerDevice | None = None,
               withheld: Collection[str] = ()) -> dict[str, Path]:
    """Write the report's PNGs into ``out_dir``; returns name -> path of those written.

    ``per_device``: each accounted unit's epsilon by device (the epsilon section's; default: summary's
    ``per_device`` objects); ``withheld``: the units not drawn against activity (device-level DP).
    """
    out: dict[str, Path] = {}
    for name, fn in (
        ("epsilon_vs_round", lambda p: epsilon_vs_round(summary, p, per_device)),
        ("epsilon_vs_activity", lambda p: epsilon_vs_activity(summary, data, p, per_device, withheld)),
        ("epsilon_distribution", lambda p: epsilon_histogram(summary, p, per_device)),
        ("accuracy_vs_round", lambda p: accuracy_vs_round(summary, p)),
        ("audit_roc", lambda p: audit_roc(summary, data, p)),
        ("accuracy_nfr_per_release", lambda p: accuracy_nfr_per_release(summary, p)),
    ):
        path = fn(out_dir / f"{name}.png")
        if path is not None:
            out[name] = path
        else:
            stale = out_dir / f"{name}.png"
            if stale.exists():
                stale.unlink()
    return out
