"""Releases users can live with, measured: flip rates per release with and without
positive-congruent training, and whom the final model serves, by activity quartile.

Each arm is one ``dpfl simulate`` run on BANKING77 (``--data-dir``, default
``../shared/data/banking77``): 100 devices with quantity + label skew, expected cohort 10,
example-level DP with the noise on the aggregate, target epsilon 8 at delta 1e-5, MiniLM with a
frozen encoder, every 5th round a release, and 20% of every device's examples held out of
training (``--holdout-per-device 0.2``) for the final per-device evaluation. An arm is
``SELECTION:PC[:SEED]`` (``activity`` or ``uniform`` selection; PC the ``--pc-weight``, 0 = off;
SEED the run seed, default 0: it sets the partition and the model's initialisation, never the noise).

Usage::

    python -m benchmarks.releases --out runs/releases --arms activity:0,activity:1,uniform:0,uniform:1

Everything after ``--`` goes to every ``dpfl simulate`` call. Arms run one after the other (2
cores); a finished arm is read, not repeated. It prints, per arm, accuracy and NFR / PFR at every
release, and accuracy (holdout, noised counts) beside median / max example-level epsilon by
activity quartile, and writes ``results.md`` and ``results.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks._simulate import run_simulate

COMMON = ["--num-devices", "100", "--cohort-size", "10", "--rounds", "30", "--partitioner", "quantity-label",
          "--max-length", "64", "--target-delta", "1e-5", "--target-epsilon", "8", "--noise-at", "aggregate",
          "--release-every", "5", "--eval-every", "5", "--holdout-per-device", "0.2", "--no-progress"]


def _finished(run_dir: Path) -> bool:
    from rundir import read_holdout

    return (run_dir / "holdout.json").exists() and read_holdout(run_dir) is not None


def run_arm(out: Path, arm: str, data_dir: str, extra: list[str]) -> tuple[Path, str, float]:
    """Run (or reuse) one arm; returns (run_dir, command, seconds; NaN when reused)."""
    selection, pc, *rest = arm.split(":")
    seed = rest[0] if rest else "0"
    run_dir = out / (f"{selection}-pc{pc}" + (f"-seed{seed}" if seed != "0" else ""))
    cmd = ["dpfl", "simulate", "--run-dir", str(run_dir), "--data-dir", data_dir, "--selection", selection,
           "--pc-weight", pc, "--seed", seed, *COMMON, *extra]
    text, seconds = run_simulate(cmd, run_dir, finished=_finished(run_dir), started=run_dir.exists())
    return run_dir, text, seconds


def summarize(run_dir: Path) -> dict:
    """Releases (round, accuracy, NFR, PFR), final accuracy and epsilon, and the quartile table of one run."""
    from report import build_report
    from rundir import read_holdout, read_metrics

    summary = build_report(run_dir)
    rows = read_metrics(run_dir)[0]
    releases = [{"round": r["round"], "accuracy": r["accuracy"], "nfr": r.get("nfr"), "pfr": r.get("pfr")}
                for r in rows if r.get("release")]
    ex = summary["epsilon"]["example"] or {}
    eps_q = {q["quartile"]: q for q in ex.get("by_activity_quartile") or []}
    hold = read_holdout(run_dir) or {"quartiles": []}
    quartiles = [{**q, "epsilon_median": eps_q.get(q["quartile"], {}).get("epsilon_median"),
                  "epsilon_max": eps_q.get(q["quartile"], {}).get("epsilon_max")} for q in hold["quartiles"]]
    flips = [r["nfr"] for r in releases if r["nfr"] is not None]
    return {"run_dir": str(run_dir), "final_accuracy": summary["final_accuracy"], "epsilon_max": ex.get("max"),
            "delta": summary["delta"], "releases": releases, "nfr_mean": sum(flips) / len(flips) if flips else None,
            "holdout_epsilon": hold.get("epsilon"), "holdout_noise_at": hold.get("noise_at"), "quartiles": quartiles}


def _f(x, nd=3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def write_tables(results: dict[str, dict], commands: dict[str, str], seconds: dict[str, float], out: Path) -> str:
    """Write ``results.md`` and ``results.json`` into ``out`` (per arm, the mean over seeds, per release,
    by quartile, the commands); return the markdown."""
    lines = ["# Releases: flip rates with and without positive-congruent training; accuracy and epsilon by quartile", ""]
    lines += ["| arm | final accuracy | example-level epsilon (max) | mean NFR over releases | seconds |", "|---|---|---|---|---|"]
    # (seconds: wall time of the arm's run on this machine; an arm read back from an earlier run shows -)
    for arm, r in results.items():
        lines.append(f"| {arm} | {_f(r['final_accuracy'])} | {_f(r['epsilon_max'], 2)} at delta {r['delta']:g} | "
                     f"{_f(r['nfr_mean'])} | {_f(seconds.get(arm), 0)} |")
    groups: dict[str, list[dict]] = {}
    for arm, r in results.items():
        selection, pc, *_ = arm.split(":")
        groups.setdefault(f"{selection}:{pc}", []).append(r)
    if any(len(g) > 1 for g in groups.values()):
        lines += ["", "Mean over seeds (± standard deviation; NFR is each run's mean over its releases after the first):", "",
                  "| selection:pc-weight | seeds | final accuracy | mean NFR | Q1 holdout accuracy | Q4 holdout accuracy |",
                  "|---|---|---|---|---|---|"]
        for key, rs in groups.items():
            def ms(vals):
                vals = [v for v in vals if v is not None]
                if not vals:
                    return "-"
                m = sum(vals) / len(vals)
                sd = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
                return f"{m:.3f} ± {sd:.3f}"
            q = lambda r, i: r["quartiles"][i]["accuracy"] if len(r["quartiles"]) == 4 else None  # noqa: E731
            lines.append(f"| {key} | {len(rs)} | {ms([r['final_accuracy'] for r in rs])} | {ms([r['nfr_mean'] for r in rs])} | "
                         f"{ms([q(r, 0) for r in rs])} | {ms([q(r, 3) for r in rs])} |")
    lines += ["", "Per release (accuracy / NFR / PFR against the previous release):", ""]
    rounds = sorted({x["round"] for r in results.values() for x in r["releases"]})
    lines += ["| arm | " + " | ".join(f"round {t}" for t in rounds) + " |", "|---|" + "---|" * len(rounds)]
    for arm, r in results.items():
        by = {x["round"]: x for x in r["releases"]}
        cells = [f"{_f(by[t]['accuracy'])} / {_f(by[t]['nfr'])} / {_f(by[t]['pfr'])}" if t in by else "-" for t in rounds]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "By activity quartile (Q1 lightest): holdout accuracy of the final model (noised counts) and "
              "the training examples' per-device epsilon (median / max):", ""]
    lines += ["| arm | " + " | ".join(f"Q{q}" for q in range(1, 5)) + " | holdout epsilon |", "|---|---|---|---|---|---|"]
    for arm, r in results.items():
        cells = [f"acc {_f(q['accuracy'])} (±{_f(q['noise_std_accuracy'])}, {q['examples']} ex.); eps "
                 f"{_f(q['epsilon_median'], 2)} / {_f(q['epsilon_max'], 2)}" for q in r["quartiles"]]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {_f(r['holdout_epsilon'], 2)} |")
    lines += ["", "Commands:", ""] + [f"- `{c}`" for c in commands.values()]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"results": results, "commands": commands}, indent=1))
    return text


def main(argv: list[str] | None = None) -> int:
    """Run (or read) every arm of ``--arms``, print and write the tables; return the exit code (0)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/releases")
    p.add_argument("--data-dir", default="../shared/data/banking77")
    p.add_argument("--arms", default="activity:0,activity:1,uniform:0,uniform:1")
    ns = p.parse_args(argv)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    results, commands, seconds = {}, {}, {}
    for arm in ns.arms.split(","):
        run_dir, cmd, secs = run_arm(out, arm, ns.data_dir, extra)
        results[arm], commands[arm], seconds[arm] = summarize(run_dir), cmd, secs
    print(write_tables(results, commands, seconds, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
