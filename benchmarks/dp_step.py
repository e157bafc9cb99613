"""Time one optimizer step of DP-SGD variants on MiniLM (77 labels), as the runs build it.

Model: ``nlu.model.build_model("minilm", 77, pooling="mean")`` (the runs' default:
MeanPoolClassifier = AutoModel encoder without pooler + dropout + Linear head); ``--pooling cls``
benchmarks transformers' BertForSequenceClassification ([CLS] pooler + head) instead.

Methods, all timed in ONE process and interleaved (step of A, step of B, ... repeated) so that
machine noise hits them alike; the median over repeats after warm-up is reported, both as wall
time (``*_s``) and as the process' CPU time (``*_cpu_s``, all threads; less sensitive to other
users' load on a shared machine, but OpenMP spin-waits count in it):

* ``nondp``        plain training: mean loss, backward, SGD step;
* ``opacus``       Opacus hooks mode: GradSampleModule + DPOptimizer (explicit [B, L] position ids,
                   Opacus issue #841);
* ``engine``       dp.engine.DPSGDEngine (default [1, L] position ids broadcast over the batch);
* ``opacus_ghost`` Opacus ghost clipping (GradSampleModuleFastGradientClipping +
                   DPOptimizerFastGradientClipping + DPLossFastGradientClipping); reported as crashed
                   if it raises.

``--trainable`` chooses the parameters that train, as the runs' ``--trainable`` does
(:func:`nlu.model.set_trainable`): ``all`` (default: every parameter, embeddings included) or
``lora`` (peft LoRA adapters, rank 8, alpha 16, on every layer's attention query and value, plus
the head; the encoder frozen), or ``head`` / ``topN``. Every method then trains exactly those.
The model is in training mode (dropout on), SGD optimizer over the trainable parameters, float32.
Ratios (``*_over_nondp``) are only meaningful within one run (same process, same load).

Memory: for each method a FRESH subprocess builds the model and runs warm-up + 2 steps; it reports
``peak_mb`` = the process' peak resident set size (``VmHWM`` of /proc/self/status,
i.e. everything: Python, torch libraries, model, optimizer, activations, gradients) and
``base_mb`` = its RSS just before the first step (model, optimizer and batch built). ``step_mb`` =
``peak_mb - base_mb`` is what the training step itself added at its peak.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.dp_step                  # both shapes
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.dp_step --shapes 32x32 --repeats 3 --json
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.dp_step --threads 1      # less load-sensitive
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.dp_step --trainable lora --json  # LoRA step
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_LABELS = 77
METHODS = ("nondp", "opacus", "engine", "opacus_ghost")
SIGMA, C = 1.0, 1.0


POOLING = "mean"
TRAINABLE = "all"


def build_model(seed: int = 0) -> nn.Module:
    """The runs' model (train mode, float32) with :data:`TRAINABLE` applied (``nlu.model.set_trainable``)."""
    from nlu.model import build_model as nlu_build_model
    from nlu.model import set_trainable

    return set_trainable(nlu_build_model("minilm", NUM_LABELS, seed=seed, pooling=POOLING), TRAINABLE, seed=seed)


def trainable_parameters(model: nn.Module) -> list:
    """The parameters the optimizer steps (``requires_grad=True``)."""
    return [p for p in model.parameters() if p.requires_grad]


def make_batch(B: int, L: int, vocab: int, seed: int = 0):
    """A random padded batch: ``({"input_ids", "attention_mask"} [B, L], position ids [B, L], labels [B])``.

    Lengths are uniform in ``[L // 2, L]``; token ids in ``[1000, vocab)``, padding id 0.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    for i in range(B):
        mask[i, lengths[i]:] = 0
        ids[i, lengths[i]:] = 0
    y = torch.randint(0, NUM_LABELS, (B,), generator=g)
    pos = torch.arange(L).expand(B, L).contiguous()
    return {"input_ids": ids, "attention_mask": mask}, pos, y


def make_stepper(method: str, B: int, L: int):
    """Return a zero-argument function doing one full optimizer step."""
    model = build_model()
    batch, pos, y = make_batch(B, L, model.config.vocab_size)
    lr = 1e-4
    params = trainable_parameters(model)
    if method == "nondp":
        opt = torch.optim.SGD(params, lr=lr)

        def step():
            loss = F.cross_entropy(model(**batch).logits, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    elif method == "engine":
        from dp.engine import DPSGDEngine

        opt = torch.optim.SGD(params, lr=lr)
        eng = DPSGDEngine(model, noise_multiplier=SIGMA, max_grad_norm=C, expected_batch_size=B)

        def step():
            loss = F.cross_entropy(model(**batch).logits, y, reduction="none")
            eng.accumulate(loss)
            eng.finalize()
            opt.step()
            opt.zero_grad(set_to_none=True)

    elif method == "opacus":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        opt = DPOptimizer(torch.optim.SGD(params, lr=lr), noise_multiplier=SIGMA,
                          max_grad_norm=C, expected_batch_size=B)

        def step():
            loss = F.cross_entropy(gsm(**batch, position_ids=pos).logits, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    elif method == "opacus_ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                                   max_grad_norm=C, use_ghost_clipping=True)
        opt = DPOptimizerFastGradientClipping(torch.optim.SGD(params, lr=lr), noise_multiplier=SIGMA,
                                              max_grad_norm=C, expected_batch_size=B, loss_reduction="mean")
        crit = DPLossFastGradientClipping(gsm, opt, nn.CrossEntropyLoss(reduction="mean"), loss_reduction="mean")

        def step():
            loss = crit(gsm(**batch, position_ids=pos).logits, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    else:
        raise ValueError(method)
    return step


def rss_mb() -> float:
    """This process' resident set size now, in MiB (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def vm_hwm_mb() -> float:
    """Peak RSS of this process image (VmHWM). Unlike getrusage's ru_maxrss, which on Linux keeps the
    parent's RSS at fork across exec, VmHWM starts afresh with the exec'ed process."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mem_child(method: str, B: int, L: int) -> dict:
    """In a fresh process: build ``method``'s step, run 3 steps; ``{"peak_mb", "base_mb", "step_mb"}`` (MiB) or ``{"error"}``."""
    try:
        step = make_stepper(method, B, L)
        base = rss_mb()
        for _ in range(3):
            step()
        peak = vm_hwm_mb()
        return {"method": method, "peak_mb": peak, "base_mb": base, "step_mb": peak - base}
    except Exception as e:  # report, don't hide
        return {"method": method, "error": f"{type(e).__name__}: {str(e)[:200]}"}


def measure_memory(method: str, B: int, L: int) -> dict:
    """Run :func:`mem_child` for ``method`` in a subprocess (same pooling, trainable, threads); its dict."""
    cmd = [sys.executable, "-m", "benchmarks.dp_step", "--mem-child", method, "--shapes", f"{B}x{L}",
           "--pooling", POOLING, "--trainable", TRAINABLE, "--threads", str(torch.get_num_threads())]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for line in r.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    return {"method": method, "error": f"child failed rc={r.returncode}: {r.stderr[-300:]}"}


def time_methods(methods, B, L, warmup, repeats) -> dict:
    """Interleaved timing of one step per method; ``(median wall s, median CPU s, errors)``, each keyed by method."""
    steppers, errors = {}, {}
    for m in methods:
        try:
            steppers[m] = make_stepper(m, B, L)
            for _ in range(warmup):
                steppers[m]()
        except Exception as e:
            errors[m] = f"{type(e).__name__}: {str(e)[:200]}"
            steppers.pop(m, None)
    times = {m: [] for m in steppers}
    cpu = {m: [] for m in steppers}
    for _ in range(repeats):
        for m in list(steppers):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                steppers[m]()
            except Exception as e:
                errors[m] = f"{type(e).__name__}: {str(e)[:200]}"
                steppers.pop(m)
                times.pop(m)
                cpu.pop(m)
                continue
            times[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)
    med = {m: statistics.median(t) for m, t in times.items() if t}
    med_cpu = {m: statistics.median(t) for m, t in cpu.items() if t}
    return med, med_cpu, errors


def main(argv=None):
    """Command line (see the module docstring); prints a table, or one JSON object per shape with ``--json``."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="32x32,64x128", help="comma-separated BxL (default 32x32,64x128)")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per method (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    ap.add_argument("--json", action="store_true", help="print one JSON object per shape")
    ap.add_argument("--pooling", choices=("mean", "cls"), default="mean", help="model head (default: mean, the runs' default)")
    ap.add_argument("--trainable", default="all",
                    help="parameters that train: all (default) | lora (peft LoRA r=8, alpha=16 on query/value + head) "
                         "| head | topN, as the runs' --trainable")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--mem-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    global POOLING, TRAINABLE
    POOLING = args.pooling
    TRAINABLE = args.trainable
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mem_child:
        B, L = shapes[0]
        print(json.dumps(mem_child(args.mem_child, B, L)), flush=True)
        return
    methods = [m for m in args.methods.split(",") if m]
    rows = []
    for B, L in shapes:
        med, med_cpu, errors = time_methods(methods, B, L, args.warmup, args.repeats)
        mem = {} if args.no_memory else {m: measure_memory(m, B, L) for m in methods}
        row = {"shape": [B, L], "pooling": POOLING, "trainable": TRAINABLE, "threads": torch.get_num_threads(), "repeats": args.repeats,
               "loadavg": float(open("/proc/loadavg").read().split()[0])}
        for m in methods:
            row[f"{m}_s"] = med.get(m)
            row[f"{m}_cpu_s"] = med_cpu.get(m)
            if m in errors:
                row[f"{m}_error"] = errors[m]
            if m in mem:
                row[f"{m}_peak_mb"] = mem[m].get("peak_mb")
                row[f"{m}_step_mb"] = mem[m].get("step_mb")
                if "error" in mem[m]:
                    row[f"{m}_mem_error"] = mem[m]["error"]
        base = row.get("nondp_s")
        for m in methods:
            if m != "nondp" and base and row.get(f"{m}_s"):
                row[f"{m}_over_nondp"] = row[f"{m}_s"] / base
                row[f"{m}_cpu_over_nondp"] = row[f"{m}_cpu_s"] / row["nondp_cpu_s"]
            if m != "nondp" and row.get(f"{m}_peak_mb") and row.get("nondp_peak_mb"):
                row[f"{m}_peak_over_nondp"] = row[f"{m}_peak_mb"] / row["nondp_peak_mb"]
                row[f"{m}_step_mem_over_nondp"] = row[f"{m}_step_mb"] / row["nondp_step_mb"]
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        print(f"model=minilm pooling={POOLING} trainable={TRAINABLE}, torch threads={torch.get_num_threads()}, repeats={args.repeats} (median), "
              f"warmup={args.warmup}, loadavg at end={rows[-1]['loadavg']}")
        print("wall/cpu = median wall / process CPU seconds per step; peak = peak RSS of a fresh process (VmHWM); "
              "step = peak minus RSS before the first step")
        hdr = (f"{'shape':>8} {'method':>13} {'wall s':>8} {'x nondp':>8} {'cpu s':>8} {'x nondp':>8} "
               f"{'peak MB':>9} {'x':>6} {'step MB':>8} {'x':>6}")
        print(hdr)
        for row in rows:
            for m in methods:
                t = row.get(f"{m}_s")
                err = row.get(f"{m}_error")
                f = lambda v, fmt: (fmt % v) if isinstance(v, (int, float)) else "-"
                print(f"{'%dx%d' % tuple(row['shape']):>8} {m:>13} "
                      f"{(f(t, '%.3f') if t else 'crashed'):>8} {f(row.get(f'{m}_over_nondp', 1.0 if m == 'nondp' else None), '%.2f'):>8} "
                      f"{f(row.get(f'{m}_cpu_s'), '%.3f'):>8} {f(row.get(f'{m}_cpu_over_nondp', 1.0 if m == 'nondp' else None), '%.2f'):>8} "
                      f"{f(row.get(f'{m}_peak_mb'), '%.0f'):>9} {f(row.get(f'{m}_peak_over_nondp'), '%.2f'):>6} "
                      f"{f(row.get(f'{m}_step_mb'), '%.0f'):>8} {f(row.get(f'{m}_step_mem_over_nondp'), '%.2f'):>6}"
                      + (f"  [{err}]" if err else ""))


if __name__ == "__main__":
    main()
