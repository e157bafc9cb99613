"""The activity-selection experiment: {static, continual} x {uniform, activity} under DP.

Runs ``dpfl simulate`` four times with the same data, partition, model, privacy and compute
budget (same expected cohort size and number of rounds); only ``--setting`` and
``--selection`` change. Then it reads each run's ``metrics.jsonl`` and ledger and writes, into
``--out``:

* ``accuracy_vs_round.png``: test accuracy against round, one line per run;
* ``results.md`` and ``results.json``: final accuracy and macro-F1 of each run, the
  example-level epsilon (max over devices, and max / median over examples, at the run's delta),
  and the difference activity - uniform in each setting, with the commands that made them.

Usage (the figures in the closing note of issue 5)::

    python -m benchmarks.selection_experiment --out runs/selection \\
        --data-dir ../shared/data/banking77 -- --rounds 10 --trainable head

Everything after ``--`` goes to every ``dpfl simulate`` call unchanged. A run whose directory
already holds a finished run (all planned rounds in ``metrics.jsonl``) is not repeated, so an
interrupted experiment continues where it stopped; ``--report-only`` just re-reads the runs.

Each run is one process after the other (the machine has 2 cores: running them side by side
would only make each slower). Accuracy differences between single runs include seed noise;
``--seeds`` repeats every arm with more seeds (the table then gives the mean and the spread).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks._simulate import run_simulate

ARMS = [("static", "uniform"), ("static", "activity"), ("continual", "uniform"), ("continual", "activity")]


def _metrics(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl rows (the report's reader: incomplete lines skipped)."""
    from rundir import read_metrics

    return read_metrics(run_dir)[0]


def _finished(run_dir: Path, rounds: int | None) -> bool:
    rows = _metrics(run_dir)
    return bool(rows) and rounds is not None and max(r["round"] for r in rows) >= rounds


def _planned_rounds(run_dir: Path) -> int | None:
    import tomllib

    from rundir import config_path

    cfg = config_path(run_dir)
    if not cfg.exists():
        return None
    return int(tomllib.loads(cfg.read_text()).get("rounds", 0)) or None


def run_arm(out: Path, setting: str, selection: str, seed: int, common: list[str]) -> tuple[Path, str, float]:
    """Run (or reuse) one arm; returns (run_dir, command, seconds)."""
    run_dir = out / f"{setting}-{selection}-seed{seed}"
    cmd = ["dpfl", "simulate", "--run-dir", str(run_dir), "--setting", setting, "--selection", selection,
           "--seed", str(seed), "--no-progress", *common]
    from rundir import config_path

    text, seconds = run_simulate(cmd, run_dir, finished=_finished(run_dir, _planned_rounds(run_dir)),
                                 started=config_path(run_dir).exists())
    return run_dir, text, seconds


def summarize(run_dir: Path) -> dict:
    """Accuracy curve, final metrics and example-level epsilons of one finished run."""
    from report import build_report

    summary = build_report(run_dir)
    metrics = _metrics(run_dir)
    rows = [r for r in metrics if r.get("accuracy") is not None]
    ex = summary["epsilon"]["example"] or {}
    over = ex.get("over_examples") or {}
    return {
        "run_dir": str(run_dir),
        "curve": [(r["round"], r["accuracy"]) for r in rows],
        "final_accuracy": summary["final_accuracy"],
        "final_macro_f1": summary["final_macro_f1"],
        "delta": summary["delta"],
        "epsilon_max_device": ex.get("max"),
        "epsilon_median_device": ex.get("median"),
        "epsilon_max_example": over.get("max"),
        "epsilon_median_example": over.get("median"),
        "mean_cohort": statistics.mean(r["cohort_size"] for r in metrics),
        "cohort_examples_per_round": cohort_examples_per_round(run_dir),
    }


def cohort_examples_per_round(run_dir: Path) -> float | None:
    """Mean over rounds of the examples the cohort held (the local-training work of a round).

    From the ledger: the devices with an example-level event in round t, weighted by their
    activity (static) or by the examples they held then (continual: ``example_holdings``).
    """
    from collections import Counter

    from rundir import LedgerReader

    with LedgerReader(run_dir) as reader:
        held = sorted(Counter(h.round for h in reader.holdings()).items())
        if not held:
            activity = {d: row.activity for d, row in reader.devices().items()}
            per_round: dict[int, int] = {}
            for e in reader.events("example"):
                if e.device_id in activity:
                    per_round[e.round] = per_round.get(e.round, 0) + (activity[e.device_id] or 0)
            held = sorted(per_round.items())
    return statistics.mean(n for _, n in held) if held else None


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colors = {"uniform": "tab:blue", "activity": "tab:orange"}
    for arm, runs in results.items():
        setting, selection = arm.split("-")
        for i, r in enumerate(runs):
            if not r["curve"]:
                continue
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, "o-" if setting == "static" else "s--", color=colors[selection], alpha=0.9,
                    label=f"{setting}, {selection}" if i == 0 else None, markersize=4)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Uniform vs activity-weighted selection under DP", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:.4g}"


def write_tables(results: dict[str, list[dict]], commands: dict[str, list[str]], out: Path) -> str:
    lines = ["| setting | selection | runs | final accuracy | final macro-F1 | example eps, max over devices "
             "| example eps over examples: max / median | mean cohort | examples held by the cohort per round |",
             "|---|---|---|---|---|---|---|---|---|"]
    means: dict[str, float] = {}
    for arm, runs in results.items():
        setting, selection = arm.split("-")
        acc = _mean_sd([r["final_accuracy"] for r in runs])
        f1 = _mean_sd([r["final_macro_f1"] for r in runs])
        means[arm] = acc[0]
        spread = lambda m: fmt(m[0]) + (f" ± {m[1]:.2g}" if len(runs) > 1 else "")  # noqa: E731
        lines.append(
            f"| {setting} | {selection} | {len(runs)} | {spread(acc)} | {spread(f1)} "
            f"| {fmt(max(r['epsilon_max_device'] for r in runs))} "
            f"| {fmt(max(r['epsilon_max_example'] for r in runs))} / "
            f"{fmt(statistics.median(r['epsilon_median_example'] for r in runs))} "
            f"| {fmt(statistics.mean(r['mean_cohort'] for r in runs))} "
            f"| {fmt(statistics.mean(r['cohort_examples_per_round'] or 0 for r in runs))} |"
        )
    delta = next(iter(results.values()))[0]["delta"]
    lines.append("")
    lines.append(f"All epsilons at delta = {fmt(delta)}.")
    for setting in ("static", "continual"):
        a, u = means.get(f"{setting}-activity"), means.get(f"{setting}-uniform")
        if a is not None and u is not None:
            lines.append(f"- {setting}: activity - uniform = {a - u:+.4f} accuracy "
                         f"({(a - u) / u * 100 if u else float('nan'):+.1f} % relative).")
    lines.append("")
    lines.append("Commands:")
    lines.append("")
    for arm, cmds in commands.items():
        for c in cmds:
            lines.append(f"    {c}")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    common: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, common = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/selection", help="folder for the four runs and the results")
    p.add_argument("--data-dir", default="../shared/data/banking77")
    p.add_argument("--num-devices", type=int, default=100)
    p.add_argument("--cohort-size", type=float, default=10)
    p.add_argument("--partitioner", default="quantity-label", help="quantity and label skew by default")
    p.add_argument("--storage-cap", type=int, default=None,
                   help="continual arms: at most this many examples per device (default: no cap)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--arms", nargs="+", default=[f"{s}-{m}" for s, m in ARMS],
                   help="subset of static-uniform static-activity continual-uniform continual-activity")
    p.add_argument("--report-only", action="store_true", help="do not run; read the runs already in --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = ["--data-dir", args.data_dir, "--num-devices", str(args.num_devices), "--cohort-size",
            str(args.cohort_size), "--partitioner", args.partitioner, *common]
    results: dict[str, list[dict]] = {}
    commands: dict[str, list[str]] = {}
    for arm in args.arms:
        setting, selection = arm.split("-")
        extra = ["--storage-cap", str(args.storage_cap)] if (setting == "continual" and args.storage_cap) else []
        for seed in args.seeds:
            if args.report_only:
                run_dir = out / f"{setting}-{selection}-seed{seed}"
                text = (run_dir / "command.txt").read_text().strip() if (run_dir / "command.txt").exists() else ""
            else:
                run_dir, text, secs = run_arm(out, setting, selection, seed, base + extra)
                if text:
                    (run_dir / "command.txt").write_text(text + "\n")
                print(f"[done] {arm} seed {seed}: {secs:.0f} s", flush=True)
            if not _metrics(run_dir):
                print(f"[skip] {run_dir}: no metrics", flush=True)
                continue
            results.setdefault(arm, []).append(summarize(run_dir))
            commands.setdefault(arm, []).append(text)
    if not results:
        print("no finished runs", file=sys.stderr)
        return 1
    plot(results, out / "accuracy_vs_round.png")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(write_tables(results, commands, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
