"""Tokenisation, collation into padded batches, per-example loss and evaluation."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Encoded:
    """Token ids of N texts (unpadded) and their labels.

    Attributes
    ----------
    input_ids : list[list[int]]
        Per text, its token ids including [CLS]/[SEP], truncated to ``max_length``.
    labels : numpy.ndarray, shape [N], int64
    """

    input_ids: list[list[int]]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(texts: list[str], labels, tokenizer, max_length: int) -> Encoded:
    """Tokenise ``texts`` once (truncate to ``max_length`` tokens, no padding)."""
    ids = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)["input_ids"]
    return Encoded(input_ids=[list(x) for x in ids], labels=np.asarray(labels, dtype=np.int64))


def collate(enc: Encoded, idx, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad the examples ``idx`` to their longest length.

    Returns
    -------
    dict
        ``input_ids``, ``attention_mask``, ``token_type_ids``, ``position_ids`` (all [B, L],
        int64; position ids are explicit per row, which Opacus' embedding rule needs) and
        ``labels`` [B].
    """
    idx = np.asarray(idx, dtype=np.int64)
    rows = [enc.input_ids[i] for i in idx]
    b = len(rows)
    lens = np.fromiter(map(len, rows), dtype=np.int64, count=b)
    length = max(int(lens.max(initial=0)), 1)
    present = np.arange(length) < lens[:, None]  # right padding: row i holds lens[i] tokens
    ids = np.full((b, length), pad_id, dtype=np.int64)
    ids[present] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lens.sum()))
    input_ids = torch.from_numpy(ids)
    mask = torch.from_numpy(present.astype(np.int64))
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(input_ids),
        "position_ids": torch.arange(length, dtype=torch.long).unsqueeze(0).expand(b, length).contiguous(),
        "labels": torch.as_tensor(enc.labels[idx], dtype=torch.long),
    }


def logits_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Classifier logits [B, num_labels] for a collated batch."""
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        token_type_ids=batch["token_type_ids"],
        position_ids=batch["position_ids"],
    ).logits


def per_example_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of each example, shape [B] (not reduced: DP-SGD clips per example)."""
    return F.cross_entropy(logits_of(model, batch), batch["labels"], reduction="none")


def _batches(model: nn.Module, enc: Encoded, batch_size: int):
    """Yield (row indices, collated batch, logits [B, num_labels]) over ``enc`` in batches of
    similar length, with ``model`` in eval mode for the pass (restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        order = np.argsort([len(x) for x in enc.input_ids], kind="stable")
        for start in range(0, len(enc), batch_size):
            idx = order[start : start + batch_size]
            batch = collate(enc, idx)
            yield idx, batch, logits_of(model, batch)
    finally:
        model.train(was_training)


@torch.no_grad()
def predict(model: nn.Module, enc: Encoded, batch_size: int = 128) -> tuple[np.ndarray, float]:
    """Predicted label ids [N] and mean cross-entropy of ``model`` on ``enc``.

    The model is put in eval mode for the pass and restored afterwards.
    """
    out = np.empty(len(enc), dtype=np.int64)
    total, count = 0.0, 0
    for idx, batch, logits in _batches(model, enc, batch_size):
        total += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
        count += len(idx)
        out[idx] = logits.argmax(-1).numpy()
    return out, (total / count if count else float("nan"))


@torch.no_grad()
def predict_proba(model: nn.Module, enc: Encoded, batch_size: int = 128) -> np.ndarray:
    """Softmax probabilities [N, num_labels], float64, of ``model`` on ``enc`` (eval mode for the pass)."""
    out: np.ndarray | None = None
    for idx, _, logits in _batches(model, enc, batch_size):
        probs = torch.softmax(logits.double(), dim=-1).numpy()
        if out is None:
            out = np.empty((len(enc), probs.shape[1]), dtype=np.float64)
        out[idx] = probs
    return out if out is not None else np.empty((0, 0), dtype=np.float64)
