"""Slot filling: word-level BIO tags aligned to sub-word tokens, batches, and span metrics.

Alignment (the usual first-sub-token rule): the words of an utterance (its ``tokens``) are
tokenised with ``is_split_into_words=True``; the fast tokenizer's ``word_ids`` says which word
each sub-word token came from. The first sub-token of each word carries the word's tag id;
every other sub-token, [CLS], [SEP] and padding get -100 (ignored by the loss). At evaluation
the prediction at a word's first sub-token is the word's predicted tag, and metrics are
computed on words, never on sub-tokens.

A word whose sub-tokens were all cut off by ``max_length`` (or a word the tokenizer maps to no
token at all, such as an empty string) has no position in the model's input; it is predicted
``"O"``, so truncation costs recall in the reported slot F1 instead of being hidden.

Metrics (:func:`slot_metrics`): span-level precision, recall and F1 with seqeval in its
default mode, which follows conlleval: a span counts only when its type, start and end all
match exactly (a partially found span is one false negative and one false positive), and an
``I-x`` tag that does not continue an ``x`` span starts a new span, as in conlleval.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from nlu.data import collate as _collate_intent

IGNORE_INDEX = -100


@dataclass
class SlotEncoded:
    """Sub-word token ids of N utterances with their intent labels and aligned slot tags.

    Attributes
    ----------
    input_ids : list[list[int]]
        Per utterance, its token ids including [CLS]/[SEP], truncated to ``max_length``.
    labels : numpy.ndarray, shape [N], int64
        Intent label ids.
    slot_labels : list[list[int]]
        Per utterance, one entry per token of ``input_ids``: the tag id at each word's first
        sub-token, -100 elsewhere.
    word_starts : list[numpy.ndarray]
        Per utterance, per word: the position of the word's first sub-token in ``input_ids``,
        or -1 when the word has none (truncated away or empty).
    gold_tags : list[list[str]]
        Per utterance, the word-level tags (all words, also truncated ones), for metrics.
    """

    input_ids: list[list[int]]
    labels: np.ndarray
    slot_labels: list[list[int]]
    word_starts: list[np.ndarray]
    gold_tags: list[list[str]]

    def __len__(self) -> int:
        return len(self.input_ids)


def align_tags(word_ids: list[int | None], tag_ids: list[int]) -> list[int]:
    """Slot label per sub-token: ``tag_ids[w]`` at the first sub-token of word ``w``, else -100.

    Parameters
    ----------
    word_ids : list of int or None
        The fast tokenizer's ``word_ids()`` of one utterance (None for special tokens).
    tag_ids : list of int
        Tag id of each word.
    """
    out, prev = [], None
    for w in word_ids:
        out.append(tag_ids[w] if w is not None and w != prev else IGNORE_INDEX)
        prev = w
    return out


def first_subtoken_positions(word_ids: list[int | None], num_words: int) -> np.ndarray:
    """Position of each word's first sub-token, -1 for words with none; shape [num_words]."""
    pos = np.full(num_words, -1, dtype=np.int64)
    for i, w in enumerate(word_ids):
        if w is not None and pos[w] < 0:
            pos[w] = i
    return pos


def encode_slots(
    tokens: list[list[str]],
    tags: list[list[str]],
    labels,
    tokenizer,
    max_length: int,
    slot_names: list[str],
) -> SlotEncoded:
    """Tokenise word lists once (truncate to ``max_length``, no padding) and align their tags.

    Raises
    ------
    ValueError
        If the tokenizer is not a fast one (no ``word_ids``), an utterance's tags and words
        differ in number, or a tag is not in ``slot_names``.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("slot filling needs a fast (Rust) tokenizer for word_ids(); this model has none")
    index = {t: i for i, t in enumerate(slot_names)}
    tokens = [list(t) for t in tokens]
    tags = [list(t) for t in tags]
    enc = tokenizer(tokens, is_split_into_words=True, truncation=True, max_length=max_length, padding=False)
    input_ids, slot_labels, starts = [], [], []
    for i, (words, word_tags) in enumerate(zip(tokens, tags)):
        if len(words) != len(word_tags):
            raise ValueError(f"utterance {i}: {len(words)} tokens but {len(word_tags)} slot tags")
        try:
            tag_ids = [index[t] for t in word_tags]
        except KeyError as exc:
            raise ValueError(f"utterance {i}: slot tag {exc.args[0]!r} is not in the slot vocabulary") from None
        wids = enc.word_ids(i)
        input_ids.append(list(enc["input_ids"][i]))
        slot_labels.append(align_tags(wids, tag_ids))
        starts.append(first_subtoken_positions(wids, len(words)))
    return SlotEncoded(
        input_ids=input_ids,
        labels=np.asarray(labels, dtype=np.int64),
        slot_labels=slot_labels,
        word_starts=starts,
        gold_tags=tags,
    )


def collate_slots(enc: SlotEncoded, idx, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """:func:`nlu.data.collate` of ``idx`` plus ``slot_labels`` [B, L] (int64, -100 on padding)."""
    idx = np.asarray(idx, dtype=np.int64)
    batch = _collate_intent(enc, idx, pad_id)
    slot = torch.full(batch["input_ids"].shape, IGNORE_INDEX, dtype=torch.long)
    for row, i in enumerate(idx):
        s = enc.slot_labels[i]
        slot[row, : len(s)] = torch.tensor(s, dtype=torch.long)
    batch["slot_labels"] = slot
    return batch


def word_tags(token_pred: np.ndarray, word_starts: np.ndarray, slot_names: list[str]) -> list[str]:
    """Word-level predicted tags from per-sub-token predicted ids [L] ("O" for words without a position)."""
    return [slot_names[int(token_pred[p])] if p >= 0 else "O" for p in word_starts]


def slot_metrics(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Span-level (conlleval-style exact match) precision, recall and micro-F1 over all utterances.

    Returns NaN for all three when there are no utterances; with no gold and no predicted span
    at all, precision/recall/F1 are 0 (seqeval's convention).
    """
    from seqeval.metrics import f1_score, precision_score, recall_score

    if len(gold) == 0:
        return {"slot_f1": float("nan"), "slot_precision": float("nan"), "slot_recall": float("nan")}
    if len(gold) != len(pred) or any(len(g) != len(p) for g, p in zip(gold, pred)):
        raise ValueError("gold and predicted tag sequences differ in number or length")
    gold = [list(g) for g in gold]
    pred = [list(p) for p in pred]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # UndefinedMetricWarning when there are no spans
        return {
            "slot_f1": float(f1_score(gold, pred, zero_division=0)),
            "slot_precision": float(precision_score(gold, pred, zero_division=0)),
            "slot_recall": float(recall_score(gold, pred, zero_division=0)),
        }


def sentence_accuracy(
    gold_tags: list[list[str]],
    pred_tags: list[list[str]],
    y_true: np.ndarray | None = None,
    y_pred: np.ndarray | None = None,
) -> float:
    """Share of utterances whose every word tag is right (and whose intent is right, when given).

    NaN for no utterances.
    """
    if len(gold_tags) == 0:
        return float("nan")
    ok = sentence_correct(gold_tags, pred_tags)
    if y_true is not None and y_pred is not None:
        ok &= np.asarray(y_true) == np.asarray(y_pred)
    return float(ok.mean())


def sentence_correct(gold_tags, pred_tags) -> np.ndarray:
    """Whether each utterance's every word tag is right: bool array [N]."""
    return np.array([list(g) == list(p) for g, p in zip(gold_tags, pred_tags)], dtype=bool)
