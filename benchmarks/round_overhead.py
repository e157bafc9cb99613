"""Orchestration overhead of a federated round: the same short simulation with full and with almost no training.

Runs ``dpfl.commands.simulate.simulate`` twice in ONE process (so machine load hits both alike), with the same
settings and seed (hence the same cohorts): once training what ``--trainable`` says (default
``all``; ``--local-epochs`` as given, default 1), and once as the floor, ``--trainable head``
(a linear head on the frozen encoder's features, cached per device after its first task: a
device's step is milliseconds, so the round costs what it costs besides training; the runs
refuse ``--local-epochs 0``). Reports:

* ``overhead_fraction`` = round seconds of the floor / round seconds with training;
* ``seconds_per_client_task`` = round seconds of the floor / client tasks (replies);
* ``train_seconds_per_client_task`` = the same with training.

"Round seconds" (headline figures: rounds 2 onwards; ``all_rounds``: every round) are the sum of the rounds' wall times as the server measures them
(``seconds`` in metrics.jsonl: selection, ledger, sending, waiting for replies, aggregation,
evaluation, checkpoint). They EXCLUDE one-time start-up (Ray start, actor start, node -> device
mapping, population build). Evaluation of the global model is excluded too by default
(``eval_seconds`` in metrics.jsonl is subtracted; ``--include-eval`` keeps it), since it does
not depend on the cohort; both totals are in ``--json``. ``startup_seconds`` = total wall time
of ``simulate`` minus round seconds.

A second section times cohort selection over a large population (``--selection-devices``,
default 1,000,000): ``inclusion_probabilities`` + ``poisson_cohort``, median of 5.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.round_overhead
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.round_overhead --model tiny --rounds 2 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np


def run_once(cfg) -> dict:
    from dpfl.commands.simulate import simulate

    t0 = time.perf_counter()
    result = simulate(cfg, progress=False)
    total = time.perf_counter() - t0
    from rundir import read_metric_lines

    lines = read_metric_lines(cfg.run_dir)
    timings = result.get("timings") or {}
    # wall time of each round with its checkpoint (server-side); older servers: metrics' seconds
    rounds = sum(timings["rounds"]) if timings.get("rounds") else sum(m["seconds"] for m in lines)
    evals = sum(m.get("eval_seconds", 0.0) or 0.0 for m in lines)
    tasks = sum(m["replies"] + m["failures"] + m["rejected"] for m in lines)
    walls = timings.get("rounds") or [m["seconds"] for m in lines]
    # steady state: from round 2 on (round 1 also pays one-time costs: actors start, load the model
    # and build the population on their first task)
    later = lines[1:] if len(lines) > 1 else lines
    steady = sum(walls[1:]) if len(walls) > 1 else sum(walls)
    phases: dict[str, float] = {}
    for m in later:
        for k, v in (m.get("phase_seconds") or {}).items():
            phases[k] = phases.get(k, 0.0) + v
    client = [m.get("task_seconds_mean") for m in lines if m.get("task_seconds_mean") is not None]
    return {
        "total_seconds": total,
        "round_seconds": rounds,
        "eval_seconds": evals,
        "startup_seconds": total - rounds,
        "server_init_seconds": timings.get("server_init"),
        "node_mapping_seconds": timings.get("node_mapping"),
        "round_wall_seconds": timings.get("rounds"),
        "client_tasks": tasks,
        "steady_round_seconds": steady,
        "steady_eval_seconds": sum(m.get("eval_seconds", 0.0) or 0.0 for m in later),
        "steady_client_tasks": sum(m["replies"] + m["failures"] + m["rejected"] for m in later),
        "failures": sum(m["failures"] + m["timeouts"] + m["rejected"] for m in lines),
        "phase_seconds": phases,
        "client_task_seconds_mean": float(np.mean(client)) if client else None,
        "train_seconds_mean": float(np.mean([m["train_seconds_mean"] for m in lines if m.get("train_seconds_mean") is not None] or [0.0])),
    }


def selection_seconds(num_devices: int, cohort: float, repeats: int = 5, seed: int = 0) -> dict:
    from server.selection import ActivitySelector, poisson_cohort

    rng = np.random.default_rng(seed)
    activity = np.maximum(0, rng.lognormal(3.0, 1.2, num_devices).astype(np.int64))
    sel = ActivitySelector(activity, 1.0, cohort)  # calibration: once per run, timed apart
    times, sizes = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        q = sel.probabilities(activity)
        c = poisson_cohort(q, rng)
        times.append(time.perf_counter() - t0)
        sizes.append(len(c))
    t0 = time.perf_counter()
    ActivitySelector(activity, 1.0, cohort)
    calib = time.perf_counter() - t0
    return {"devices": num_devices, "expected_cohort": cohort, "seconds": statistics.median(times),
            "calibration_seconds": calib, "cohort_sizes": sizes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--num-devices", type=int, default=50)
    p.add_argument("--cohort-size", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-epochs", type=int, default=1, help="local epochs of both runs (default 1)")
    p.add_argument("--trainable", default="all", help="what the training run trains (default all; the floor: head)")
    p.add_argument("--data-dir", default=None, help="train.jsonl/test.jsonl folder (default: built-in data)")
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--no-dp", action="store_true")
    p.add_argument("--client-cpus", type=float, default=1.0)
    p.add_argument("--include-eval", action="store_true", help="count evaluation time in the round seconds")
    p.add_argument("--selection-devices", type=int, default=1_000_000, help="0: skip the selection benchmark")
    p.add_argument("--selection-only", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)

    out: dict = {}
    if not a.selection_only:
        from dpfl.commands.logs import quiet as _quiet
        from settings.config import RunConfig

        _quiet()
        base = tempfile.mkdtemp(prefix="dpfl-overhead-")
        common = dict(
            model=a.model, num_devices=a.num_devices, cohort_size=a.cohort_size, rounds=a.rounds,
            data_dir=a.data_dir, max_examples=a.max_examples, dp=not a.no_dp, client_cpus=a.client_cpus,
            eval_every=a.rounds + 1,  # evaluate after the last round only
        )
        runs = {}
        for name, trainable in (("train", a.trainable), ("floor", "head")):
            cfg = RunConfig(run_dir=f"{base}/{name}", run_id=name, local_epochs=a.local_epochs, trainable=trainable,
                            **common).with_defaults().validate()
            runs[name] = run_once(cfg)
            print(f"[{name}] {json.dumps(runs[name])}", file=sys.stderr)
        def secs(r, pre=""):
            return r[pre + "round_seconds"] - (0.0 if a.include_eval else r[pre + "eval_seconds"])

        tr, nt = runs["train"], runs["floor"]
        out.update(
            overhead_fraction=secs(nt, "steady_") / secs(tr, "steady_"),
            seconds_per_client_task=secs(nt, "steady_") / max(nt["steady_client_tasks"], 1),
            train_seconds_per_client_task=secs(tr, "steady_") / max(tr["steady_client_tasks"], 1),
            all_rounds={
                "overhead_fraction": secs(nt) / secs(tr),
                "seconds_per_client_task": secs(nt) / max(nt["client_tasks"], 1),
                "train_seconds_per_client_task": secs(tr) / max(tr["client_tasks"], 1),
            },
            evaluation_included=bool(a.include_eval),
            startup_excluded="Ray start, server init and node mapping always; the headline figures are over rounds 2.. (round 1 also starts the actors); all_rounds: every round",
            settings={k: v for k, v in common.items() if k != "eval_every"} | {"local_epochs": a.local_epochs,
                                                                              "trainable": a.trainable, "floor": "head"},
            runs=runs,
        )
    if a.selection_devices:
        out["selection"] = selection_seconds(a.selection_devices, max(a.cohort_size, 100.0))
    if a.json:
        print(json.dumps(out))
    else:
        if "overhead_fraction" in out:
            r = out["runs"]
            print(f"model {a.model}, {a.num_devices} devices, expected cohort {a.cohort_size:g}, {a.rounds} rounds")
            for name in ("train", "floor"):
                x = r[name]
                print(f"  {name:9s} rounds {x['round_seconds']:7.1f}s (eval {x['eval_seconds']:.1f}s)  start-up {x['startup_seconds']:6.1f}s"
                      f"  tasks {x['client_tasks']}  client task mean {x['client_task_seconds_mean']}")
                print(f"            phases: " + ", ".join(f"{k} {v:.2f}s" for k, v in x["phase_seconds"].items()))
            print(f"overhead fraction (no training / training, rounds only, eval {'in' if a.include_eval else 'out'}): {out['overhead_fraction']:.3f}")
            print(f"seconds per client task: {out['seconds_per_client_task']:.3f} (with training {out['train_seconds_per_client_task']:.3f})")
        if "selection" in out:
            s = out["selection"]
            print(f"selection over {s['devices']:,} devices (expected cohort {s['expected_cohort']:g}): "
                  f"{s['seconds']*1000:.1f} ms per round (median of 5), calibration once {s['calibration_seconds']:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
