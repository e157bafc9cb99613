"""Export fidelity and serving speed: ``dpfl export`` of a finished run, then transformers' own
pipeline on the run's whole test split beside dpfl's model, in one process.

Prints one JSON object: ``pipeline_equal_dpfl`` (test predictions on which the exported model,
loaded by ``transformers.pipeline("text-classification")``, agrees with dpfl's model, of
``test_examples``), the pipeline's accuracy beside ``summary_final_accuracy`` (the run's report),
the seconds the export and the pipeline took, and ``dpfl predict``'s in-process throughput
(utterances per second, one at a time) and model load time.

Usage::

    python -m benchmarks.export_fidelity RUN_DIR OUT_DIR
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("out_dir", help="where the export is written (new or empty)")
    a = p.parse_args(argv)
    run, out = Path(a.run_dir), Path(a.out_dir)

    import torch
    from transformers import pipeline

    from dpfl.commands.export import export_run, load_predictor, run_model
    from nlu.data import collate, encode
    from partitions.population import build_population

    t0 = time.perf_counter()
    export_run(run, out)
    export_seconds = time.perf_counter() - t0
    cfg, model, labels, tok = run_model(run)
    test = build_population(cfg).data.test
    texts, gold = list(test["text"]), [labels[i] for i in test["label"]]
    enc = encode(texts, np.zeros(len(texts), dtype=np.int64), tok, cfg.max_length)
    ours: list[str] = []
    with torch.no_grad():  # dpfl's evaluation: batches of 256, padded, masked mean
        for s in range(0, len(texts), 256):
            b = collate(enc, np.arange(s, min(s + 256, len(texts))))
            ours += [labels[i] for i in model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(1).tolist()]
    pipe = pipeline("text-classification", model=str(out))
    t0 = time.perf_counter()
    got = [r["label"] for r in pipe(texts, truncation=True)]
    pipeline_seconds = time.perf_counter() - t0
    summary = json.loads((run / "report" / "summary.json").read_text())
    t0 = time.perf_counter()
    predictor = load_predictor(out)
    load_seconds = time.perf_counter() - t0
    sample = texts[:300]
    t0 = time.perf_counter()
    for x in sample:
        predictor.predict(x)
    predict_seconds = time.perf_counter() - t0
    print(json.dumps({
        "run": str(run), "test_examples": len(texts), "pipeline_equal_dpfl": sum(x == y for x, y in zip(got, ours)),
        "pipeline_accuracy": float(np.mean([x == y for x, y in zip(got, gold)])),
        "summary_final_accuracy": summary["final_accuracy"], "export_seconds": round(export_seconds, 1),
        "pipeline_per_second": round(len(texts) / pipeline_seconds, 1), "predictor_load_seconds": round(load_seconds, 2),
        "predict_per_second": round(len(sample) / predict_seconds, 1),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
