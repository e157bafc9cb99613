"""The NLU task of a run (``--task intent | slots | joint``): one object for every task-specific step.

A :class:`Task` encodes a split, collates batches, computes the per-example loss that DP-SGD
clips, builds the model and evaluates it, so that client and server code never branch on the
task::

    task = task_for_data(cfg.task, data, slot_loss_weight=cfg.slot_loss_weight, pooling=cfg.pooling)
    enc = task.encode(data.train, tokenizer, cfg.max_length)
    model = task.build_model(cfg.model, seed=cfg.seed)
    loss = task.per_example_loss(model, task.collate(enc, idx))   # [B], one value per utterance
    metrics = task.evaluate(model, test_enc)

Tasks:

- ``intent``: sequence classification on ``text``; exactly :mod:`nlu.data` / :func:`nlu.model.build_model`
  / :func:`nlu.metrics.intent_metrics` (the same numbers as calling those directly).
- ``slots``: BIO tagging of the words in ``tokens`` (one tag per word, aligned to sub-words by
  :mod:`nlu.slots`); loss = the utterance's slot loss.
- ``joint``: one encoder, an intent head and a slot head (:mod:`nlu.joint`); loss = intent
  cross-entropy + ``slot_loss_weight`` * slot loss. The encoder reads ``tokens`` (the words),
  not ``text``, so that the intent and the tags see the same input.

The slot loss of an utterance is the SUM over its labelled words (first sub-tokens) of the
tag cross-entropy (``slot_reduction="sum"``, default), or their mean (``"mean"``). Either way
it is one number per utterance, never per token: the privacy unit of DP-SGD is the utterance,
and the engines clip the gradient of each entry of the returned [B] vector.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nlu import data as _intent
from nlu.congruent import TEACHER_KEY, focal_distillation
from nlu.metrics import intent_metrics
from nlu.slots import IGNORE_INDEX, SlotEncoded, collate_slots, encode_slots, sentence_accuracy, sentence_correct, slot_metrics, word_tags

TASKS = ("intent", "slots", "joint")
SLOT_REDUCTIONS = ("sum", "mean")


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "position_ids")}


class Task:
    """Interface of a task (see the module docstring); use :func:`make_task` to get one.

    Attributes
    ----------
    name : str
        ``"intent"``, ``"slots"`` or ``"joint"``.
    num_labels : int
        Number of intents.
    slot_names : list of str or None
        BIO tag vocabulary (``"O"`` first); None for the intent task.
    metric_names : tuple of str
        Keys of :meth:`evaluate`'s result.
    """

    name: str
    uses_slots: bool = False
    metric_names: tuple[str, ...] = ("accuracy", "macro_f1", "test_loss")

    def __init__(self, num_labels: int, slot_names: list[str] | None = None, pooling: str | None = None,
                 pc_weight: float = 0.0):
        self.num_labels = int(num_labels)
        self.slot_names = None if slot_names is None else list(slot_names)
        self.pooling = pooling
        if not (pc_weight >= 0 and math.isfinite(pc_weight)):
            raise ValueError(f"--pc-weight: must be a finite number >= 0, got {pc_weight}")
        #: weight lambda of the focal distillation term (positive-congruent training, nlu/congruent.py)
        self.pc_weight = float(pc_weight)

    def _with_pc(self, loss: torch.Tensor, intent_logits: torch.Tensor | None, batch) -> torch.Tensor:
        """``loss`` [B] plus ``pc_weight`` * the focal distillation term when the batch carries the
        previous release's logits (``batch["teacher_logits"]`` [B, C]); ``loss`` unchanged otherwise."""
        if self.pc_weight <= 0 or TEACHER_KEY not in batch or intent_logits is None:
            return loss
        return loss + self.pc_weight * focal_distillation(intent_logits, batch[TEACHER_KEY], batch["labels"])

    def intent_logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:  # pragma: no cover
        """Intent logits [B, num_labels] of a collated batch (None for a task without intents)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, num_labels={self.num_labels})"

    def encode(self, rows, tokenizer, max_length: int):  # pragma: no cover - interface
        """Tokenise a split (a ``datasets.Dataset`` or a mapping of columns) once."""
        raise NotImplementedError

    def collate(self, enc, idx) -> dict[str, torch.Tensor]:  # pragma: no cover - interface
        """Padded batch of the examples ``idx`` of ``enc`` (tensors, position ids explicit [B, L])."""
        raise NotImplementedError

    def per_example_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover
        """Loss of each utterance, shape [B] (not reduced: DP-SGD clips per utterance).

        With ``pc_weight`` > 0 and the previous release's logits in ``batch["teacher_logits"]``,
        the loss includes the focal distillation term (:mod:`nlu.congruent`), computed from the
        same forward pass.
        """
        raise NotImplementedError

    def build_model(self, model_name: str, seed: int = 0) -> nn.Module:  # pragma: no cover - interface
        """The task's model, every parameter trainable, in train mode."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, enc, batch_size: int = 128, with_correct: bool = False) -> dict[str, float]:  # pragma: no cover
        """Metrics of ``model`` on ``enc`` (eval mode for the pass, restored afterwards).

        ``with_correct`` adds ``"correct"``: a bool array [N], whether each example's intent is
        predicted correctly (for ``slots``: whether every word tag is), for flip rates
        (:mod:`server.releases`).
        """
        raise NotImplementedError


class IntentTask(Task):
    """Intent classification: a thin wrapper of :mod:`nlu.data`, :mod:`nlu.model` and :mod:`nlu.metrics`."""

    name = "intent"

    def encode(self, rows, tokenizer, max_length: int) -> _intent.Encoded:
        return _intent.encode(rows["text"], rows["label"], tokenizer, max_length)

    def collate(self, enc, idx) -> dict[str, torch.Tensor]:
        return _intent.collate(enc, idx)

    def per_example_loss(self, model, batch):
        if self.pc_weight <= 0 or TEACHER_KEY not in batch:
            return _intent.per_example_loss(model, batch)
        logits = _intent.logits_of(model, batch)
        return self._with_pc(F.cross_entropy(logits, batch["labels"], reduction="none"), logits, batch)

    def intent_logits(self, model, batch):
        """The classifier's logits [B, num_labels]."""
        return _intent.logits_of(model, batch)

    def build_model(self, model_name: str, seed: int = 0) -> nn.Module:
        from nlu.model import build_model

        if self.pooling is None:
            return build_model(model_name, self.num_labels, seed=seed)
        return build_model(model_name, self.num_labels, seed=seed, pooling=self.pooling)

    def probabilities(self, model, enc, batch_size: int = 128) -> np.ndarray:
        """Softmax probabilities [N, num_labels] (float64) of ``model`` on ``enc`` (out-of-scope detection)."""
        return _intent.predict_proba(model, enc, batch_size=batch_size)

    def evaluate(self, model, enc, batch_size: int = 128, with_correct: bool = False) -> dict[str, float]:
        preds, loss = _intent.predict(model, enc, batch_size=batch_size)
        out = intent_metrics(enc.labels, preds, self.num_labels)
        out["test_loss"] = loss
        if with_correct:
            out["correct"] = np.asarray(preds) == np.asarray(enc.labels)
        return out


class SlotTask(Task):
    """Slot filling (``with_intent=False``, task ``slots``) or joint intent + slots (task ``joint``).

    Parameters
    ----------
    num_labels : int
        Number of intents (ignored by the model of the ``slots`` task).
    slot_names : list of str
        BIO tag vocabulary, ``"O"`` first.
    with_intent : bool
    slot_loss_weight : float
        Weight of the slot loss in the joint loss.
    slot_reduction : {"sum", "mean"}
        Slot loss of an utterance: sum or mean of the tag cross-entropy over its labelled words.
    pooling : {"mean", "cls"}, optional
        Sentence state of the intent head (see :class:`nlu.joint.JointModel`); default "mean".
    """

    uses_slots = True

    def __init__(
        self,
        num_labels: int,
        slot_names: list[str],
        *,
        with_intent: bool,
        slot_loss_weight: float = 1.0,
        slot_reduction: str = "sum",
        pooling: str | None = None,
        pc_weight: float = 0.0,
    ):
        super().__init__(num_labels, slot_names, pooling, pc_weight)
        self.with_intent = bool(with_intent)
        self.name = "joint" if with_intent else "slots"
        if not (slot_loss_weight >= 0 and math.isfinite(slot_loss_weight)):
            raise ValueError(f"--slot-loss-weight: must be a finite number >= 0, got {slot_loss_weight}")
        if slot_reduction not in SLOT_REDUCTIONS:
            raise ValueError(f"slot_reduction must be one of {SLOT_REDUCTIONS}, got {slot_reduction!r}")
        self.slot_loss_weight = float(slot_loss_weight)
        self.slot_reduction = slot_reduction
        self.metric_names = ("accuracy", "macro_f1", "test_loss", "slot_f1", "slot_precision", "slot_recall", "sentence_accuracy")

    def encode(self, rows, tokenizer, max_length: int) -> SlotEncoded:
        cols = rows.column_names if hasattr(rows, "column_names") else list(rows)
        missing = [c for c in ("tokens", "slots", "label") if c not in cols]
        if missing:
            raise ValueError(
                f"--task {self.name}: the data has no {' / '.join(repr(m) for m in missing)} column "
                f"(columns: {', '.join(cols)}); slot filling needs 'tokens' and 'slots' (BIO tags) on every "
                "record (e.g. SNIPS-style JSONL via --data-dir, or the built-in synthetic set), or use --task intent"
            )
        return encode_slots(rows["tokens"], rows["slots"], rows["label"], tokenizer, max_length, self.slot_names)

    def collate(self, enc: SlotEncoded, idx) -> dict[str, torch.Tensor]:
        return collate_slots(enc, idx)

    def _losses(self, out, batch) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(intent CE [B] or None, slot loss [B]) of a model output."""
        slot_labels = batch["slot_labels"]
        tok = F.cross_entropy(out.slot_logits.transpose(1, 2), slot_labels, ignore_index=IGNORE_INDEX, reduction="none")
        slot = tok.sum(1)  # ignored positions contribute exactly 0
        if self.slot_reduction == "mean":
            slot = slot / (slot_labels != IGNORE_INDEX).sum(1).clamp_min(1).to(slot.dtype)
        intent = None
        if self.with_intent:
            intent = F.cross_entropy(out.intent_logits, batch["labels"], reduction="none")
        return intent, slot

    def _combine(self, intent, slot) -> torch.Tensor:
        return slot if intent is None else intent + self.slot_loss_weight * slot

    def per_example_loss(self, model, batch):
        """Per-utterance loss [B]: intent CE + slot_loss_weight * slot loss (joint), or slot loss (slots);
        with ``pc_weight`` the joint task adds the focal distillation term on its intent logits."""
        out = model(**_model_inputs(batch))
        loss = self._combine(*self._losses(out, batch))
        return self._with_pc(loss, out.intent_logits if self.with_intent else None, batch)

    def intent_logits(self, model, batch):
        """The intent head's logits [B, num_labels] (joint), None for the slots task."""
        return model(**_model_inputs(batch)).intent_logits if self.with_intent else None

    def build_model(self, model_name: str, seed: int = 0) -> nn.Module:
        from nlu.joint import build_joint_model

        return build_joint_model(
            model_name,
            self.num_labels if self.with_intent else 0,
            len(self.slot_names),
            seed=seed,
            pooling=self.pooling or "mean",
        )

    @torch.no_grad()
    def predict(self, model, enc: SlotEncoded, batch_size: int = 128):
        """(intent predictions [N] or None, word-level predicted tags, mean loss, mean slot loss)."""
        was_training = model.training
        model.eval()
        n = len(enc)
        intents = np.empty(n, dtype=np.int64) if self.with_intent else None
        tags: list[list[str] | None] = [None] * n
        total = total_slot = 0.0
        order = np.argsort([len(x) for x in enc.input_ids], kind="stable")
        try:
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                batch = self.collate(enc, idx)
                out = model(**_model_inputs(batch))
                intent, slot = self._losses(out, batch)
                total += float(self._combine(intent, slot).sum())
                total_slot += float(slot.sum())
                if intents is not None:
                    intents[idx] = out.intent_logits.argmax(-1).numpy()
                tok_pred = out.slot_logits.argmax(-1).numpy()
                for row, i in enumerate(idx):
                    tags[i] = word_tags(tok_pred[row], enc.word_starts[i], self.slot_names)
        finally:
            model.train(was_training)
        mean = (lambda s: s / n) if n else (lambda s: float("nan"))
        return intents, tags, mean(total), mean(total_slot)

    def evaluate(self, model, enc: SlotEncoded, batch_size: int = 128, with_correct: bool = False) -> dict[str, float]:
        """Intent accuracy and macro-F1 (NaN for ``slots``), mean per-utterance loss (``test_loss``),
        span-level slot precision/recall/F1 (seqeval, conlleval style) and sentence accuracy
        (intent and every word tag right; for ``slots`` every word tag right)."""
        intents, tags, loss, slot_loss = self.predict(model, enc, batch_size)
        if intents is not None:
            out = intent_metrics(enc.labels, intents, self.num_labels)
        else:
            out = {"accuracy": float("nan"), "macro_f1": float("nan")}
        out["test_loss"] = loss
        out["test_slot_loss"] = slot_loss
        out.update(slot_metrics(enc.gold_tags, tags))
        out["sentence_accuracy"] = sentence_accuracy(
            enc.gold_tags, tags, enc.labels if intents is not None else None, intents
        )
        if with_correct:
            if intents is not None:
                out["correct"] = np.asarray(intents) == np.asarray(enc.labels)
            else:
                out["correct"] = sentence_correct(enc.gold_tags, tags)
        return out


def make_task(
    name: str,
    num_labels: int,
    slot_names: list[str] | None = None,
    slot_loss_weight: float = 1.0,
    *,
    slot_reduction: str = "sum",
    pooling: str | None = None,
    pc_weight: float = 0.0,
) -> Task:
    """The task ``name`` (``"intent"``, ``"slots"`` or ``"joint"``).

    Parameters
    ----------
    name : str
    num_labels : int
        Number of intents.
    slot_names : list of str, optional
        BIO tag vocabulary (``NLUData.slot_names``); required for ``slots`` and ``joint``.
    slot_loss_weight : float
        Joint loss = intent CE + slot_loss_weight * slot loss.
    slot_reduction : {"sum", "mean"}
        Per-utterance slot loss: sum (default) or mean over the utterance's labelled words.
    pooling : {"mean", "cls"}, optional
        Sentence pooling of the intent head (``intent``: passed to :func:`nlu.model.build_model`;
        None keeps its default).
    pc_weight : float
        Weight lambda >= 0 of the focal distillation term of positive-congruent training
        (:mod:`nlu.congruent`), applied to the intent logits when a batch carries the previous
        release's logits; 0 (default) turns it off. ``slots`` has no intent logits: the term is never added.

    Raises
    ------
    ValueError
        Unknown task; ``slots``/``joint`` without a slot vocabulary (the data has no slot annotations).
    """
    if name not in TASKS:
        raise ValueError(f"--task: unknown task {name!r}; choose one of {TASKS}")
    if name == "intent":
        return IntentTask(num_labels, slot_names, pooling, pc_weight)
    if not slot_names:
        raise ValueError(
            f"--task {name}: the data has no slot annotations ('tokens' and 'slots' BIO tags per record); "
            "use data that has them (e.g. SNIPS-style JSONL via --data-dir, or the built-in synthetic set) "
            "or --task intent"
        )
    return SlotTask(
        num_labels,
        slot_names,
        with_intent=name == "joint",
        slot_loss_weight=slot_loss_weight,
        slot_reduction=slot_reduction,
        pooling=pooling,
        pc_weight=pc_weight,
    )


def task_for_data(name: str, data, slot_loss_weight: float = 1.0, **kwargs) -> Task:
    """:func:`make_task` for a loaded :class:`partitions.loading.NLUData`; errors name the data source.

    Raises
    ------
    ValueError
        ``slots``/``joint`` on data without slot annotations ("--task joint: ... <source> ...").
    """
    if name in ("slots", "joint") and not data.slot_names:
        raise ValueError(
            f"--task {name}: the data ({data.source}) has no slot annotations ('tokens' and 'slots' BIO "
            "tags per record); use data that has them (e.g. SNIPS-style JSONL via --data-dir, or the "
            "built-in synthetic set) or --task intent"
        )
    return make_task(name, data.num_labels, data.slot_names, slot_loss_weight, **kwargs)
