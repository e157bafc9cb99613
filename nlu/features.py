"""Frozen encoders cost nothing per round: each distinct input is encoded once and reused.

With ``--trainable head`` the encoder is frozen, so its output for an utterance is the same in
every round: a device computes its examples' features once (on the device, in the process that
simulates it) and every later forward pass reads them back; only the heads run and train. The
server does the same for the test split it evaluates on.

:func:`cache_frozen_encoder` installs the cache on a model whose encoder has no trainable
parameter (it returns False and changes nothing otherwise). The state dict is untouched (the
encoder's forward is replaced on the instance, no module is wrapped), so weights load and
travel as before. Features are computed in eval mode (no dropout), so they are a pure
function of the token ids: the cache key is the utterance's token ids (and token type ids)
up to its attention-mask length, which is exact for any batch an utterance appears in.
Batches must be right-padded (as :mod:`nlu.data` and :mod:`nlu.slots` collate them) with the
default position ids; any other batch is encoded directly, uncached.
"""

from __future__ import annotations

import types
from collections import OrderedDict

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers.modeling_outputs import BaseModelOutputWithPooling

from nlu.model import encoder_of


class FeatureCache:
    """Per-utterance encoder outputs: token states [len_i, H] and the pooler output [H] (if any).

    Parameters
    ----------
    encoder : torch.nn.Module
        A frozen Hugging Face encoder; its original ``forward`` computes cache misses.
    max_entries : int
        Utterances kept (oldest dropped first).
    max_bytes : int
        Bytes kept (oldest dropped first): each entry counts its tensors (``(len_i + 1) * H * 4``
        bytes in float32) and :data:`ENTRY_OVERHEAD` for its key and objects. In a large
        population a process rarely meets a device twice, so the cache must not grow with the
        devices it has served.
    """

    #: Bytes an entry costs besides its tensors (key, tuple, tensor objects), for ``max_bytes``.
    ENTRY_OVERHEAD = 512

    def __init__(self, encoder: nn.Module, max_entries: int = 200_000, max_bytes: int = 256 * 2**20):
        self.encoder = encoder
        self.compute = encoder.forward  # the bound original forward
        self.max_entries = int(max_entries)
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        #: insertion order is the eviction order (OrderedDict: dropping the oldest is O(1) however many went before)
        self.entries: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _right_padded(mask: torch.Tensor, lengths: torch.Tensor) -> bool:
        ar = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
        return bool(torch.equal(mask.bool(), ar < lengths.unsqueeze(1)))

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, **kwargs):
        """Encoder outputs for a batch: ``last_hidden_state`` [B, L, H] (zeros at padding) and ``pooler_output``.

        Falls back to the encoder itself for inputs it cannot key (embeddings given directly,
        left padding, custom position ids, or extra options such as attention outputs).
        """
        extra = {k: v for k, v in kwargs.items() if v is not None and v is not False}
        if input_ids is None or extra or attention_mask is None:
            return self.compute(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                position_ids=position_ids, **kwargs)
        B, L = input_ids.shape
        lengths = attention_mask.sum(1)
        default_pos = position_ids is None or bool(
            torch.equal(position_ids, torch.arange(L, device=position_ids.device).expand_as(position_ids))
        )
        if not default_pos or not self._right_padded(attention_mask, lengths):
            return self.compute(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                position_ids=position_ids)
        ids = input_ids.detach().cpu()
        types_ = None if token_type_ids is None else token_type_ids.detach().cpu()
        keys = []
        for i in range(B):
            n = int(lengths[i])
            key = ids[i, :n].numpy().tobytes()
            if types_ is not None:
                key += b"|" + types_[i, :n].numpy().tobytes()
            keys.append(key)
        missing = [i for i, k in enumerate(keys) if k not in self.entries]
        if missing:
            self._fill(missing, keys, input_ids, attention_mask, token_type_ids, position_ids)
        self.hits += B - len(missing)
        self.misses += len(missing)
        got = [self.entries[k] for k in keys]
        states = pad_sequence([s for s, _ in got], batch_first=True)  # [B, max len_i, H], zeros after each
        if states.shape[1] < L:
            states = torch.nn.functional.pad(states, (0, 0, 0, L - states.shape[1]))
        states = states.to(input_ids.device)
        pooled = [p for _, p in got]
        pooler = None if any(p is None for p in pooled) else torch.stack(pooled)
        return BaseModelOutputWithPooling(last_hidden_state=states, pooler_output=pooler)

    @torch.no_grad()
    def _fill(self, rows, keys, input_ids, attention_mask, token_type_ids, position_ids) -> None:
        idx = torch.as_tensor(rows, device=input_ids.device)
        was = self.encoder.training
        if was:  # (switching modes walks every submodule: only when needed)
            self.encoder.eval()
        try:
            out = self.compute(
                input_ids=input_ids[idx],
                attention_mask=attention_mask[idx],
                token_type_ids=None if token_type_ids is None else token_type_ids[idx],
                position_ids=None if position_ids is None else position_ids[idx],
            )
        finally:
            if was:
                self.encoder.train(True)
        states = out.last_hidden_state
        pooler = getattr(out, "pooler_output", None)
        for j, (i, n) in enumerate(zip(rows, attention_mask[idx].sum(1).tolist())):
            entry = (states[j, :n].clone(), None if pooler is None else pooler[j].clone())
            old = self.entries.pop(keys[i], None)
            if old is not None:
                self.bytes -= self._size(old)
            self.entries[keys[i]] = entry
            self.bytes += self._size(entry)
        # never drop the entries just filled: the batch that asked for them reads them next
        while len(self.entries) > max(self.max_entries, len(rows)) or (self.bytes > self.max_bytes and len(self.entries) > len(rows)):
            self.bytes -= self._size(self.entries.popitem(last=False)[1])

    @classmethod
    def _size(cls, entry) -> int:
        s, p = entry
        return cls.ENTRY_OVERHEAD + s.numel() * s.element_size() + (0 if p is None else p.numel() * p.element_size())


def cache_frozen_encoder(model: nn.Module, max_entries: int = 200_000) -> bool:
    """Install a :class:`FeatureCache` on ``model``'s encoder if none of its parameters trains.

    Returns True if installed (or already installed), False if the encoder trains (or there is
    none). Call it again after changing which parameters train: it removes the cache when the
    encoder trains again.
    """
    enc = encoder_of(model)
    if enc is None:
        return False
    frozen = not any(p.requires_grad for p in enc.parameters())
    cached = isinstance(getattr(enc, "_feature_cache", None), FeatureCache)
    if not frozen:
        if cached:
            del enc.forward  # back to the class's forward
            del enc._feature_cache
        return False
    if not cached:
        cache = FeatureCache(enc, max_entries)
        enc._feature_cache = cache
        enc.forward = types.MethodType(lambda self, *a, **kw: cache.forward(*a, **kw), enc)
    return True


#: Utterances per chunk when :func:`warm_feature_cache` encodes a device's examples.
WARM_CHUNK = 64


@torch.no_grad()
def warm_feature_cache(model: nn.Module, data, collate_fn, chunk: int = WARM_CHUNK) -> bool:
    """Encode every example of ``data`` into ``model``'s feature cache, in index order and fixed
    chunks of ``chunk``, before any training batch asks for them.

    A float encoder's output for an utterance changes in its last bits with the batch it is
    computed in (padding and batch size change the kernels' summation order). Filled from the
    training batches, a device's features would depend on which round, and so which Poisson batch,
    first met it on the Ray actor that serves it; filled here, they are a function of the device's
    examples alone (one source of run-to-run difference of a ``--reproducible-noise`` rerun
    removed; the README says what remains).

    Returns True if the cache was filled now, False without a cache or when ``data`` (the same
    object) was warmed before.
    """
    enc = encoder_of(model)
    cache = getattr(enc, "_feature_cache", None) if enc is not None else None
    if not isinstance(cache, FeatureCache):
        return False
    if getattr(data, "_warmed_into", None) is cache:  # marked on the example set: exact, and it goes with the set
        return False
    was = enc.training
    if was:
        enc.eval()  # once for every chunk (the cache computes its entries in eval mode)
    try:
        for start in range(0, len(data), chunk):
            batch = collate_fn(data, list(range(start, min(start + chunk, len(data)))))
            cache.forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          token_type_ids=batch.get("token_type_ids"))
    finally:
        if was:
            enc.train(True)
    data._warmed_into = cache
    return True
