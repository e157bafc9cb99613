"""The cost of secure aggregation: a round with SecAgg+ and distributed Skellam noise (``--noise-at secure``)
beside the same round with the noise on the aggregate, for several cohort sizes, in one process.

For each cohort size m: two ``dpfl simulate`` runs with the same settings and seed (``--num-devices m``,
``--cohort-size m``, uniform selection, so each round's Poisson cohort is everybody; ``--max-examples``
100 m, so every device holds about 100 examples, iid; frozen encoder and linear head), one per placement.
Reported per placement, after ``--warmup`` rounds (default 2: the actors start and encode each device's
features the first time they meet it):

* ``round_seconds``: the server's wall time of a round (selection to checkpoint, evaluation excluded);
* ``bytes_per_device``: what one device sends in a round: the clipped sum (4 bytes per trainable
  parameter) in the aggregate placement; its public keys, encrypted shares, masked vector (4 bytes per
  coordinate of the padded dimension D) and revealed shares under secure aggregation
  (``secure_bytes_per_device`` of metrics.jsonl);
* ``server_cpu_seconds``: the server's CPU time in the protocol and decoding (secure only,
  ``secure_server_cpu_seconds``);
* ``secure_over_aggregate``: the ratio of the round seconds, measured side by side.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.secure_round --cohorts 10,50,100 --json
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.secure_round --cohorts 4 --rounds 2 --warmup 1 --model tiny --json  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_placement(placement: str, cohort: int, a, base: Path) -> dict:
    """One ``simulate`` run of ``placement`` with ``cohort`` devices, all selected each round; its round costs."""
    from dpfl.commands.simulate import simulate
    from rundir import read_metric_lines
    from settings.config import RunConfig

    cfg = RunConfig(
        model=a.model, trainable="head", noise_at=placement, num_devices=cohort, cohort_size=cohort,
        selection="uniform", rounds=a.rounds, data_dir=a.data_dir,
        max_examples=a.max_examples if a.max_examples is not None else a.examples_per_device * cohort,
        noise_multiplier=1.0, secure_bits=a.bits, secagg_neighbours=a.neighbours, eval_every=a.rounds + 1,
        seed=a.seed, run_dir=str(base / f"{placement}-{cohort}"), partitioner="iid",
    ).validate()
    simulate(cfg, progress=False)
    lines = read_metric_lines(cfg.run_dir)
    later = lines[a.warmup:] if len(lines) > a.warmup else lines[-1:]
    seconds = [m["seconds"] - (m.get("eval_seconds") or 0.0) for m in later]
    row = {"placement": placement, "cohort": cohort, "rounds_timed": len(later),
           "round_seconds": statistics.mean(seconds), "replies": statistics.mean(m["replies"] for m in later)}
    if placement == "secure":
        row["bytes_per_device"] = statistics.mean(m["secure_bytes_per_device"] for m in later)
        row["server_cpu_seconds"] = statistics.mean(m["secure_server_cpu_seconds"] for m in later)
        row["abandoned_rounds"] = sum(bool(m.get("secure_abandoned")) for m in lines)
        row["bits"] = a.bits
        row["parameters"] = int(later[-1]["secure_parameters"])
        row["padded_dimension"] = int(later[-1]["secure_dimension"])
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cohorts", default="10,50,100", help="comma-separated cohort sizes (default 10,50,100)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2,
                   help="rounds not timed (the actors start, and encode each device's features on first meeting it)")
    p.add_argument("--examples-per-device", type=int, default=100,
                   help="training examples per device: --max-examples is this times the cohort (default 100)")
    p.add_argument("--model", default="minilm")
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "banking77"))
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--bits", type=int, default=20, help="--secure-bits (default 20)")
    p.add_argument("--neighbours", type=int, default=None, help="--secagg-neighbours (default: every device, SecAgg)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object per cohort size")
    a = p.parse_args(argv)
    if not Path(a.data_dir).is_dir():
        a.data_dir = None  # the built-in data set
    from dpfl.commands.logs import quiet

    quiet()
    base = Path(tempfile.mkdtemp(prefix="dpfl-secure-round-"))
    for cohort in [int(c) for c in a.cohorts.split(",") if c.strip()]:
        agg = run_placement("aggregate", cohort, a, base)
        sec = run_placement("secure", cohort, a, base)
        params = sec["parameters"]
        agg["bytes_per_device"] = 4 * params  # the float32 clipped sum
        out = {"cohort": cohort, "trainable_parameters": params, "aggregate": agg, "secure": sec,
               "secure_over_aggregate": sec["round_seconds"] / agg["round_seconds"],
               "bytes_ratio": sec["bytes_per_device"] / agg["bytes_per_device"]}
        if a.json:
            print(json.dumps(out), flush=True)
        else:
            print(f"cohort {cohort}: round {agg['round_seconds']:.2f} s (aggregate) vs {sec['round_seconds']:.2f} s "
                  f"(secure, {out['secure_over_aggregate']:.2f}x); bytes per device {agg['bytes_per_device']:,} vs "
                  f"{sec['bytes_per_device']:,.0f} ({out['bytes_ratio']:.2f}x, {a.bits} bits); server CPU "
                  f"{sec['server_cpu_seconds']:.2f} s; abandoned rounds {sec['abandoned_rounds']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
