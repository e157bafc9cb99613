"""``dpfl export RUN_DIR --out DIR`` and ``dpfl predict RUN_OR_DIR [TEXT ...]``: ship a run's model.

``export`` writes a Hugging Face model directory that ``transformers.pipeline("text-classification",
model=DIR)`` loads offline (safetensors weights, ``config.json`` with ``id2label``/``label2id``,
the run's tokenizer truncating at its ``--max-length``; see :mod:`nlu.export` for how the run's
mean pooling is expressed in a stock architecture), ``dpfl.json`` (where it came from), and a
model card ``README.md`` whose figures are the run's ``report/summary.json`` (built first when
absent): the guarantee per unit (epsilon at delta), adjacency, mechanism, trust model, rounds,
devices, data size, test accuracy, ``NOT PRIVATE`` first where it applies, and the run id and
ledger digest (HMAC-SHA256 of the ledger's SQL dump, keyed with the run directory's
``ledger.key``, so that it reveals nothing of the secret cohorts). A slot run's folder holds a
``BertForTokenClassification`` (``pipeline("token-classification", model=DIR)``); a joint run's
holds the intent classifier and, in ``DIR/slots``, the slot tagger on the same encoder weights.

``predict`` answers one JSON line per utterance (``text``, ``label``, ``probability``, and
``out_of_scope`` with ``confidence`` where the run evaluated out-of-scope detection; ``slots``,
a tag per whitespace-separated word, for slot and joint models), from the
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

__all__ = ["add_parser", "add_predict_parser", "export_run", "ledger_digest", "load_predictor", "model_card", "oos_rule", "slot_names_of", "stock_models", "run_model", "run", "run_predict"]

EXPORT_FILE = "dpfl.json"
#: A joint model's token classifier, inside the export folder.
SLOTS_DIR = "slots"


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
    if cfg.task not in ("intent", "slots", "joint"):
        raise ExportError(f"{run_dir}: dpfl export writes intent, slot and joint models; this run's task is {cfg.task!r}")
    if not global_model_path(run_dir).is_file():
        raise RunDirError(f"{run_dir}: no checkpoint yet ({global_model_path(run_dir)} is missing): let the run "
                          "finish a round")
    pop = build_population(cfg)
    task = task_for_data(cfg.task, pop.data, cfg.slot_loss_weight, pooling=cfg.pooling)
    model = set_trainable(task.build_model(cfg.model, seed=cfg.seed), cfg.trainable, **cfg.lora_options())
    load_global_model(run_dir, model)  # the trained parameters on the base model they were trained from
    return cfg, model.eval(), list(pop.data.label_names), load_tokenizer(cfg.model)


def slot_names_of(cfg) -> list[str]:
    """The BIO tag vocabulary of a slot or joint run (its population is cached per process)."""
    from partitions.population import build_population

    return list(build_population(cfg).data.slot_names or [])


def stock_models(cfg, model, labels: list[str]):
    """(intent classifier or None, token classifier or None): the stock transformers models of a run's
    model (:mod:`nlu.export`): intent runs have the first, slot runs the second, joint runs both.

    Raises
    ------
    nlu.export.ExportError
        For a model without a stock equivalent.
    """
    from nlu.export import intent_part, to_pretrained, to_token_classifier

    intent = token = None
    if cfg.task == "intent":
        intent = to_pretrained(model, dict(enumerate(labels)))
    else:
        token = to_token_classifier(model, dict(enumerate(slot_names_of(cfg))))
        if cfg.task == "joint":
            intent = to_pretrained(intent_part(model), dict(enumerate(labels)))
    return intent, token


def model_card(summary: dict, meta: dict) -> str:
    """The model card (Hugging Face ``README.md`` with YAML metadata) of an export.

    Every figure is ``summary``'s (the run's ``report/summary.json``) or ``meta``'s (``dpfl.json``).
    """
    from dpfl.commands.simulate import round_figure

    cfg = summary.get("config") or {}
    private = summary.get("guarantee") == "yes"
    task = meta.get("task", "intent")
    lines = ["---", "library_name: transformers",
             f"pipeline_tag: {'token-classification' if task == 'slots' else 'text-classification'}", "tags:"]
    lines += (["- intent-classification"] if task != "slots" else []) + (["- slot-filling"] if task != "intent" else [])
    lines += ["- federated-learning"]
    if private:
        lines.append("- differential-privacy")
    lines += ["---", ""]
    if summary.get("not_private"):
        lines += [f"**NOT PRIVATE**: {summary['not_private']}", ""]
    what = {"intent": "Intent classifier", "slots": "Slot tagger", "joint": "Intent classifier and slot tagger"}[task]
    lines += [f"# {what} from dpfl run {summary.get('run_id')}", ""]
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
              *([f"- test accuracy {round_figure(summary.get('final_accuracy'))}, macro-F1 {round_figure(summary.get('final_macro_f1'))} "
                 "(the run's test split" + (", in-scope utterances, no rejection)" if summary.get("out_of_scope") else ")")]
                if task != "slots" else []),
              *([f"- slot F1 {round_figure(summary.get('final_slot_f1'))} (span level, the run's test split)"]
                if task != "intent" else []), "",
              *_oos_card(summary.get("out_of_scope")),
              "## Use", "",
              "```python", "from transformers import pipeline",
              *(["pipe = pipeline(\"text-classification\", model=\"PATH\")",
                 "pipe(\"turn on the lights\", truncation=True)"] if task != "slots" else []),
              *([f"tagger = pipeline(\"token-classification\", model=\"PATH{'/' + SLOTS_DIR if task == 'joint' else ''}\")",
                 "tagger(\"turn on the lights\", ignore_labels=[])"] if task != "intent" else []), "```", "",
              f"{meta.get('architecture_note', '')}", "",
              "## Provenance", "",
              f"- run id: {summary.get('run_id')}", f"- ledger digest (HMAC-SHA256 of ledger.sqlite's SQL dump, keyed with the run directory's ledger.key): {meta.get('ledger_digest')}",
              f"- exported by dpfl from {meta.get('run_dir')}", ""]
    return "\n".join(lines)


def _oos_card(o: dict | None) -> list[str]:
    """The model card's out-of-scope lines from summary.json's ``out_of_scope`` (none without it)."""
    from dpfl.commands.simulate import round_figure

    if not o:
        return []
    held = o.get("oos_intents") or []
    what = (f"{len(held)} intents held out of training ({', '.join(held[:6])}{', ...' if len(held) > 6 else ''})"
            if held else f"utterances labelled {o.get('oos_label')!r}")
    src = ("a public value given before the run (no privacy cost)" if o.get("threshold_source") == "public" else
           f"the {round_figure(o.get('quantile'))}-quantile of the devices' holdout confidences, released with noise "
           f"(epsilon {round_figure(o.get('threshold_epsilon'), 2)} for holdout examples; training examples unaffected)")
    cls = " or when the top class is the out-of-scope class" if o.get("oos_index") is not None else ""
    return ["## Out-of-scope detection", "",
            f"- out of scope in the test split: {what}",
            f"- rule: reject when the largest softmax probability over the in-scope intents is below "
            f"{round_figure(o.get('threshold'), 4)}{cls}; `dpfl predict` applies it (`out_of_scope` in its output), "
            "`transformers.pipeline` does not",
            f"- threshold: {src}",
            f"- test split: in-scope accuracy {round_figure(o.get('in_scope_accuracy'))} (rejections count as errors), "
            f"out-of-scope recall {round_figure(o.get('oos_recall'))}, precision {round_figure(o.get('oos_precision'))}, "
            f"overall accuracy {round_figure(o.get('overall_accuracy'))}, AUROC {round_figure(o.get('auroc'))} "
            f"({o.get('in_scope')} in-scope and {o.get('out_of_scope')} out-of-scope utterances)", ""]


def export_run(run_dir: str | Path, out: str | Path) -> dict:
    """Write the export of ``run_dir`` into ``out``; return its ``dpfl.json`` payload.

    Raises
    ------
    rundir.RunDirError, nlu.export.ExportError
        For a directory without a finished checkpoint, a non-intent task, an ``out`` that holds files.
    """
    from report import build_report
    from rundir import RunDirError, ledger_path, read_oos, read_summary

    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunDirError(f"--out {out}: exists and is not an empty folder; choose a new one")
    cfg, model, labels, tok = run_model(run_dir)
    intent, token = stock_models(cfg, model, labels)
    try:
        summary = read_summary(run_dir).to_dict()
    except (FileNotFoundError, ValueError):
        summary = build_report(run_dir)
    if summary.get("rounds_completed") != _rounds_done(run_dir):  # a report older than the checkpoint
        summary = build_report(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.model_max_length = int(cfg.max_length)
    # the intent classifier in DIR; the token classifier in DIR (slots) or DIR/slots (joint)
    dirs = ([(intent, out)] if intent is not None else []) + (
        [(token, out / SLOTS_DIR if intent is not None else out)] if token is not None else [])
    for hf, where in dirs:
        where.mkdir(parents=True, exist_ok=True)
        hf.save_pretrained(where, safe_serialization=True)
        tok.save_pretrained(where)
    mean = intent is not None and type(intent).__name__ == "XLMForSequenceClassification"
    note = ("Stored as transformers' XLMForSequenceClassification with summary_type 'mean': it computes exactly "
            "the run's BERT encoder, mean of the token states and linear head for one utterance at a time (the "
            "pipeline's default); batched with padding the mean would include the padding." if mean else
            "Stored as BertForSequenceClassification." if intent is not None else "")
    if token is not None:
        note += ((" " if note else "") + "The slot tagger is BertForTokenClassification "
                 f"(`pipeline(\"token-classification\", model={'PATH/' + SLOTS_DIR if intent is not None else 'PATH'})`); "
                 "a word's tag is the tag of its first sub-token.")
    meta = {
        "version": 1, "run_id": summary.get("run_id"), "run_dir": str(run_dir.resolve()),
        "ledger_digest": ledger_digest(ledger_path(run_dir)), "max_length": int(cfg.max_length), "pooling": cfg.pooling,
        "round": summary.get("rounds_completed"), "test_accuracy": summary.get("final_accuracy"),
        "task": cfg.task, "labels": labels if intent is not None else [],
        "slot_names": slot_names_of(cfg) if token is not None else [],
        "slots_dir": (SLOTS_DIR if intent is not None else ".") if token is not None else None,
        "out_of_scope": oos_rule(read_oos(run_dir)),
        "architecture_note": note,
    }
    (out / EXPORT_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    (out / "README.md").write_text(model_card(summary, meta))
    return meta


def _rounds_done(run_dir: Path) -> int | None:
    from rundir import read_checkpoint_state

    return (read_checkpoint_state(run_dir) or {}).get("round")


def oos_rule(oos: dict | None) -> dict | None:
    """The out-of-scope rule of a run's ``oos.json`` (None without one): ``threshold`` (tau, on the
    max-softmax confidence over the in-scope classes), ``threshold_source``, ``score``,
    ``oos_label`` and ``oos_index`` (the model's out-of-scope class, or None)."""
    if not oos:
        return None
    return {k: oos.get(k) for k in ("threshold", "threshold_source", "score", "oos_label", "oos_index")}


class Predictor:
    """A classifier and/or a slot tagger and their tokenizer; :meth:`predict` labels one utterance at a time.

    ``model``: the intent classifier (None for a slot-only run); ``tagger``: the token classifier
    (None for an intent run); ``oos``: the run's out-of-scope rule (:func:`oos_rule`), or None.
    """

    def __init__(self, model, tokenizer, max_length: int, oos: dict | None = None, tagger=None):
        self.model = model.eval() if model is not None else None
        self.tagger = tagger.eval() if tagger is not None else None
        self.tokenizer, self.max_length, self.oos = tokenizer, int(max_length), oos
        self.id2label = {int(k): v for k, v in model.config.id2label.items()} if model is not None else {}
        self.id2tag = {int(k): v for k, v in tagger.config.id2label.items()} if tagger is not None else {}

    def predict(self, text: str) -> dict:
        """``{"text", "label", "probability"}`` (the top class and its softmax probability) of
        ``text``, with ``out_of_scope`` (bool) and ``confidence`` where the model has a threshold:
        true when the largest probability over the in-scope classes is below it, or the top class
        is the out-of-scope class (nlu/oos.py); with a tagger, ``slots``: ``[{"word", "tag"}]`` for
        the whitespace-separated words (a word's tag is its first sub-token's)."""
        import numpy as np
        import torch

        from nlu.oos import confidences, rejected

        out: dict = {"text": text}
        if self.model is not None:
            enc = self.tokenizer([text], truncation=True, max_length=self.max_length, return_tensors="pt")
            with torch.no_grad():
                probs = torch.softmax(self.model(**enc).logits[0].double(), dim=-1)
            k = int(probs.argmax())
            out.update({"label": self.id2label[k], "probability": round(float(probs[k]), 6)})
            if self.oos is not None:
                idx = self.oos.get("oos_index")
                top, _, conf = confidences(probs.numpy()[None, :], idx)
                out["out_of_scope"] = bool(rejected(top, conf, float(self.oos["threshold"]), idx)[0])
                out["confidence"] = round(float(np.asarray(conf)[0]), 6)
        if self.tagger is not None:
            words = text.split()
            enc = self.tokenizer([words], is_split_into_words=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            with torch.no_grad():
                pred = self.tagger(**{k: v for k, v in enc.items()}).logits[0].argmax(-1).tolist()
            first: dict[int, int] = {}
            for pos, w in enumerate(enc.word_ids(0)):
                if w is not None and w not in first:
                    first[w] = pos
            out["slots"] = [{"word": w, "tag": self.id2tag[pred[first[i]]] if i in first else "O"}
                            for i, w in enumerate(words)]
        return out


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
        from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        meta = json.loads((path / EXPORT_FILE).read_text())
        task = meta.get("task", "intent")
        intent = AutoModelForSequenceClassification.from_pretrained(path) if task != "slots" else None
        tagger = (AutoModelForTokenClassification.from_pretrained(path / (meta.get("slots_dir") or "."))
                  if task != "intent" else None)
        return Predictor(intent, AutoTokenizer.from_pretrained(path), meta["max_length"], meta.get("out_of_scope"), tagger)
    if config_path(path).is_file():
        from rundir import read_oos

        cfg, model, labels, tok = run_model(path)
        intent, tagger = stock_models(cfg, model, labels)
        return Predictor(intent, tok, cfg.max_length, oos_rule(read_oos(path)), tagger)
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
    what = {"intent": "model", "slots": "slot tagger", "joint": f"model, slot tagger in {SLOTS_DIR}/"}[meta["task"]]
    print(f"exported run {meta['run_id']} (round {meta['round']}, test accuracy {round_figure(meta['test_accuracy'])}) to "
          f"{ns.out}: {what}, tokenizer, README.md (model card), {EXPORT_FILE}")
    return 0


@exits
def run_predict(ns: argparse.Namespace) -> int:
    """``dpfl predict``: one JSON line per utterance on stdout."""
    predictor = load_predictor(ns.model)
    for text in (ns.texts or _stdin_texts()):
        print(json.dumps(predictor.predict(text)), flush=True)
    return 0
