"""Canaries for the audit maths: class index of a canary label, token layout of its secret.

The canaries themselves (templates, secrets, inclusion, the inserted records and their
negative uids) are data generation and live in :mod:`partitions.canaries`; they are
re-exported here so the audit reads as one vocabulary (``audit.canaries.Canary``, ...).
"""

from __future__ import annotations

from typing import Hashable, Mapping

from partitions import canaries as _data_canaries
from partitions.canaries import (
    DEFAULT_TEMPLATES,
    UID_STRIDE,
    Canary,
    CanaryRecord,
    canary_uid,
    make_canaries,
    parse_uid,
    space_digits,
)

#: partitions.canaries' names (re-exported above), then the audit's own
__all__ = [*_data_canaries.__all__, "label_index", "secret_token_layout"]


def label_index(label: Hashable, label2id: Mapping[Hashable, int] | None = None, model=None) -> int:
    """Class index of a canary label.

    An ``int`` label is returned as is. Otherwise it is looked up in ``label2id``, or,
    if that is None, in ``model.config.label2id``.

    Raises
    ------
    KeyError
        If the label cannot be resolved (message names it).
    """
    if isinstance(label, int) and not isinstance(label, bool):
        return label
    mapping = label2id
    if mapping is None and model is not None:
        mapping = getattr(getattr(model, "config", None), "label2id", None)
    if mapping is None or label not in mapping:
        raise KeyError(f"cannot map canary label {label!r} to a class index; pass label2id")
    return int(mapping[label])


def secret_token_layout(tokenizer, prefix: str, suffix: str, n_digits: int) -> tuple[list[int], list[int], list[int]]:
    """Token layout of ``prefix + " " + spaced secret + suffix``.

    Returns
    -------
    base_ids : list of int, length L
        ``[CLS] prefix 0 0 .. 0 suffix [SEP]`` with ``n_digits`` placeholder "0"s.
    positions : list of int, length n_digits
        Indices in ``base_ids`` of the secret's digit tokens.
    digit_ids : list of int, length 10
        Token ids of "0".."9".

    Raises
    ------
    ValueError
        If a digit is not a single vocabulary token, or the spaced secret does not
        tokenise to one token per digit right after the prefix.
    """
    digit_ids = tokenizer.convert_tokens_to_ids([str(d) for d in range(10)])
    unk = getattr(tokenizer, "unk_token_id", None)
    if any(i is None or i == unk for i in digit_ids):
        raise ValueError("tokenizer has no single token for every digit 0-9")
    n_prefix = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    base = tokenizer(f"{prefix} {space_digits('0' * n_digits)}{suffix}")["input_ids"]
    n_special_front = len(tokenizer("", add_special_tokens=True)["input_ids"]) - 1  # [CLS]
    start = n_special_front + n_prefix
    positions = list(range(start, start + n_digits))
    if positions[-1] >= len(base) or any(base[p] != digit_ids[0] for p in positions):
        raise ValueError("the spaced secret does not tokenise to one token per digit after the prefix")
    return list(base), positions, list(digit_ids)
