"""A trained intent model as a stock Hugging Face model directory: what ``dpfl export`` writes.

``transformers.pipeline("text-classification", model=DIR)`` loads the directory offline, with
no remote code, and computes exactly the run's model:

* ``--pooling cls`` runs are ``BertForSequenceClassification`` already: saved as they are.
* ``--pooling mean`` runs (the default: a BERT encoder, the masked mean of its token states, a
  linear head; :class:`nlu.pooling.MeanPoolClassifier`) have no ``*ForSequenceClassification``
  of their own in transformers. They are written as ``XLMForSequenceClassification`` with
  ``summary_type = "mean"``, whose transformer is BERT's computation (post-LayerNorm blocks,
  exact GELU, learned positions, scaled dot-product attention) and whose sequence summary is a
  mean over the tokens followed by a linear layer. The weights map one to one (Hugging Face's
  ``modeling_xlm``: ``q_lin``/``k_lin``/``v_lin``/``out_lin``, ``layer_norm1``, ``ffns.lin1``/``lin2``,
  ``layer_norm2``); BERT's token-type embedding of segment 0 is folded into the position
  embeddings and the [PAD] row of the word embeddings is zeroed (XLM adds the word embedding of
  the token type id; padding positions are masked either way).

XLM's mean runs over every position of the batch, padding included: for a single utterance (the
pipeline's default, ``batch_size=1``) it is the masked mean the run computed; batched with
padding it is not. ``dpfl predict`` encodes one utterance at a time for that reason. The
tokenizer is the run's, truncating at the run's ``--max-length`` (``truncation=True``).
LoRA adapters are merged into the encoder's weights before export.

Slot and joint models (:class:`nlu.joint.JointModel`: a BERT encoder without its pooler, dropout,
and a linear slot head on every token state) are ``BertForTokenClassification`` (no pooling
layer) one to one: :func:`to_token_classifier`, which ``transformers.pipeline("token-
classification", model=DIR)`` loads; a word's tag is its first sub-token's, as dpfl scores it.
A joint model's intent part (encoder, mean or [CLS] pooling, intent head) is
:func:`intent_part`, exported as an intent model.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ExportError", "intent_part", "to_pretrained", "to_token_classifier"]


class ExportError(ValueError):
    """The model cannot be written as a stock Hugging Face classifier (the message says why)."""


def merge_lora(model: nn.Module) -> None:
    """Merge every LoRA adapter of ``model`` into its base layer's weight, in place (peft ``merge``)."""
    for module in model.modules():
        if hasattr(module, "merge") and hasattr(module, "base_layer") and getattr(module, "lora_A", None):
            module.merge()


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with merged LoRA layers read as their base layers (``lora_*`` keys dropped)."""
    out = {}
    for k, v in model.state_dict().items():
        if ".lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v.detach().clone()
    return out


def _xlm_from_mean_pool(model: nn.Module, id2label: dict[int, str]):
    """``XLMForSequenceClassification`` computing ``model`` (a MeanPoolClassifier on a BERT encoder).

    Raises
    ------
    ExportError
        If the encoder is not BERT-shaped (model type ``bert``, intermediate size 4 x hidden,
        GELU, absolute positions).
    """
    from transformers import XLMConfig, XLMForSequenceClassification

    bc = model.encoder.config
    if (bc.model_type != "bert" or bc.intermediate_size != 4 * bc.hidden_size or bc.hidden_act != "gelu"
            or getattr(bc, "position_embedding_type", "absolute") != "absolute"):
        raise ExportError(f"--pooling mean exports BERT encoders with intermediate size 4 x hidden and GELU; "
                          f"this encoder is {bc.model_type} (intermediate {bc.intermediate_size}, hidden "
                          f"{bc.hidden_size}, {bc.hidden_act}); train with --pooling cls to export it")
    n = len(id2label)
    cfg = XLMConfig(
        vocab_size=bc.vocab_size, emb_dim=bc.hidden_size, n_layers=bc.num_hidden_layers, n_heads=bc.num_attention_heads,
        dropout=bc.hidden_dropout_prob, attention_dropout=bc.attention_probs_dropout_prob, gelu_activation=True,
        sinusoidal_embeddings=False, causal=False, asm=False, n_langs=1, use_lang_emb=False,
        max_position_embeddings=bc.max_position_embeddings, layer_norm_eps=bc.layer_norm_eps,
        pad_index=bc.pad_token_id or 0, pad_token_id=bc.pad_token_id or 0,
        summary_type="mean", summary_use_proj=True, summary_proj_to_labels=True, summary_activation=None,
        summary_first_dropout=float(model.dropout.p), summary_last_dropout=0.0,
        num_labels=n, id2label={int(i): str(v) for i, v in id2label.items()},
        label2id={str(v): int(i) for i, v in id2label.items()},
    )
    s = _base_state(model)
    e = "encoder.embeddings."
    word = s[e + "word_embeddings.weight"].clone()
    word[cfg.pad_index] = 0.0
    new = {
        "transformer.embeddings.weight": word,
        "transformer.position_embeddings.weight": s[e + "position_embeddings.weight"] + s[e + "token_type_embeddings.weight"][0],
        "transformer.layer_norm_emb.weight": s[e + "LayerNorm.weight"],
        "transformer.layer_norm_emb.bias": s[e + "LayerNorm.bias"],
        "sequence_summary.summary.weight": s["classifier.weight"],
        "sequence_summary.summary.bias": s["classifier.bias"],
    }
    for i in range(bc.num_hidden_layers):
        b = f"encoder.encoder.layer.{i}."
        pairs = {
            f"attentions.{i}.q_lin": b + "attention.self.query", f"attentions.{i}.k_lin": b + "attention.self.key",
            f"attentions.{i}.v_lin": b + "attention.self.value", f"attentions.{i}.out_lin": b + "attention.output.dense",
            f"layer_norm1.{i}": b + "attention.output.LayerNorm", f"ffns.{i}.lin1": b + "intermediate.dense",
            f"ffns.{i}.lin2": b + "output.dense", f"layer_norm2.{i}": b + "output.LayerNorm",
        }
        for dst, src in pairs.items():
            for part in ("weight", "bias"):
                new[f"transformer.{dst}.{part}"] = s[f"{src}.{part}"]
    out = XLMForSequenceClassification(cfg)
    missing, unexpected = out.load_state_dict(new, strict=False)
    left = [k for k in missing if not k.endswith("position_ids")]
    if left or unexpected:  # pragma: no cover - a transformers release that renamed XLM's modules
        raise ExportError(f"transformers' XLM layout changed (missing {left[:3]}, unexpected {unexpected[:3]})")
    return out.eval()


def to_pretrained(model: nn.Module, id2label: dict[int, str]):
    """A stock ``transformers`` classifier computing ``model`` (see the module docstring), in eval mode.

    Parameters
    ----------
    model : torch.nn.Module
        The run's intent model with its trained weights (a ``MeanPoolClassifier`` or a
        ``BertForSequenceClassification``; LoRA adapters are merged into a copy).
    id2label : dict
        Label index -> label name, in the order of the model's outputs.

    Raises
    ------
    ExportError
        For a model that has no stock equivalent (another head, another encoder family).
    """
    import copy

    from nlu.pooling import MeanPoolClassifier

    model = copy.deepcopy(model).eval()
    merge_lora(model)
    if isinstance(model, MeanPoolClassifier):
        return _xlm_from_mean_pool(model, id2label)
    if type(model).__name__ == "BertForSequenceClassification":
        from transformers import BertForSequenceClassification

        cfg = copy.deepcopy(model.config)
        cfg.id2label = {int(i): str(v) for i, v in id2label.items()}
        cfg.label2id = {str(v): int(i) for i, v in id2label.items()}
        out = BertForSequenceClassification(cfg)
        out.load_state_dict(_base_state(model))
        return out.eval()
    raise ExportError(f"{type(model).__name__} has no stock Hugging Face classifier to export to (intent models "
                      "with --pooling mean or cls export)")


def to_token_classifier(model: nn.Module, id2label: dict[int, str]):
    """``BertForTokenClassification`` (no pooling layer) computing ``model``'s slot logits, in eval mode.

    Parameters
    ----------
    model : nlu.joint.JointModel
        A slot or joint model on a BERT encoder (LoRA adapters are merged into a copy).
    id2label : dict
        Slot tag index -> BIO tag, in the order of the slot head's outputs.

    Raises
    ------
    ExportError
        If the model is not a JointModel on a BERT encoder.
    """
    import copy

    from transformers import BertConfig, BertForTokenClassification

    from nlu.joint import JointModel

    if not isinstance(model, JointModel) or model.encoder.config.model_type != "bert":
        raise ExportError(f"{type(model).__name__} has no stock token classifier to export to (slot and joint models "
                          "on BERT encoders export)")
    model = copy.deepcopy(model).eval()
    merge_lora(model)
    cfg = BertConfig(**{**model.encoder.config.to_dict(), "num_labels": len(id2label),
                        "id2label": {int(i): str(v) for i, v in id2label.items()},
                        "label2id": {str(v): int(i) for i, v in id2label.items()},
                        "classifier_dropout": float(model.dropout.p)})
    out = BertForTokenClassification(cfg)
    state = {}
    for k, v in _base_state(model).items():
        if k.startswith("encoder."):
            state["bert." + k[len("encoder."):]] = v
        elif k.startswith("slot_head."):
            state["classifier." + k[len("slot_head."):]] = v
    _load_exactly(out, state, "the slot model does not map onto BertForTokenClassification")
    return out.eval()


def _load_exactly(out: nn.Module, state: dict, what: str) -> None:
    """Load ``state`` into ``out``; every key must match but the position-id buffers.

    Raises
    ------
    ExportError
        Naming ``what`` and the first keys missing or unexpected.
    """
    missing, unexpected = out.load_state_dict(state, strict=False)
    left = [k for k in missing if not k.endswith("position_ids")]
    if left or unexpected:
        raise ExportError(f"{what} (missing {left[:3]}, unexpected {unexpected[:3]})")


def intent_part(model: nn.Module) -> nn.Module:
    """The intent classifier inside a joint model (shared encoder, its pooling and intent head): a
    :class:`nlu.pooling.MeanPoolClassifier` (mean pooling) or a ``BertForSequenceClassification``
    ([CLS] pooling, the encoder's pooler), with copied weights, for :func:`to_pretrained`.

    Raises
    ------
    ExportError
        If ``model`` has no intent head (a slot-only model) or its [CLS] pooling has no pooler.
    """
    import copy

    from nlu.pooling import MeanPoolClassifier

    if getattr(model, "intent_head", None) is None:
        raise ExportError("a slot-only model has no intent classifier")
    model = copy.deepcopy(model).eval()
    merge_lora(model)
    if model.pooling == "mean":
        out = MeanPoolClassifier(model.encoder, model.num_intents, dropout=float(model.dropout.p))
        out.classifier.load_state_dict(model.intent_head.state_dict())
        return out.eval()
    if getattr(model.encoder, "pooler", None) is None:
        raise ExportError("this joint model's [CLS] pooling uses the [CLS] state without a pooler: no stock "
                          "BertForSequenceClassification computes it")
    from transformers import BertForSequenceClassification

    cfg = copy.deepcopy(model.encoder.config)
    cfg.num_labels = model.num_intents
    out = BertForSequenceClassification(cfg)
    state = {"bert." + k: v for k, v in _base_state(model.encoder).items()}
    state.update({"classifier." + k: v for k, v in model.intent_head.state_dict().items()})
    _load_exactly(out, state, "the joint model's intent part does not map onto BertForSequenceClassification")
    return out.eval()
