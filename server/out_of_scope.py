"""The out-of-scope evaluation of the final model (``--oos-label`` / ``--oos-holdout-intents``).

After the last round (and the holdout evaluation, whose noised confidence histogram chooses the
threshold unless ``--oos-threshold`` gives a public one), the server scores the test split: the
in-scope utterances and the out-of-scope ones (nlu/oos.py: in-scope accuracy, out-of-scope
recall and precision, overall accuracy, AUROC), and writes ``oos.json`` (rundir); with the
holdout's threshold also the same figures at the thresholds of :data:`TRADE_OFF_QUANTILES`, read
off the same released histogram (``trade_off``). The test split
is not training data (the run's metrics are computed on it every round); the threshold is a
public value or post-processing of the accounted holdout release, so this costs no privacy.
"""

from __future__ import annotations

import logging

from nlu.model import load_tokenizer
from nlu.oos import SCORE, confidence_edges, confidences, oos_metrics, threshold_from_histogram
from rundir import read_holdout, write_oos

log = logging.getLogger("dpfl.server")

__all__ = ["TRADE_OFF_QUANTILES", "evaluate_out_of_scope", "holdout_threshold", "threshold_of"]


#: Further quantiles whose thresholds (from the same noised histogram: post-processing, no privacy
#: cost) oos.json scores on the test split, to show the trade-off between the two kinds of error.
TRADE_OFF_QUANTILES = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5)


def holdout_threshold(holdout: dict | None, quantile: float) -> float | None:
    """tau at ``quantile`` from the holdout's noised histogram (None without one): the
    :func:`nlu.oos.threshold_from_histogram` of its counts, with the number of holdout examples it
    counts as the total (public) or, with an out-of-scope class (whose holdout examples it leaves
    out), the counts' noised sum."""
    h = (holdout or {}).get("oos_histogram")
    if not h:
        return None
    counts = h["counts"]
    total = h.get("examples")
    total = float(total) if total is not None else max(sum(counts), 0.0)
    return threshold_from_histogram(counts, total, quantile, confidence_edges(int(h["bins"])))


def threshold_of(cfg, holdout: dict | None) -> tuple[float, str] | None:
    """(tau, where it came from: "public" or "holdout") for a run; None when no threshold exists yet
    (the holdout evaluation has not written its histogram).

    The holdout's threshold is :func:`nlu.oos.threshold_from_histogram` of its noised histogram at
    ``--oos-quantile``, with the noised total as the count.
    """
    if cfg.oos_threshold is not None:
        return float(cfg.oos_threshold), "public"
    tau = holdout_threshold(holdout, cfg.oos_quantile)
    return None if tau is None else (tau, "holdout")


def evaluate_out_of_scope(server) -> dict | None:
    """Score the final released model (``server.model``, which holds the last checkpoint's release:
    with ``--server-ema`` the average, not the iterate training continues from) on the in-scope and
    out-of-scope test utterances;
    write ``oos.json`` and return its payload (None when the run does not evaluate out-of-scope
    detection, or the holdout's histogram is missing: a log line says so).

    Raises
    ------
    ValueError
        If the model's outputs do not fit the data's labels (a corrupt checkpoint).
    """
    cfg, data = server.cfg, server.pop.data
    if not cfg.out_of_scope:
        return None
    holdout = read_holdout(server.rundir.path)
    found = threshold_of(cfg, holdout)
    if found is None:
        log.warning("out-of-scope evaluation skipped: the holdout evaluation wrote no confidence histogram")
        return None
    tau, source = found
    task = server.task
    if getattr(server, "test_oos_enc", None) is None:
        server.test_oos_enc = task.encode(data.test_oos, load_tokenizer(cfg.model), cfg.max_length)
    top_in, closed_in, conf_in = confidences(task.probabilities(server.model, server.test_enc), data.oos_index)
    n_out = len(server.test_oos_enc)
    if n_out:
        top_out, _, conf_out = confidences(task.probabilities(server.model, server.test_oos_enc), data.oos_index)
    else:
        top_out = conf_out = []
    def score(t: float) -> dict:
        return oos_metrics(server.test_enc.labels, top_in, conf_in, top_out, conf_out, t, data.oos_index, closed_in)

    metrics = score(tau)
    trade_off = []
    if source == "holdout":
        for q in TRADE_OFF_QUANTILES:
            t = holdout_threshold(holdout, q)
            m = score(t)
            trade_off.append({"quantile": q, "threshold": t, **{k: m[k] for k in (
                "in_scope_accuracy", "in_scope_rejected", "oos_recall", "oos_precision", "overall_accuracy")}})
    payload = {
        "version": 1, "round": cfg.rounds, "score": SCORE, "threshold": tau, "threshold_source": source,
        "quantile": cfg.oos_quantile if source == "holdout" else None, "oos_label": data.oos_label,
        "oos_intents": list(data.oos_intents), "oos_index": data.oos_index,
        "oos_split_seed": cfg.oos_split_seed if data.oos_intents else None, "test": metrics,
        "trade_off": trade_off,
    }
    write_oos(server.rundir.path, payload)
    return payload
