"""The records of a training message and of its reply, and the server's check of a reply.

A training message (server -> device) holds:

==================  ============  =====================================================
record              type          content
==================  ============  =====================================================
``arrays``          ArrayRecord   the global model's trainable parameters
``config``          ConfigRecord  the round (``server-round``, ``deadline``, ``num-labels``,
                                  ``target-delta``) and the mechanism's round parameters
                                  (``Mechanism.round_params``; noise on the aggregate:
                                  ``sample-rate``, the example sampling rate p_k)
``run``             ConfigRecord  the settings a device reads (``RunConfig.device_settings``)
``device``          ConfigRecord  ``device-id``: the simulated device the task is for
``pc-teacher``      ArrayRecord   with ``--pc-weight``, after the first release: the previous
                                  release's trainable parameters (a released model, public)
==================  ============  =====================================================

A reply (device -> server) holds what the run's mechanism allows (its ``ReplySpec``,
mechanisms/):

* ``weights`` (local DP-SGD, DP-FedAvg, FedAvg without DP): ``arrays`` (the locally trained
  trainable parameters, noised on the device under local DP-SGD), ``metrics``
  (``num-examples``; only a non-private run also sends ``train_loss`` and timings),
  ``privacy`` (local DP-SGD: the round's DP-SGD event, computed from public counts only) and
  ``info`` (the Ray node it ran on).
* ``clipped-sum`` (noise on the aggregate): ``arrays`` only, the sum over the device's
  Poisson-sampled examples of their clipped gradients. Nothing else derived from its data
  leaves the device: no loss, no realised sample count, no timing.
* ``masked`` (secure aggregation, ``--noise-at secure``): ``arrays`` only, one uint32 array
  ``masked`` of D entries: the device's quantised, noised sum masked mod 2^b (uniform given
  everything else the server holds, mechanisms/secagg.py).

Secure aggregation's other exchanges (``keys``, ``shares`` before training, ``unmask`` after) are
messages of type ``train`` whose ``config`` names the exchange (``stage``) and carries the
protocol's entries (public keys, routed ciphertexts, survivor lists); their replies hold one
record, ``stage`` (ConfigRecord): public keys, ciphertexts for other devices, or Shamir shares.

A holdout evaluation message (``--holdout-per-device``, after the last round; Flower message
type ``evaluate``) holds ``arrays`` (the final released model's trainable parameters), ``run``,
``device`` and ``config`` (``server-round``, ``holdout-noise``: the std of the noise the device
adds to its count, 0 when the server adds it to the quartile's sum or the run is not private).
Its reply holds ``holdout`` alone (MetricRecord ``correct``: the number of the device's holdout
examples the model classifies correctly, plus that noise). With out-of-scope calibration
(``config`` ``oos-bins`` B > 0) the record also holds ``oos-histogram``: B floats, how many of the
device's holdout examples have their max-softmax confidence in each bin of the public grid
(nlu/oos.py), each bin with noise of the same std. The number of holdout examples is not
sent: it is an example count, which the server knows as it knows the activity.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import RecordDict

from protocol.arrays import array_view

ARRAYS = "arrays"
CONFIG = "config"
RUN = "run"
DEVICE = "device"
TEACHER = "pc-teacher"
HOLDOUT = "holdout"
METRICS = "metrics"
PRIVACY = "privacy"
INFO = "info"
#: adaptive clipping's record in a reply (its key: mechanisms.base.ReplySpec.clip)
CLIP = "clip"
#: a non-training exchange's reply record (secure aggregation's keys, shares, unmask), and the config
#: entry that names the exchange in its message
STAGE = "stage"
STAGE_KEY = "stage"

#: What a reply in each placement may hold (anything else is rejected, see :func:`validate_update`).
REPLY_RECORDS = {
    "weights": {ARRAYS, METRICS, PRIVACY, INFO, CLIP},
    "clipped-sum": {ARRAYS, CLIP},
    "masked": {ARRAYS},
}


def validate_update(
    content: RecordDict,
    expected: dict[str, tuple[tuple[int, ...], str]],
    dp: bool,
    kind: str = "weights",
    clip_key: str | None = None,
) -> str | None:
    """Why a device's training reply cannot be aggregated (None if it can).

    Parameters
    ----------
    content : flwr.app.RecordDict
        The reply's content.
    expected : dict
        ``{key: (shape, dtype name)}`` of the arrays that travel (the trainable parameters).
    dp : bool
        Example-level DP on the device: the reply must carry its ``privacy`` record.
    kind : str
        ``"weights"`` (trained parameters, with ``metrics``; the device placement and
        non-private runs) or ``"clipped-sum"`` (the aggregate placement: ``arrays`` only).
    clip_key : str, optional
        The reply must carry the ``clip`` record with this one finite value (adaptive clipping;
        ``clip-norm`` must also be > 0); None: a ``clip`` record is rejected.

    Checks: an ``arrays`` ArrayRecord with exactly ``expected``'s keys, shapes and dtypes, every
    value finite; for ``"weights"`` a ``metrics`` record with a finite positive
    ``num-examples`` and, with ``dp``, a ``privacy`` record; for ``"clipped-sum"`` no record
    but ``arrays``.
    """
    if ARRAYS not in content.array_records:
        return "no arrays in the reply"
    if kind in ("clipped-sum", "masked"):
        extra = sorted(set(content.keys()) - REPLY_RECORDS[kind])
        if extra:
            return f"a {kind} reply holds only its arrays; it also carries {extra}"
    arrays = content.array_records[ARRAYS]
    keys = set(arrays.keys())
    if keys != set(expected):
        missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
        return f"wrong keys (missing {missing[:3]}, unexpected {extra[:3]})"
    for k, (shape, dtype) in expected.items():
        a = arrays[k]
        if tuple(a.shape) != tuple(shape) or str(a.dtype) != dtype:
            return f"{k}: shape {tuple(a.shape)} {a.dtype}, expected {tuple(shape)} {dtype}"
        v = array_view(a)
        if v.dtype.kind in "fc" and not np.isfinite(v).all():
            return f"{k}: non-finite values (NaN or inf)"
    if clip_key:
        if CLIP not in content.metric_records or set(content.metric_records[CLIP].keys()) != {clip_key}:
            return f"no clip record holding {clip_key} alone in the reply (adaptive clipping)"
        c = content.metric_records[CLIP][clip_key]
        if not isinstance(c, (int, float)) or not math.isfinite(c) or (clip_key == "clip-norm" and c <= 0):
            return f"{clip_key} {c!r} is not a {'positive' if clip_key == 'clip-norm' else 'finite'} number"
    elif CLIP in content:
        return "a clip record without adaptive clipping"
    if kind in ("clipped-sum", "masked"):
        return None
    if METRICS not in content.metric_records:
        return "no metrics in the reply"
    n = content.metric_records[METRICS].get("num-examples")
    if not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
        return f"num-examples {n!r} is not a positive number"
    if dp and PRIVACY not in content.config_records:
        return "no privacy record in the reply"
    return None


def validate_holdout_reply(content: RecordDict, bins: int = 0) -> tuple[float | None, np.ndarray | None, str | None]:
    """(the reply's correct count, its confidence histogram, None) or (None, None, why it cannot be
    used) for a holdout evaluation reply.

    The reply must hold exactly one record, ``holdout``, a MetricRecord with a finite ``correct``
    and, when ``bins`` > 0 (out-of-scope calibration), ``oos-histogram``: ``bins`` finite floats
    (float64 [bins]); nothing else.
    """
    extra = sorted(set(content.keys()) - {HOLDOUT})
    if extra:
        return None, None, f"a holdout reply holds only its count; it also carries {extra}"
    if HOLDOUT not in content.metric_records:
        return None, None, "no holdout record in the reply"
    record = content.metric_records[HOLDOUT]
    allowed = {"correct"} | ({"oos-histogram"} if bins > 0 else set())
    if set(record.keys()) - allowed:
        return None, None, f"unexpected holdout entries {sorted(set(record.keys()) - allowed)}"
    value = record.get("correct")
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None, None, f"correct {value!r} is not a finite number"
    hist = None
    if bins > 0:
        raw = record.get("oos-histogram")
        if not isinstance(raw, list) or len(raw) != bins:
            return None, None, f"oos-histogram must be a list of {bins} numbers"
        hist = np.asarray(raw, dtype=np.float64)
        if not np.isfinite(hist).all():
            return None, None, "oos-histogram holds a value that is not finite"
    return float(value), hist, None
