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
up to its attention-mask length, which is exact for any batch an utterance appears in. Entries
are computed unpadded (see :attr:`FeatureCache.per_utterance`), so their last bits do not
depend on the padded length of the batch that first met them.
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
        self._per_utterance = False

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

    @property
    def per_utterance(self) -> bool:
        """Encode each utterance in a batch of its own (True) or with the others of its length (False).

        Either way no encoder batch is padded, so an entry never depends on the padded length of
        the batch that asked for it. Grouped by length, an entry may still depend in its last bits
        on how many utterances shared its batch (the kernels may choose their summation order by
        the batch's size; on this CPU they do not); one at a time it is a function of the
        utterance's token ids alone, whatever the cache held before (other devices' utterances
        served by this process first) and whichever batch first met it: ``--reproducible-noise``
        runs (client/app.py). Switching modes empties the cache.
        """
        return self._per_utterance

    @per_utterance.setter
    def per_utterance(self, value: bool) -> None:
        if bool(value) != self._per_utterance:
            self.entries.clear()
            self.bytes = 0
            self._per_utterance = bool(value)

    @torch.no_grad()
    def _fill(self, rows, keys, input_ids, attention_mask, token_type_ids, position_ids) -> None:
        # (position ids are the default ones here: forward() checked)
        lengths = attention_mask.sum(1).tolist()
        first: dict[bytes, int] = {}  # each distinct utterance once, from its first row
        for i in rows:
            first.setdefault(keys[i], i)
        if self._per_utterance:
            groups = [[i] for i in first.values()]
        else:
            by_length: dict[int, list[int]] = {}
            for i in first.values():
                by_length.setdefault(int(lengths[i]), []).append(i)
            groups = [by_length[n] for n in sorted(by_length)]
        was = self.encoder.training
        if was:  # (switching modes walks every submodule: only when needed)
            self.encoder.eval()
        try:
            for group in groups:
                n = int(lengths[group[0]])
                idx = torch.as_tensor(group, device=input_ids.device)
                m = max(n, 1)  # unpadded: the group's utterances all hold n tokens
                out = self.compute(
                    input_ids=input_ids[idx, :m],
                    attention_mask=attention_mask[idx, :m],
                    token_type_ids=None if token_type_ids is None else token_type_ids[idx, :m],
                )
                states = out.last_hidden_state
                pooler = getattr(out, "pooler_output", None)
                for j, i in enumerate(group):
                    entry = (states[j, :n].clone(), None if pooler is None else pooler[j].clone())
                    old = self.entries.pop(keys[i], None)
                    if old is not None:
                        self.bytes -= self._size(old)
                    self.entries[keys[i]] = entry
                    self.bytes += self._size(entry)
        finally:
            if was:
                self.encoder.train(True)
        # never drop the entries just filled: the batch that asked for them reads them next
        filled = len(first)
        while len(self.entries) > max(self.max_entries, filled) or (self.bytes > self.max_bytes and len(self.entries) > filled):
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
def warm_feature_cache(model: nn.Module, data, collate_fn, chunk: int = WARM_CHUNK,
                       per_utterance: bool | None = None) -> bool:
    """Encode every example of ``data`` into ``model``'s feature cache, in chunks of ``chunk``
    (the examples in order of length, then index), before any training batch asks for them.

    A float encoder's output for an utterance changes in its last bits with the batch it is
    computed in (padding and batch size change the kernels' summation order). Filled from the
    training batches, a device's features would depend on which round, and so which Poisson batch,
    first met it on the Ray actor that serves it; the cache never pads (it encodes the utterances
    of one length together, or one at a time, see :attr:`FeatureCache.per_utterance`), and with
    ``per_utterance`` (``--reproducible-noise``) each entry is a function of its utterance alone,
    also when another device served by the same process held that utterance first.

    ``per_utterance`` (None: leave the cache's mode) sets :attr:`FeatureCache.per_utterance` first.
    Returns True if the cache was filled now, False without a cache or when ``data`` (the same
    object) was warmed before in this mode.
    """
    enc = encoder_of(model)
    cache = getattr(enc, "_feature_cache", None) if enc is not None else None
    if not isinstance(cache, FeatureCache):
        return False
    if per_utterance is not None and bool(per_utterance) != cache.per_utterance:
        cache.per_utterance = per_utterance  # (empties the cache)
    mark = (cache, cache.per_utterance)
    warmed = getattr(data, "_warmed_into", None)
    if warmed is not None and warmed[0] is mark[0] and warmed[1] == mark[1]:  # marked on the example set: exact, and it goes with the set
        return False
    was = enc.training
    if was:
        enc.eval()  # once for every chunk (the cache computes its entries in eval mode)
    try:
        ids = getattr(data, "input_ids", None)
        order = sorted(range(len(data)), key=lambda i: len(ids[i])) if ids is not None else list(range(len(data)))
        for start in range(0, len(order), chunk):
            batch = collate_fn(data, order[start:start + chunk])
            cache.forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          token_type_ids=batch.get("token_type_ids"))
    finally:
        if was:
            enc.train(True)
    data._warmed_into = mark
    return True
