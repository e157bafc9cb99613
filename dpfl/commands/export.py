"""``dpfl export RUN_DIR --out DIR`` and ``dpfl predict RUN_OR_DIR [TEXT ...]``: ship a run's model.

``export`` writes a Hugging Face model directory that ``transformers.pipeline("text-classification",
model=DIR)`` loads offline (safetensors weights, ``config.json`` with ``id2label``/``label2id``,
the run's tokenizer truncating at its ``--max-length``; see :mod:`nlu.export` for how the run's
mean pooling is expressed in a stock architecture), ``dpfl.json`` (where it came from), and a
model card ``README.md`` whose figures are the run's ``report/summary.json`` (built first when
absent): the guarantee per unit (epsilon at delta), adjacency, mechanism, trust model, rounds,
devices, data size, test accuracy, ``NOT PRIVATE`` first where it applies, and the run id and
ledger digest (HMAC-SHA256 of the ledger's SQL dump, keyed with the run directory's
``ledger.key``, so that it reveals nothing of the secret cohorts).

``predict`` answers one JSON line per utterance (``text``, ``label``, ``probability``), from the
arguments or, without any, from stdin (JSONL lines ``{"text": ...}`` or plain text lines). It
takes a run directory (converted in memory) or an exported directory, and encodes one utterance
at a time (the exported architecture's mean is exact without padding).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from dpfl.commands.errors import exits

__all__ = ["add_parser", "add_predict_parser", "export_run", "ledger_digest", "load_predictor", "model_card", "run_model", "run", "run_predict"]

EXPORT_FILE = "dpfl.json"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``dpfl export`` on ``subparsers``; return its parser."""
    p = subparsers.add_parser(
        "export", help="write a run's final model as a Hugging Face model directory with a model card",
        description="Write RUN_DIR's final model as a Hugging Face model directory (safetensors, config with "
        "id2label, tokenizer, model card with the run's privacy guarantee) that transformers.pipeline("
        "'text-classification', model=DIR) loads offline.")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="the folder to write (must not exist or be empty)")
    return p


def add_predict_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``dpfl predict`` on ``subparsers``; return its parser."""
    p = subparsers.add_parser(
        "predict", help="label utterances with a run's (or an exported) model: one JSON line each",
        description="Label each TEXT (or, without any, each line of stdin: JSONL {\"text\": ...} or plain text) "
        "with the model of RUN_DIR or of a `dpfl export` directory; one JSON line per input.")
    p.add_argument("model", metavar="RUN_OR_DIR")
    p.add_argument("texts", nargs="*", metavar="TEXT")
    return p


#: Beside the ledger: the 256-bit key of its digest (created by the first export, never released).
LEDGER_KEY_FILE = "ledger.key"


def ledger_digest(path: Path) -> str:
    """HMAC-SHA256 of the ledger's SQL dump (Python sqlite3 ``iterdump()``, one line each), keyed
    with ``ledger.key`` beside it (32 bytes from the OS, made on first use, mode 0600).

    The dump is the same whether the last transactions sit in the write-ahead log or in the main
    file. It is keyed because the ledger is a function of the secret cohorts: a plain hash in a
    released model card would let anyone who knows the other settings test guesses of who joined
    (a small run's cohorts can be enumerated). Whoever holds the run directory can recompute it.
    """
    import hmac
    import os
    import secrets
    import sqlite3

    key_path = Path(path).parent / LEDGER_KEY_FILE
    if not key_path.is_file():
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
    mac = hmac.new(key_path.read_bytes(), digestmod=hashlib.sha256)
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        for line in con.iterdump():
            mac.update(line.encode("utf-8") + b"\n")
    finally:
        con.close()
    return mac.hexdigest()


def run_model(run_dir: Path):
    """(the run's RunConfig, its final model with the checkpoint loaded, label names, tokenizer).

    Raises
    ------
    rundir.RunDirError, nlu.export.ExportError, settings.config.ConfigError
        For a directory without a run or a checkpoint, a task that does not export, or a checkpoint
        that does not fit the run's model.
    """
    from nlu.export import ExportError
    from nlu.model import load_tokenizer, set_trainable
    from nlu.tasks import task_for_data
    from partitions.population import build_population
    from rundir import RunDirError, config_path, global_model_path, load_global_model
    from settings.config import RunConfig

    if not config_path(run_dir).is_file():
        raise RunDirError(f"{run_dir}: no run there (config.toml is missing)")
    cfg = RunConfig.from_toml(config_path(run_dir)).replace(run_dir=str(run_dir))
    if cfg.task != "intent":
        raise ExportError(f"{run_dir}: dpfl export writes intent classifiers; this run's task is {cfg.task!r}")
    if not global_model_path(run_dir).is_file():
        raise RunDirError(f"{run_dir}: no checkpoint yet ({global_model_path(run_dir)} is missing): let the run "
                          "finish a round")
    pop = build_population(cfg)
    task = task_for_data(cfg.task, pop.data, cfg.slot_loss_weight, pooling=cfg.pooling)
    model = set_trainable(task.build_model(cfg.model, seed=cfg.seed), cfg.trainable, **cfg.lora_options())
    load_global_model(run_dir, model)  # the trained parameters on the base model they were trained from
    return cfg, model.eval(), list(pop.data.label_names), load_tokenizer(cfg.model)


def model_card(summary: dict, meta: dict) -> str:
    """The model card (Hugging Face ``README.md`` with YAML metadata) of an export.

    Every figure is ``summary``'s (the run's ``report/summary.json``) or ``meta``'s (``dpfl.json``).
    """
    from dpfl.commands.simulate import round_figure

    cfg = summary.get("config") or {}
    private = summary.get("guarantee") == "yes"
    lines = ["---", "library_name: transformers", "pipeline_tag: text-classification",
             "tags:", "- intent-classification", "- federated-learning"]
    if private:
        lines.append("- differential-privacy")
    lines += ["---", ""]
    if summary.get("not_private"):
        lines += [f"**NOT PRIVATE**: {summary['not_private']}", ""]
    lines += [f"# Intent classifier from dpfl run {summary.get('run_id')}", ""]
    delta = summary.get("delta")
    lines += ["## Privacy guarantee", ""]
    eps = summary.get("epsilon") or {}
    for unit, on, adjacency in (("example", summary.get("dp"), "add or remove one training utterance"),
                                ("device", summary.get("device_dp"), "add or remove all of one device's data")):
        e = eps.get(unit)
        if on and isinstance(e, dict):
            lines.append(f"- {unit} level ({adjacency}): epsilon {round_figure(e.get('max'), 2)} at delta {delta:g} "
                         f"(max over devices; median {round_figure(e.get('median'), 2)})")
        else:
            lines.append(f"- {unit} level: not protected")
    trust = summary.get("trust_model") or {}
    for unit, t in trust.items():
        if isinstance(t, dict) and t.get("name"):
            lines.append(f"- trust model ({unit} level): {t['name']}; trusted: {t.get('trusted', 'n/a')}")
    lines += ["", "## Mechanism and training", "",
              f"- accountant: {summary.get('accountant')}; noise placement: {summary.get('noise_at')}",
              f"- noise multiplier {round_figure(cfg.get('noise_multiplier'), 4)}, max_grad_norm {round_figure(cfg.get('max_grad_norm'))}, "
              f"sample_rate {round_figure(cfg.get('sample_rate'))}",
              f"- rounds: {summary.get('rounds_completed')} of {summary.get('rounds_planned')} ({summary.get('status')}); "
              f"devices: {summary.get('num_devices')}; training examples: {summary.get('num_examples')}; "
              f"expected cohort: {(summary.get('selection') or {}).get('expected_cohort_size')}",
              f"- base model: {cfg.get('model')}; trained: {cfg.get('trainable')}; pooling: {cfg.get('pooling')}; "
              f"max length {meta.get('max_length')} tokens", "",
              "## Evaluation", "",
              f"- test accuracy {round_figure(summary.get('final_accuracy'))}, macro-F1 {round_figure(summary.get('final_macro_f1'))} "
              "(the run's test split)", "",
              "## Use", "",
              "```python", "from transformers import pipeline",
              "pipe = pipeline(\"text-classification\", model=\"PATH\")",
              "pipe(\"turn on the lights\", truncation=True)", "```", "",
              f"{meta.get('architecture_note', '')}", "",
              "## Provenance", "",
              f"- run id: {summary.get('run_id')}", f"- ledger digest (HMAC-SHA256 of ledger.sqlite's SQL dump, keyed with the run directory's ledger.key): {meta.get('ledger_digest')}",
              f"- exported by dpfl from {meta.get('run_dir')}", ""]
    return "\n".join(lines)


def export_run(run_dir: str | Path, out: str | Path) -> dict:
    """Write the export of ``run_dir`` into ``out``; return its ``dpfl.json`` payload.

    Raises
    ------
    rundir.RunDirError, nlu.export.ExportError
        For a directory without a finished checkpoint, a non-intent task, an ``out`` that holds files.
    """
    from nlu.export import to_pretrained
    from nlu.pooling import MeanPoolClassifier
    from report import build_report
    from rundir import RunDirError, ledger_path, read_summary

    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunDirError(f"--out {out}: exists and is not an empty folder; choose a new one")
    cfg, model, labels, tok = run_model(run_dir)
    hf = to_pretrained(model, dict(enumerate(labels)))
    try:
        summary = read_summary(run_dir).to_dict()
    except (FileNotFoundError, ValueError):
        summary = build_report(run_dir)
    if summary.get("rounds_completed") != _rounds_done(run_dir):  # a report older than the checkpoint
        summary = build_report(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out, safe_serialization=True)
    tok.model_max_length = int(cfg.max_length)
    tok.save_pretrained(out)
    mean = isinstance(model, MeanPoolClassifier)
    meta = {
        "version": 1, "run_id": summary.get("run_id"), "run_dir": str(run_dir.resolve()),
        "ledger_digest": ledger_digest(ledger_path(run_dir)), "max_length": int(cfg.max_length), "pooling": cfg.pooling,
        "round": summary.get("rounds_completed"), "test_accuracy": summary.get("final_accuracy"),
        "labels": labels,
        "architecture_note": ("Stored as transformers' XLMForSequenceClassification with summary_type 'mean': it "
                              "computes exactly the run's BERT encoder, mean of the token states and linear head "
                              "for one utterance at a time (the pipeline's default); batched with padding the "
                              "mean would include the padding.") if mean else "Stored as BertForSequenceClassification.",
    }
    (out / EXPORT_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    (out / "README.md").write_text(model_card(summary, meta))
    return meta


def _rounds_done(run_dir: Path) -> int | None:
    from rundir import read_checkpoint_state

    return (read_checkpoint_state(run_dir) or {}).get("round")


class Predictor:
    """A classifier and its tokenizer; :meth:`predict` labels one utterance at a time."""

    def __init__(self, model, tokenizer, max_length: int):
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, int(max_length)
        self.id2label = {int(k): v for k, v in model.config.id2label.items()}

    def predict(self, text: str) -> dict:
        """``{"text", "label", "probability"}`` (softmax of the top class) of ``text``."""
        import torch

        enc = self.tokenizer([text], truncation=True, max_length=self.max_length, return_tensors="pt")
        with torch.no_grad():
            probs = torch.softmax(self.model(**enc).logits[0].float(), dim=-1)
        k = int(probs.argmax())
        return {"text": text, "label": self.id2label[k], "probability": round(float(probs[k]), 6)}


def load_predictor(path: str | Path) -> Predictor:
    """A :class:`Predictor` for a run directory (its final model) or a ``dpfl export`` directory.

    Raises
    ------
    rundir.RunDirError
        If ``path`` is neither.
    """
    from rundir import RunDirError, config_path

    path = Path(path)
    if (path / EXPORT_FILE).is_file():
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        meta = json.loads((path / EXPORT_FILE).read_text())
        return Predictor(AutoModelForSequenceClassification.from_pretrained(path), AutoTokenizer.from_pretrained(path),
                         meta["max_length"])
    if config_path(path).is_file():
        from nlu.export import to_pretrained

        cfg, model, labels, tok = run_model(path)
        return Predictor(to_pretrained(model, dict(enumerate(labels))), tok, cfg.max_length)
    raise RunDirError(f"{path}: neither a run directory (config.toml) nor a `dpfl export` folder ({EXPORT_FILE})")


def _stdin_texts():
    for no, line in enumerate(sys.stdin, start=1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"stdin, line {no}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"stdin, line {no}: expected {{\"text\": \"...\"}}")
            yield obj["text"]
        else:
            yield line


@exits
def run(ns: argparse.Namespace) -> int:
    """``dpfl export``: write the export; print where and what it holds."""
    from dpfl.commands.simulate import round_figure

    meta = export_run(ns.run_dir, ns.out)
    print(f"exported run {meta['run_id']} (round {meta['round']}, test accuracy {round_figure(meta['test_accuracy'])}) to "
          f"{ns.out}: model, tokenizer, README.md (model card), {EXPORT_FILE}")
    return 0


@exits
def run_predict(ns: argparse.Namespace) -> int:
    """``dpfl predict``: one JSON line per utterance on stdout."""
    predictor = load_predictor(ns.model)
    for text in (ns.texts or _stdin_texts()):
        print(json.dumps(predictor.predict(text)), flush=True)
    return 0
