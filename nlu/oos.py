"""Out-of-scope detection: a threshold on the classifier's confidence, chosen from a noised histogram.

An utterance is *out of scope* when it matches none of the model's intents (Larson et al. 2019,
"An Evaluation Dataset for Intent Classification and Out-of-Scope Prediction", EMNLP: the
oos-threshold and oos-train settings). The model rejects an utterance when

* its confidence, the largest softmax probability over the in-scope intents (max-softmax,
  Hendrycks & Gimpel 2017), is below the threshold tau, or
* its top class is the out-of-scope class, when the training data has one (oos-train).

tau is chosen so that a fraction ``quantile`` of in-scope utterances would be rejected: the
``quantile``-quantile of the confidences of the devices' holdout examples (which never train),
read from a histogram over the public grid :func:`confidence_edges`. Each holdout example adds 1
to one bin (L2 sensitivity 1), so the histogram is released with Gaussian noise of std sigma_h per
bin and accounted as one Gaussian mechanism (server/holdout.py); tau is post-processing of it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CONFIDENCE_BINS", "SCORE", "auroc", "confidence_edges", "confidences", "histogram", "oos_metrics",
           "rejected", "threshold_from_histogram"]

#: Bins of the confidence histogram (uniform on [0, 1]; public, fixed before the run).
CONFIDENCE_BINS = 50

#: The confidence score's name (as the report and the export state it).
SCORE = "max-softmax"


def confidence_edges(bins: int = CONFIDENCE_BINS) -> np.ndarray:
    """The ``bins + 1`` edges, float64, of the uniform grid on [0, 1] (public: no data is read)."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    return np.linspace(0.0, 1.0, int(bins) + 1)


def confidences(probs: np.ndarray, oos_index: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top class [N] int64, top in-scope class [N] int64, confidence [N] float64) of softmax
    probabilities ``probs`` [N, K].

    The top class is the argmax over all K classes; the top in-scope class and the confidence are
    the argmax and the largest probability over the in-scope classes (every class but
    ``oos_index``, the out-of-scope class where the model has one).
    """
    probs = np.asarray(probs, dtype=np.float64)
    top = probs.argmax(axis=1).astype(np.int64)
    if oos_index is None:
        return top, top, probs.max(axis=1)
    inscope = probs.copy()
    inscope[:, int(oos_index)] = -np.inf
    return top, inscope.argmax(axis=1).astype(np.int64), inscope.max(axis=1)


def rejected(top: np.ndarray, conf: np.ndarray, threshold: float, oos_index: int | None = None) -> np.ndarray:
    """Bool [N]: the utterances the model calls out of scope (confidence below ``threshold``, or the
    out-of-scope class on top)."""
    out = np.asarray(conf) < float(threshold)
    if oos_index is not None:
        out |= np.asarray(top) == int(oos_index)
    return out


def histogram(conf: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts [len(edges) - 1], float64, of ``conf`` in the bins ``[e_j, e_{j+1})`` (the last bin
    closed). One example adds 1 to exactly one bin: L2 (and L1) sensitivity 1."""
    conf = np.clip(np.asarray(conf, dtype=np.float64), edges[0], edges[-1])
    j = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, len(edges) - 2)
    return np.bincount(j, minlength=len(edges) - 1).astype(np.float64)


def threshold_from_histogram(counts: np.ndarray, total: float, quantile: float, edges: np.ndarray) -> float:
    """The threshold tau: the largest edge e_j whose (noisy) count below it is at most ``quantile * total``.

    Parameters
    ----------
    counts : numpy.ndarray, shape [B]
        The histogram (noised) of in-scope confidences over the bins of ``edges`` [B + 1].
    total : float
        The number of examples it counts (public: the holdout's size is an example count).
    quantile : float
        In (0, 1): the fraction of in-scope examples to reject.

    Returns
    -------
    float
        tau in [edges[0], edges[-2]]: about ``quantile`` of the counted examples lie below it (up to
        the noise and the bin width). The running maximum of the noisy cumulative counts is used
        (post-processing), so tau never moves down as the noise makes a count negative.

    Raises
    ------
    ValueError
        If ``quantile`` is not in (0, 1) or the shapes do not match.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if len(counts) != len(edges) - 1:
        raise ValueError(f"{len(counts)} counts for {len(edges) - 1} bins")
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    below = np.maximum.accumulate(np.concatenate([[0.0], np.cumsum(counts)]))[:-1]  # count below e_j, j = 0..B-1
    ok = np.nonzero(below <= quantile * float(total))[0]
    return float(edges[ok[-1]]) if len(ok) else float(edges[0])


def auroc(scores_in: np.ndarray, scores_out: np.ndarray) -> float | None:
    """Area under the ROC curve of telling out-of-scope from in-scope utterances by low confidence:
    P(conf_out < conf_in) + P(tie) / 2 (the Mann-Whitney statistic, Hanley & McNeil 1982); None
    when either set is empty."""
    from scipy.stats import rankdata

    a, b = np.asarray(scores_in, dtype=np.float64), np.asarray(scores_out, dtype=np.float64)
    if not len(a) or not len(b):
        return None
    ranks = rankdata(np.concatenate([a, b]))  # average ranks over ties (1-based)
    u = ranks[: len(a)].sum() - len(a) * (len(a) + 1) / 2  # pairs with conf_in > conf_out, ties half
    return float(u / (len(a) * len(b)))


def oos_metrics(labels: np.ndarray, top_in: np.ndarray, conf_in: np.ndarray, top_out: np.ndarray,
                conf_out: np.ndarray, threshold: float, oos_index: int | None = None,
                closed_in: np.ndarray | None = None) -> dict:
    """The out-of-scope evaluation of Larson et al. (2019) on a test split.

    Parameters
    ----------
    labels, top_in, conf_in : numpy.ndarray, shape [N_in]
        The in-scope test utterances' intents, top classes and confidences.
    top_out, conf_out : numpy.ndarray, shape [N_out]
        The out-of-scope test utterances' top classes and confidences.
    threshold : float
        tau (see :func:`rejected`).
    oos_index : int, optional
        The model's out-of-scope class (oos-train), if it has one.
    closed_in : numpy.ndarray, shape [N_in], optional
        The in-scope test utterances' top in-scope classes (default ``top_in``).

    Returns
    -------
    dict
        ``in_scope_accuracy`` (an in-scope utterance counts when accepted with its intent),
        ``closed_set_accuracy`` (the top in-scope class alone, no rejection), ``oos_recall``
        (out-of-scope utterances rejected), ``oos_precision`` (rejected utterances that are out
        of scope; None when nothing is rejected), ``overall_accuracy`` (out of scope as one more
        class), ``in_scope_rejected`` (fraction of in-scope rejected), ``auroc`` (threshold-free,
        :func:`auroc`), ``in_scope`` and ``out_of_scope`` (counts).
    """
    labels, top_in, top_out = (np.asarray(x, dtype=np.int64) for x in (labels, top_in, top_out))
    rej_in = rejected(top_in, conf_in, threshold, oos_index)
    rej_out = rejected(top_out, conf_out, threshold, oos_index)
    correct_in = (~rej_in) & (top_in == labels)
    n_in, n_out = len(labels), len(top_out)
    n_rej = int(rej_in.sum() + rej_out.sum())
    closed = top_in if closed_in is None else np.asarray(closed_in, dtype=np.int64)
    return {
        "in_scope_accuracy": float(correct_in.mean()) if n_in else None,
        "closed_set_accuracy": float((closed == labels).mean()) if n_in else None,
        "oos_recall": float(rej_out.mean()) if n_out else None,
        "oos_precision": float(rej_out.sum() / n_rej) if n_rej else None,
        "overall_accuracy": float((correct_in.sum() + rej_out.sum()) / (n_in + n_out)) if n_in + n_out else None,
        "in_scope_rejected": float(rej_in.mean()) if n_in else None,
        "auroc": auroc(conf_in, conf_out),
        "in_scope": n_in, "out_of_scope": n_out,
    }
