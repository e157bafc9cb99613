"""One encoder with an intent head and a slot head (joint intent detection and slot filling).

``encoder -> pooled sentence state -> dropout -> Linear(hidden, num_intents)`` for the intent
and ``encoder -> token states -> dropout -> Linear(hidden, num_slots)`` for the BIO tag of
every sub-token (Chen et al. 2019, "BERT for Joint Intent Classification and Slot Filling").
A slot-only model (``num_intents=0``) has no intent head and no pooler.

Only Linear, Embedding and LayerNorm modules carry parameters (the encoder is a Hugging Face
BERT-style ``AutoModel``), so both DP engines (``dp.engine`` and Opacus' hooks) handle every
parameter. Parameters that take no part in the loss would break per-example gradients, so
the encoder's own pooler is removed unless the intent head uses it (``pooling="cls"``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from nlu.model import TINY_MODEL, ModelError, resolve_model_path, tiny_config
from nlu.pooling import masked_mean

POOLINGS = ("mean", "cls")


class JointOutput(NamedTuple):
    """What :class:`JointModel` returns.

    Attributes
    ----------
    intent_logits : torch.Tensor [B, num_intents], or None for a slot-only model
    slot_logits : torch.Tensor [B, L, num_slots]
    """

    intent_logits: torch.Tensor | None
    slot_logits: torch.Tensor


class JointModel(nn.Module):
    """Encoder + optional intent head (on the pooled state) + slot head (on every token state).

    Parameters
    ----------
    encoder : torch.nn.Module
        A Hugging Face encoder returning ``last_hidden_state`` [B, L, H] (and
        ``pooler_output`` [B, H] when ``pooling="cls"`` and it has a pooler).
    num_intents : int
        Intent classes; 0 for a slot-only model (no intent head).
    num_slots : int
        BIO tag vocabulary size.
    pooling : {"mean", "cls"}
        Sentence state for the intent head: the masked mean of the token states (what
        all-MiniLM-L6-v2 was trained for), or the encoder's pooler on [CLS] (the [CLS] state
        itself when the encoder has no pooler).
    dropout : float
        Dropout on the states before both heads.
    """

    def __init__(self, encoder: nn.Module, num_intents: int, num_slots: int, pooling: str = "mean", dropout: float = 0.1):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"--pooling: must be one of {POOLINGS}, got {pooling!r}")
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.encoder = encoder
        self.config = encoder.config
        self.pooling = pooling
        self.num_intents = int(num_intents)
        self.num_slots = int(num_slots)
        if (self.num_intents == 0 or pooling == "mean") and getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # unused: no gradient, which per-example clipping cannot have
        hidden = encoder.config.hidden_size
        std = float(getattr(encoder.config, "initializer_range", 0.02))
        self.dropout = nn.Dropout(dropout)
        self.intent_head = nn.Linear(hidden, self.num_intents) if self.num_intents > 0 else None
        self.slot_head = nn.Linear(hidden, self.num_slots)
        for head in (self.intent_head, self.slot_head):
            if head is not None:
                nn.init.normal_(head.weight, std=std)
                nn.init.zeros_(head.bias)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, **_) -> JointOutput:
        """Logits of the intent [B, C] (None without an intent head) and of each token's tag [B, L, S]."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
        )
        states = out.last_hidden_state
        slot_logits = self.slot_head(self.dropout(states))
        intent_logits = None
        if self.intent_head is not None:
            if self.pooling == "mean":
                pooled = masked_mean(states, attention_mask)
            else:
                pooled = getattr(out, "pooler_output", None)
                if pooled is None:
                    pooled = states[:, 0]
            intent_logits = self.intent_head(self.dropout(pooled))
        return JointOutput(intent_logits, slot_logits)


def build_joint_model(
    name: str,
    num_intents: int,
    num_slots: int,
    *,
    seed: int = 0,
    pooling: str = "mean",
    dropout: float | None = None,
) -> JointModel:
    """Build a joint (or, with ``num_intents=0``, slot-only) model, every parameter trainable.

    Parameters
    ----------
    name : str
        ``"minilm"``, ``"tiny"`` (the random 2-layer BERT of :func:`nlu.model.tiny_config`) or
        any Hugging Face encoder name or local path.
    num_intents, num_slots : int
    seed : int
        Seeds the heads' (and the tiny encoder's) initialisation: every process builds the
        same starting model.
    pooling : {"mean", "cls"}
    dropout : float, optional
        Head dropout; default the encoder's ``hidden_dropout_prob`` (0.1 for BERT).

    Raises
    ------
    nlu.model.ModelError
        If the encoder cannot be loaded.
    """
    from transformers import AutoModel, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    if name == TINY_MODEL:
        encoder = BertModel(tiny_config())
    else:
        path = resolve_model_path(name)
        try:
            encoder = AutoModel.from_pretrained(path)
        except (OSError, ValueError, TypeError) as exc:
            raise ModelError(f"--model: cannot load {name!r}: {exc}".splitlines()[0]) from exc
    if dropout is None:
        dropout = float(getattr(encoder.config, "hidden_dropout_prob", 0.1))
    model = JointModel(encoder, num_intents, num_slots, pooling=pooling, dropout=dropout)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    return model
