"""The privacy-utility frontier on BANKING77: test accuracy against the epsilon that bought it.

Each arm is one ``dpfl simulate`` run on BANKING77 (``--data-dir``, default
``../shared/data/banking77``), 100 devices with quantity + label skew
(``--partitioner quantity-label``), expected cohort 10, delta 1e-5, MiniLM, max length 64.
An arm is ``NOISE:TRAINABLE:EPS[:LEVERS]``:

* NOISE ``device``: example-level DP-SGD on every device (noise at every local step; trusts nobody);
* NOISE ``aggregate``: example-level DP with the noise added once per round to the cohort's sum
  of per-example-clipped gradients (central DP; trusts the aggregator);
* NOISE ``secure``: the ``aggregate`` arm with the noise added on the devices (Skellam shares) and
  summed under secure aggregation (SecAgg+; trusts no server; ``--noise-at secure``, 20 bits);
* NOISE ``device-level``: DP-FedAvg (each device's update clipped and noised on the server)
  over 1,000 devices of about 10 examples, expected cohort 100; EPS is the device-level epsilon;
* NOISE ``nonoise``: the ``aggregate`` arm's algorithm with noise multiplier 0 (clipped sums,
  no noise: what the noise costs; epsilon infinity; EPS ignored, write ``-``);
* NOISE ``nodp``: the ``aggregate`` arm's algorithm without DP, neither clipping nor noise
  (``--no-dp``; EPS ignored);
* NOISE ``none``: federated training without DP (FedAvg of local training, ``--no-dp --noise-at
  device``; EPS ignored);
* NOISE ``central``: centralized training without DP (all examples on one device).

TRAINABLE is ``head`` (frozen encoder: a private linear probe), ``lora`` or ``all``. EPS is the
target epsilon: the noise multiplier is calibrated through the accountant for the arm's
schedule (``--target-epsilon``; for device level from the devices' largest selection
probability) and the same value is every device's budget.

LEVERS (optional, ``+``-joined) change one setting of the arm, for the ablation of issue 24's
levers: ``random`` (``--head-init random``: the head starts random; by default it starts from the
label names, ``--head-init auto``), ``labels`` (``--head-init label-names``), ``capK``
(``--participation-cap K``: the noise calibrated for K of a device's rounds), ``adaptive``
(``--adaptive-clip-quantile 0.5``: the clip norm follows the median norm; ``adaptiveG``: the G
quantile, 0 < G < 1), ``clipX`` (the clip norm,
C and S, is X instead of the arm's; with ``adaptive``, where it starts), ``bandsB`` (``--bands B``:
correlated noise across rounds, banded matrix factorization with B bands and cyclic selection),
``cyclicB`` (the same cyclic selection and accounting with independent noise: the correlation's ablation),
``oosP`` (out-of-scope detection, issue 26: P percent of the intents held out of training as out of
scope, ``--oos-holdout-intents P/100`` with the fixed split seed 0, and ``--holdout-per-device 0.1``
whose noised confidence histogram chooses the threshold; the record gains ``oos``), e.g.
``aggregate:head:1:random+cap20``, ``aggregate:head:1:clip10+adaptive`` or ``aggregate:head:8:oos25``.

Usage::

    python -m benchmarks.privacy_utility --arms aggregate:head:8,aggregate:head:3 --json
    python -m benchmarks.privacy_utility --arms default --out runs/privacy_utility

Every arm runs after the previous one (the machine has 2 cores) in ``--out/<arm>``; an arm
whose run directory already holds a finished run is read, not repeated, and a stopped arm is
resumed, so the benchmark continues where it stopped. It prints one JSON object per arm with
``--json`` (``noise``, ``trainable``, ``target_epsilon``, ``epsilon``: the example-level
epsilon, max over devices; ``epsilon_device``: device level where it applies; ``delta``,
``accuracy``, ``macro_f1``, ``rounds``, ``seconds``, ``command``), and writes ``results.md``
(the table and every arm's exact command) and ``frontier.png`` (accuracy against epsilon).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_ARMS = (
    "nonoise:head:-,nodp:head:-,none:head:-,central:head:-,"
    "aggregate:head:1,aggregate:head:3,aggregate:head:8,"
    "device:head:8,device-level:head:8,aggregate:lora:8"
)
DELTA = 1e-5

#: Per-arm settings (the best the benchmark found near epsilon 8; see the README). The server learning rate is
#: the default (0.1 with the label-name head and FedAdam, 0.2 with a random head: RunConfig.resolved_server_learning_rate).
COMMON = ["--partitioner", "quantity-label", "--max-length", "64", "--target-delta", str(DELTA), "--model", "minilm"]
SETTINGS = {
    "aggregate": ["--noise-at", "aggregate", "--num-devices", "100", "--cohort-size", "10", "--rounds", "60",
                  "--activity-exponent", "2", "--strategy", "fedadam",
                  "--server-ema", "0.9", "--max-grad-norm", "1.0"],
    "device": ["--noise-at", "device", "--num-devices", "100", "--cohort-size", "10", "--rounds", "10",
               "--local-epochs", "1", "--batch-size", "32", "--strategy", "fedavg", "--server-ema", "0"],
    # DP-FedAvg: one local epoch of SGD (step 2.0 on the head), each update clipped to S = 1, server
    # SGD 1.5 on the noisy mean update (tuned on cached features; see the README)
    "device-level": ["--no-dp", "--device-dp", "--num-devices", "1000", "--cohort-size", "100",
                     "--selection", "uniform", "--rounds", "150", "--local-epochs", "1", "--optimizer", "sgd",
                     "--head-learning-rate", "2.0", "--update-clip-norm", "1.0",
                     "--strategy", "fedavg", "--server-learning-rate", "1.5", "--server-ema", "0", "--eval-every", "50"],
    # the aggregate arm with the noise from the devices under secure aggregation (mechanisms/secure.py)
    "secure": ["--noise-at", "secure", "--num-devices", "100", "--cohort-size", "10", "--rounds", "60",
               "--activity-exponent", "2", "--strategy", "fedadam",
               "--server-ema", "0.9", "--max-grad-norm", "1.0"],
    "nonoise": ["--noise-at", "aggregate", "--num-devices", "100", "--cohort-size", "10", "--rounds", "60",
                "--activity-exponent", "2", "--strategy", "fedadam",
                "--server-ema", "0.9", "--max-grad-norm", "1.0", "--noise-multiplier", "0", "--allow-zero-noise"],
    # the aggregate arm's algorithm without DP: neither clipping nor noise (--no-dp runs it; mechanisms/fedsgd.py)
    "nodp": ["--no-dp", "--noise-at", "aggregate", "--num-devices", "100", "--cohort-size", "10", "--rounds", "60",
             "--activity-exponent", "2", "--strategy", "fedadam",
             "--server-ema", "0.9"],
    "none": ["--no-dp", "--noise-at", "device", "--num-devices", "100", "--cohort-size", "10", "--rounds", "30", "--activity-exponent", "2",
             "--local-epochs", "1", "--strategy", "fedavg", "--server-ema", "0"],
    "central": ["--no-dp", "--noise-at", "device", "--num-devices", "1", "--cohort-size", "1", "--partitioner", "iid", "--rounds", "5",
                "--local-epochs", "1", "--strategy", "fedavg", "--server-ema", "0"],
}
TRAINABLE_SETTINGS = {
    "head": ["--trainable", "head"],
    # LoRA backpropagates through the whole encoder for every sampled example: a tenth of the
    # examples per round (sample rate 0.1) keeps an arm near 10 minutes on 2 cores; adapters
    # need a far smaller server step than a linear head.
    # (a trained encoder has no feature cache: evaluating 3,080 test utterances costs ~30 s, so every 20 rounds)
    "lora": ["--trainable", "lora", "--sample-rate", "0.1", "--server-learning-rate", "0.02", "--eval-every", "20"],
    "all": ["--trainable", "all", "--sample-rate", "0.1", "--server-learning-rate", "0.005", "--rounds", "30",
            "--eval-every", "10"],
}


def lever_args(levers: str) -> list[str]:
    """The ``dpfl simulate`` flags of an arm's LEVERS (``+``-joined; see the module docstring).

    Raises
    ------
    SystemExit
        For an unknown lever.
    """
    args: list[str] = []
    for lever in filter(None, levers.split("+")):
        if lever in LEVERS:
            args += LEVERS[lever]
        elif lever.startswith("cap") and lever[3:].isdigit() and int(lever[3:]) >= 1:
            args += ["--participation-cap", lever[3:]]
        elif lever.startswith("adaptive") and _positive(lever[8:]) and float(lever[8:]) < 1:
            args += ["--adaptive-clip-quantile", lever[8:]]
        elif lever.startswith("bands") and lever[5:].isdigit() and int(lever[5:]) >= 1:
            args += ["--bands", lever[5:]]
        elif lever.startswith("cyclic") and lever[6:].isdigit() and int(lever[6:]) >= 1:
            args += ["--bands", lever[6:], "--bands-noise", "independent"]
        elif lever.startswith("oos") and lever[3:].isdigit() and 0 < int(lever[3:]) < 100:
            args += ["--oos-holdout-intents", f"{int(lever[3:]) / 100:g}", "--holdout-per-device", "0.1"]
        elif lever.startswith("clip") and _positive(lever[4:]):
            args += ["--max-grad-norm", lever[4:], "--update-clip-norm", lever[4:]]
        else:
            raise SystemExit(f"--arms: unknown lever {lever!r} (one of {sorted(LEVERS)}, capK, clipX, adaptiveG, bandsB, "
                             "cyclicB or oosP)")
    return args


def _positive(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


#: Named LEVERS of an arm (issue 24's levers for strict budgets), besides ``capK`` (--participation-cap K)
#: and ``clipX`` (the clip norm, C and S, starts at X instead of the arm's).
LEVERS = {
    "random": ["--head-init", "random"],  # the head starts random (the default starts from the label names)
    "labels": ["--head-init", "label-names"],
    "adaptive": ["--adaptive-clip-quantile", "0.5"],  # the clip norm follows the median norm (Andrew et al. 2021)
}


def parse_arm(text: str) -> tuple[str, str, float | None]:
    """``"NOISE:TRAINABLE:EPS[:LEVERS]"`` -> (noise, trainable, target epsilon or None); LEVERS are
    checked by :func:`lever_args`.

    Raises
    ------
    SystemExit
        For an unknown NOISE, TRAINABLE or lever, or an EPS that is not a positive number (or ``-``).
    """
    parts = text.strip().split(":")
    if len(parts) not in (3, 4):
        raise SystemExit(f"--arms: {text!r} is not NOISE:TRAINABLE:EPS[:LEVERS]")
    if len(parts) == 4:
        lever_args(parts[3])
    noise, trainable, eps = parts[:3]
    if noise not in SETTINGS:
        raise SystemExit(f"--arms: NOISE must be one of {sorted(SETTINGS)}, got {noise!r}")
    if trainable not in TRAINABLE_SETTINGS:
        raise SystemExit(f"--arms: TRAINABLE must be one of {sorted(TRAINABLE_SETTINGS)}, got {trainable!r}")
    if noise in ("none", "nonoise", "nodp", "central"):
        return noise, trainable, None
    try:
        value = float(eps)
    except ValueError:
        raise SystemExit(f"--arms: EPS must be a number, got {eps!r}") from None
    if not value > 0:
        raise SystemExit(f"--arms: EPS must be > 0, got {eps!r}")
    return noise, trainable, value


def device_level_sigma(target: float, rounds: int, q: float) -> float:
    """sigma_u that keeps a device selected with probability ``q`` in each of ``rounds`` rounds at ``target`` (PLD)."""
    from dp.accounting import calibrate_noise_multiplier

    return calibrate_noise_multiplier(target, DELTA, schedule=[(q, rounds)], accountant="pld")


def arm_command(noise: str, trainable: str, eps: float | None, run_dir: Path, data_dir: str, seed: int,
                extra: list[str], levers: str = "") -> list[str]:
    """The exact ``dpfl simulate`` command of one arm (``levers``: its LEVERS field, :func:`lever_args`)."""
    args = ["dpfl", "simulate", "--run-dir", str(run_dir), "--data-dir", data_dir, "--seed", str(seed),
            "--no-progress", *COMMON, *SETTINGS[noise]]
    if noise in ("aggregate", "secure", "nonoise") or trainable != "lora":
        args += TRAINABLE_SETTINGS[trainable]  # (the later of two equal flags wins: arm settings override)
    else:
        args += ["--trainable", "lora"]
    if noise in ("aggregate", "secure", "device"):
        args += ["--target-epsilon", f"{eps:g}"]
    if noise == "device-level":
        rounds = int(args[args.index("--rounds") + 1])
        q = float(args[args.index("--cohort-size") + 1]) / float(args[args.index("--num-devices") + 1])
        lev = lever_args(levers)
        if "--bands" in lev:  # cyclic selection (bandsB, cyclicB): q_k = b m / K in the ceil(T / b) rounds a device may join
            bands = int(lev[lev.index("--bands") + 1])
            rounds, q = -(-rounds // bands), min(1.0, q * bands)
        args += ["--device-noise-multiplier", f"{device_level_sigma(eps, rounds, q):.6f}",
                 "--target-epsilon-device", f"{eps:g}"]
    return args + lever_args(levers) + extra


def _metrics(run_dir: Path) -> list[dict]:
    from rundir import read_metrics

    return read_metrics(run_dir)[0] if run_dir.exists() else []


def _planned(run_dir: Path) -> int | None:
    import tomllib

    from rundir import config_path

    path = config_path(run_dir)
    return int(tomllib.loads(path.read_text())["rounds"]) if path.exists() else None


def run_arm(arm: str, out: Path, data_dir: str, seed: int, extra: list[str]) -> dict:
    """Run (or reuse, or resume) one arm and return its result record."""
    from rundir import config_path

    noise, trainable, eps = parse_arm(arm)
    run_dir = out / arm.replace(":", "-")
    levers = arm.split(":")[3] if arm.count(":") == 3 else ""
    cmd = arm_command(noise, trainable, eps, run_dir, data_dir, seed, extra, levers)
    text = " ".join(shlex.quote(c) for c in cmd)
    rows = _metrics(run_dir)
    planned = _planned(run_dir)
    seconds = float("nan")
    if not (rows and planned and max(r["round"] for r in rows) >= planned):
        run = cmd if not config_path(run_dir).exists() else ["dpfl", "simulate", "--resume", str(run_dir), "--no-progress"]
        print(f"[run] {text}", file=sys.stderr, flush=True)
        exe = Path(sys.executable).with_name("dpfl")
        t0 = time.perf_counter()
        # the run's own output goes to stderr: stdout carries only the JSON records (--json)
        subprocess.run([str(exe) if exe.exists() else run[0], *run[1:]], check=True, stdout=sys.stderr)
        seconds = time.perf_counter() - t0
        rows = _metrics(run_dir)
    else:
        print(f"[reuse] {run_dir}", file=sys.stderr, flush=True)
    final = rows[-1]
    evaluated = [r for r in rows if r.get("accuracy") is not None]
    last_eval = evaluated[-1] if evaluated else {}
    return {
        "arm": arm,
        "noise": noise,
        "trainable": trainable,
        "levers": levers,
        "target_epsilon": eps,
        "epsilon": final.get("epsilon_example_max") if noise in ("aggregate", "secure", "device") else None,
        "epsilon_device": final.get("epsilon_device_max") if noise == "device-level" else None,
        "delta": DELTA,
        "accuracy": last_eval.get("accuracy"),
        "macro_f1": last_eval.get("macro_f1"),
        "rounds": final["round"],
        "seconds": seconds if math.isfinite(seconds) else sum(float(r.get("seconds") or 0.0) for r in rows),
        "run_dir": str(run_dir),
        "command": text,
        "oos": _oos(run_dir),
    }


def _oos(run_dir: Path) -> dict | None:
    """The arm's out-of-scope figures (oos.json's test metrics, the threshold and the holdout
    examples' epsilon that chose it), or None for an arm without out-of-scope detection."""
    from rundir import read_holdout, read_oos

    o = read_oos(run_dir)
    if not o:
        return None
    hold = read_holdout(run_dir) or {}
    return {**o["test"], "threshold": o["threshold"], "threshold_source": o["threshold_source"],
            "trade_off": o.get("trade_off") or [],
            "intents_held_out": len(o["oos_intents"]),
            "threshold_epsilon": hold.get("epsilon") if o["threshold_source"] == "holdout" else 0.0}


def _fmt(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def write_outputs(results: list[dict], out: Path) -> None:
    """``results.md`` (table + commands), ``results.json`` and ``frontier.png`` in ``out``."""
    lines = ["| arm | noise | trainable | target eps | example eps | device eps | delta | accuracy | macro-F1 | rounds | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['arm']} | {r['noise']} | {r['trainable']} | {_fmt(r['target_epsilon'], 0)} | {_fmt(r['epsilon'], 2)} | "
                     f"{_fmt(r['epsilon_device'], 2)} | {r['delta']:g} | {_fmt(r['accuracy'])} | {_fmt(r['macro_f1'])} | "
                     f"{r['rounds']} | {r['seconds']:.0f} |")
    oos = [r for r in results if r.get("oos")]
    if oos:
        lines += ["", "Out-of-scope detection (test split; accuracy above is the closed-set in-scope accuracy):", "",
                  "| arm | intents held out | threshold | threshold eps (holdout) | in-scope acc | OOS recall | OOS precision "
                  "| overall acc | AUROC |", "|---|---|---|---|---|---|---|---|---|"]
        for r in oos:
            o = r["oos"]
            eps = o.get("threshold_epsilon")
            lines.append(f"| {r['arm']} | {o['intents_held_out']} | {_fmt(o['threshold'])} | "
                         f"{'-' if eps is None else _fmt(eps, 2)} | {_fmt(o['in_scope_accuracy'])} | {_fmt(o['oos_recall'])} | "
                         f"{_fmt(o['oos_precision'])} | {_fmt(o['overall_accuracy'])} | {_fmt(o['auroc'])} |")
        lines += ["", "The trade-off: thresholds at other quantiles of the same noised holdout histogram (no further "
                  "privacy cost):", "", "| arm | quantile | threshold | in-scope rejected | in-scope acc | OOS recall | "
                  "OOS precision | overall acc |", "|---|---|---|---|---|---|---|---|"]
        for r in oos:
            for t in r["oos"].get("trade_off") or []:
                lines.append(f"| {r['arm']} | {t['quantile']:g} | {_fmt(t['threshold'])} | {_fmt(t['in_scope_rejected'])} | "
                             f"{_fmt(t['in_scope_accuracy'])} | {_fmt(t['oos_recall'])} | {_fmt(t['oos_precision'])} | "
                             f"{_fmt(t['overall_accuracy'])} |")
    lines += ["", "Commands:", ""] + [f"- `{r['arm']}`: `{r['command']}`" for r in results]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in results:
        eps = r["epsilon"] if r["epsilon"] is not None else r["epsilon_device"]
        if eps is not None and r["accuracy"] is not None:
            series.setdefault((r["noise"], r["trainable"] + (f" {r['levers']}" if r.get("levers") else "")), []).append((eps, r["accuracy"]))
    for (noise, trainable), pts in sorted(series.items()):
        pts.sort()
        unit = "device-level eps" if noise == "device-level" else "example-level eps"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{noise} / {trainable} ({unit})")
    for r in results:
        if r["noise"] in ("none", "nonoise", "nodp", "central") and r["accuracy"] is not None:
            ax.axhline(r["accuracy"], linestyle="--", linewidth=1, color="black" if r["noise"] == "central" else "grey")
            ax.text(0.02, r["accuracy"], f" {r['noise']} (no DP) {r['accuracy']:.3f}", transform=ax.get_yaxis_transform(),
                    va="bottom", fontsize=8)
    ax.set_xlabel(f"epsilon at delta={DELTA:g}")
    ax.set_ylabel("test accuracy (BANKING77, 77 intents)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring). Arguments after ``--`` go to every ``dpfl simulate``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(prog="python -m benchmarks.privacy_utility", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arms", default="default", help="comma-separated NOISE:TRAINABLE:EPS, or 'default'")
    ap.add_argument("--out", default="runs/privacy_utility", help="folder of the arms' run directories and results")
    ap.add_argument("--data-dir", default="../shared/data/banking77")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object per arm")
    ns = ap.parse_args(argv)
    arms = DEFAULT_ARMS if ns.arms == "default" else ns.arms
    arm_list = [a for a in arms.split(",") if a.strip()]
    for a in arm_list:
        parse_arm(a)  # every arm checked before the first one runs
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for arm in arm_list:
        r = run_arm(arm, out, ns.data_dir, ns.seed, extra)
        results.append(r)
        if ns.json:
            print(json.dumps(r), flush=True)
    write_outputs(results, out)
    if not ns.json:
        print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
