"""The frozen-encoder feature cache (nlu/features.py): same outputs, each utterance encoded once."""

from __future__ import annotations

import numpy as np
import torch

from nlu.data import collate, encode
from nlu.features import cache_frozen_encoder
from nlu.model import build_model, load_tokenizer, set_trainable

TEXTS = ["turn on the kitchen lights", "what is the weather in paris", "play some jazz", "set an alarm for 7",
         "turn on the kitchen lights", "call mom", "how long to get to work", "volume up please"]


def _model_and_data():
    tok = load_tokenizer("tiny")
    enc = encode(TEXTS, np.arange(len(TEXTS)) % 3, tok, 16)
    model = set_trainable(build_model("tiny", 3, seed=0), "head")
    return model, enc


def test_cached_outputs_equal_the_encoder_and_each_text_is_encoded_once():
    model, enc = _model_and_data()
    model.eval()
    batches = [collate(enc, np.array(ix)) for ix in ([0, 1, 2, 3], [4, 5, 6, 7], [7, 0, 3])]
    with torch.no_grad():
        want = [model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in batches]
    assert cache_frozen_encoder(model)
    cache = model.encoder._feature_cache
    with torch.no_grad():
        got = [model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in batches]
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    # 8 texts, one duplicate: 7 distinct utterances computed, everything else read back
    assert len(cache.entries) == 7
    assert cache.misses == 7 and cache.hits == 11 - 7
    assert set(model.state_dict()) == set(build_model("tiny", 3, seed=0).state_dict())  # state dict unchanged


def test_cache_only_for_a_frozen_encoder_and_removed_when_it_trains():
    model, _ = _model_and_data()
    set_trainable(model, "all")
    assert not cache_frozen_encoder(model)
    set_trainable(model, "head")
    assert cache_frozen_encoder(model)
    set_trainable(model, "all")
    assert not cache_frozen_encoder(model)
    assert "forward" not in vars(model.encoder)  # back to the class's forward


def test_head_gradients_through_the_cache_equal_the_uncached_ones():
    model, enc = _model_and_data()
    model.eval()  # no dropout: both passes compute the same function
    batch = collate(enc, np.arange(len(TEXTS)))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    loss = torch.nn.functional.cross_entropy(model(**inputs).logits, batch["labels"])
    want = torch.autograd.grad(loss, [model.classifier.weight])[0]
    cache_frozen_encoder(model)
    model(**inputs)  # fill
    loss = torch.nn.functional.cross_entropy(model(**inputs).logits, batch["labels"])
    got = torch.autograd.grad(loss, [model.classifier.weight])[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_warmed_features_do_not_depend_on_the_batch_that_first_met_them():
    """Two Ray actors that first meet a device in different rounds (different Poisson batches)
    hold bit-identical features once the cache is warmed with the device's examples."""
    from nlu.features import warm_feature_cache

    def features(first_batch):
        model, enc = _model_and_data()
        cache_frozen_encoder(model)
        assert warm_feature_cache(model, enc, collate)
        assert not warm_feature_cache(model, enc, collate)  # once per device's data
        cache = model.encoder._feature_cache
        computed = cache.misses
        b = collate(enc, np.array(first_batch))
        with torch.no_grad():
            model(**{k: v for k, v in b.items() if k != "labels"})
        assert cache.misses == computed and len(cache.entries) == 7  # the batch computed nothing
        return {k: v[0] for k, v in cache.entries.items()}

    a, b = features([0, 1, 2, 3, 4, 5, 6, 7]), features([7, 2])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_per_utterance_features_do_not_depend_on_what_the_process_encoded_before():
    """One Ray actor serves several devices with one cache: an utterance two devices hold is
    encoded once, in whichever device's warm-up came first. With ``per_utterance``
    (--reproducible-noise) every entry is that utterance encoded alone, bit for bit, whatever the
    cache held before; switching the mode empties the cache."""
    from nlu.features import warm_feature_cache

    tok = load_tokenizer("tiny")
    first = encode(["play some jazz", "how long does it take to get to work from home on a rainy monday morning"],
                   [0, 1], tok, 32)
    then = encode(["play some jazz", "call mom", "volume up please"], [0, 1, 2], tok, 32)

    def warmed(*sets):
        model = set_trainable(build_model("tiny", 3, seed=0), "head")
        cache_frozen_encoder(model)
        for data in sets:
            data._warmed_into = None
            assert warm_feature_cache(model, data, collate, per_utterance=True)
        return model.encoder._feature_cache

    alone, after = warmed(then), warmed(first, then)
    assert set(alone.entries) <= set(after.entries) and len(after.entries) == 4  # "play some jazz" once
    for k, (states, pooled) in alone.entries.items():
        assert torch.equal(after.entries[k][0], states)
        assert (pooled is None and after.entries[k][1] is None) or torch.equal(after.entries[k][1], pooled)
    # ... and equal to the encoder run on that utterance by itself
    model = set_trainable(build_model("tiny", 3, seed=0), "head").eval()
    for i, ids in enumerate(then.input_ids):
        b = collate(then, np.array([i]))
        with torch.no_grad():
            out = model.encoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                token_type_ids=b["token_type_ids"])
        prefix = np.asarray(ids, dtype=np.int64).tobytes()
        key = next(k for k in after.entries if k.startswith(prefix) and k[len(prefix):len(prefix) + 1] in (b"", b"|"))
        assert torch.equal(after.entries[key][0], out.last_hidden_state[0])
    after.per_utterance = False
    assert not after.entries and after.bytes == 0
