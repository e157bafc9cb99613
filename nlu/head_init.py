"""A public prior for the intent head: start as a prototype classifier on the label names.

The label schema (the intents' names, or a public description of each) is public: it is what
the model is asked to predict. The encoder's embedding of each label's text, ``e_c`` (the same
mean-pooled sentence embedding the head reads), is a class prototype; a head with rows
``W_c = TAU * e_c / |e_c| / mean_c |e_c|`` and zero bias scores an utterance with features ``f`` by
``f . W_c``, proportional to the cosine of ``f`` and ``e_c``: the cosine (prototype)
classifier of few-shot and zero-shot classification (Snell et al. 2017, "Prototypical networks";
Gidaris & Komodakis 2018, "Dynamic few-shot visual learning without forgetting", a cosine
classifier with a fixed scale). The scale turns cosines (about 0.1 apart between the best two
classes) into logits a softmax can use: ``TAU`` = 20 on features whose norm is about the label
embeddings' (the mean label-embedding norm, public, stands for it). Nothing here reads a training
example; the private training then starts from this head instead of a random one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from nlu.pooling import MeanPoolClassifier, masked_mean

__all__ = ["LABEL_TEXT_MAX_LENGTH", "TAU", "HeadInitError", "label_texts", "label_name_text", "init_head_from_texts", "labels_are_text"]

#: Inverse temperature of the cosine classifier the head starts as (see the module docstring).
TAU = 20.0
#: Tokens of a label's text (a name or a public description) embedded for the head.
LABEL_TEXT_MAX_LENGTH = 128


class HeadInitError(ValueError):
    """The label texts cannot be built (e.g. a malformed ``--label-descriptions`` file); the message names it."""


def label_name_text(name) -> str:
    """A label name as words: ``card_arrival`` -> ``card arrival``, ``AddToPlaylist`` -> ``add to playlist``."""
    text = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", str(name))
    return re.sub(r"[_\-./:]+", " ", text).strip().lower()


def labels_are_text(names) -> bool:
    """True when the label names carry words (not bare integers or one-character codes)."""
    words = [label_name_text(n) for n in names]
    return bool(words) and all(re.search(r"[a-z]{2,}", w) for w in words)


def label_texts(names, descriptions: str | Path | None = None) -> list[str]:
    """The text embedded for each label, in label-id order: its description from ``descriptions``
    (a JSON object ``{label: text}``) when given, else the label name as words.

    Raises
    ------
    HeadInitError
        If ``descriptions`` is unreadable, not a JSON object of strings, or misses a label
        (the message names the file and the first missing labels).
    """
    if descriptions is None:
        return [label_name_text(n) for n in names]
    path = Path(descriptions)
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeadInitError(f"--label-descriptions {path}: cannot read a JSON object ({exc})") from None
    if not isinstance(table, dict) or not all(isinstance(v, str) and v.strip() for v in table.values()):
        raise HeadInitError(f"--label-descriptions {path}: must be a JSON object {{label: non-empty text}}")
    missing = [str(n) for n in names if str(n) not in table]
    if missing:
        raise HeadInitError(f"--label-descriptions {path}: no description for {len(missing)} label(s), e.g. "
                            f"{', '.join(missing[:5])}")
    return [table[str(n)].strip() for n in names]


@torch.no_grad()
def init_head_from_texts(model: nn.Module, texts: list[str], tokenizer, max_length: int = 64) -> torch.Tensor:
    """Set ``model``'s intent head to the cosine classifier of ``texts`` (one per label, in id order).

    Parameters
    ----------
    model : nlu.pooling.MeanPoolClassifier
        The intent model (``classifier``: Linear(H, C)); its encoder embeds the texts in eval mode.
    texts : list of str, length C
    tokenizer
        The model's tokenizer.
    max_length : int
        Tokens per text.

    Returns
    -------
    torch.Tensor, shape [C, H]
        The label embeddings ``e_c`` (before scaling).

    Raises
    ------
    ValueError
        If ``model`` is not a mean-pooling intent model or ``len(texts)`` is not its number of labels.
    """
    if not isinstance(model, MeanPoolClassifier):
        raise ValueError("--head-init label-names needs the mean-pooling intent model (--pooling mean, --task intent)")
    head = model.classifier
    if len(texts) != head.out_features:
        raise ValueError(f"--head-init label-names: {len(texts)} label texts for a head of {head.out_features} labels")
    was_training = model.training
    model.eval()
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    device = head.weight.device
    batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    emb = masked_mean(model.encoder(**batch).last_hidden_state, batch["attention_mask"])  # [C, H]
    norms = emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
    head.weight.copy_(TAU * emb / norms / norms.mean())
    head.bias.zero_()
    model.train(was_training)
    return emb
