"""Empirical epsilon LOWER bounds from privacy audits.

Every number returned here is a *lower* bound on the epsilon of the mechanism that
produced the audited model, valid with the stated confidence: "if the training run
were (eps, delta)-DP for any eps below this value, an outcome at least as extreme as
the one observed would have had probability at most ``beta`` (resp. ``alpha``)".
It says nothing about an upper bound: a small audit value never certifies privacy.

Two methods:

* :func:`one_run_epsilon_lower_bound` / :func:`one_run_audit_from_scores` -- Steinke,
  Nasr and Jagielski (2023), "Privacy Auditing with One (1) Training Run" (NeurIPS
  2023, arXiv:2305.08846), Theorem 5.2: m canaries each included independently with
  probability 1/2 in a single training run; the auditor guesses membership for r of
  them and is right v times.
* :func:`clopper_pearson_epsilon_lower_bound` / :func:`clopper_pearson_threshold_sweep`
  -- Jagielski, Ullman and Oprea (2020), "Auditing Differentially Private Machine
  Learning: How Private is Private SGD?" (NeurIPS 2020), Section 3/Algorithm 2: a
  distinguishing test with true-positive rate TPR and false-positive rate FPR on
  (many) trials implies eps >= log((TPR - delta) / FPR) for any (eps, delta)-DP
  mechanism; the rates are replaced by one-sided Clopper-Pearson confidence bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

__all__ = [
    "one_run_p_value",
    "one_run_epsilon_lower_bound",
    "OneRunAuditResult",
    "one_run_audit_from_scores",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "clopper_pearson_epsilon_lower_bound",
    "ClopperPearsonSweepResult",
    "clopper_pearson_threshold_sweep",
]

_EPS_SEARCH_MAX = 100.0  # nats; beyond this the binomial tails underflow anyway


# ----------------------------------------------------------------------------------
# One-run audit (Steinke, Nasr, Jagielski 2023)
# ----------------------------------------------------------------------------------


def _check_counts(m: int, r: int, v: int) -> None:
    for name, x in (("m", m), ("r", r), ("v", v)):
        if int(x) != x:
            raise ValueError(f"{name} must be an integer, got {x!r}")
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """p-value of ``v`` correct guesses out of ``r`` under the (eps, delta)-DP null.

    Steinke, Nasr & Jagielski (2023), Theorem 5.2: if the training run is
    (eps, delta)-DP and each of the ``m`` canaries is included independently with
    probability 1/2, the number V of correct guesses satisfies, for every v,

    .. math::

        P[V \\ge v] \\le P[W \\ge v]
            + 2 m \\delta \\max_{i \\in \\{1..v\\}} \\frac{1}{i} P[v > W \\ge v - i],
        \\qquad W \\sim \\mathrm{Binomial}(r, e^{\\varepsilon}/(1 + e^{\\varepsilon})).

    (the max over i in 1..m reduces to 1..v because for i >= v the numerator is
    constant.)

    Parameters
    ----------
    m : int
        Number of canaries (each randomly included with probability 1/2).
    r : int
        Number of guesses made (abstentions excluded), ``r <= m``.
    v : int
        Number of correct guesses, ``v <= r``.
    epsilon : float
        Null-hypothesis epsilon, nats, ``>= 0``.
    delta : float
        Null-hypothesis delta in [0, 1].

    Returns
    -------
    float
        Upper bound on P[V >= v] under the null, clipped to [0, 1].

    Raises
    ------
    ValueError
        If the counts are not integers with 0 <= v <= r <= m, epsilon < 0 or delta
        is outside [0, 1].
    """
    _check_counts(m, r, v)
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of eps-DP randomized response
    tail = float(stats.binom.sf(v - 1, r, q))  # P[W >= v]
    if v == 0 or delta == 0.0:
        return min(1.0, tail)
    # P[v > W >= v - i] for i = 1..v is the cumulative sum of pmf(v-1), pmf(v-2), ...
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)
    window = np.cumsum(pmf) / np.arange(1, v + 1)
    return float(min(1.0, tail + 2.0 * m * delta * float(window.max())))


def one_run_epsilon_lower_bound(
    m: int, r: int, v: int, delta: float, confidence: float = 0.95, tol: float = 1e-6
) -> float:
    """Largest eps rejected by the one-run audit: an empirical epsilon LOWER bound.

    Returns ``sup{eps >= 0 : one_run_p_value(m, r, v, eps, delta) < 1 - confidence}``
    (Steinke, Nasr & Jagielski 2023, Theorem 5.2 inverted by bisection, their
    Section 5 / Algorithm 3 procedure). The p-value is non-decreasing in eps, so
    the rejected set is an interval [0, eps*). With probability at
    least ``confidence`` over the canaries' inclusion coins, the run is NOT
    (eps, delta)-DP for any eps below the returned value; it is a lower bound only.

    Parameters
    ----------
    m, r, v : int
        Canaries, guesses, correct guesses (0 <= v <= r <= m).
    delta : float
        The delta at which the bound is stated, in [0, 1).
    confidence : float, default 0.95
        1 - beta, in (0, 1).
    tol : float, default 1e-6
        Bisection tolerance in nats.

    Returns
    -------
    float
        Epsilon lower bound in nats, ``>= 0``; 0.0 when even eps = 0 is consistent
        with the observation (e.g. ``v == 0``, or v no better than chance).

    Raises
    ------
    ValueError
        On invalid counts, confidence outside (0, 1) or delta outside [0, 1).

    Examples
    --------
    >>> round(one_run_epsilon_lower_bound(1000, 100, 100, 1e-5, 0.95), 2)
    3.47
    """
    _check_counts(m, r, v)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    beta = 1.0 - confidence
    if one_run_p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, hi * 2.0
        if hi > _EPS_SEARCH_MAX:
            return _EPS_SEARCH_MAX
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if one_run_p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class OneRunAuditResult:
    """Outcome of :func:`one_run_audit_from_scores`.

    Attributes
    ----------
    epsilon_lower_bound : float
        Best bound (nats) over the tried guess counts, each computed at the
        Bonferroni-corrected confidence; a LOWER bound.
    k_plus, k_minus : int
        Number of "included" guesses (top scores) and "excluded" guesses (bottom
        scores) that achieved it.
    r, v : int
        Guesses made (k_plus + k_minus) and correct guesses for that choice.
    m : int
        Number of canaries.
    delta : float
    confidence : float
        Overall confidence of the reported bound (after the correction).
    n_choices : int
        Number of (k_plus, k_minus) pairs tried (the Bonferroni factor).
    """

    epsilon_lower_bound: float
    k_plus: int
    k_minus: int
    r: int
    v: int
    m: int
    delta: float
    confidence: float
    n_choices: int


def one_run_audit_from_scores(
    scores: Sequence[float],
    included: Sequence[bool],
    delta: float,
    confidence: float = 0.95,
    guess_counts: Sequence[tuple[int, int]] | None = None,
) -> OneRunAuditResult:
    """One-run audit from canary scores: guess top-k_+ included, bottom-k_- excluded.

    The auditor sorts the m canaries by score (higher = more likely a member), guesses
    "included" for the ``k_plus`` highest, "excluded" for the ``k_minus`` lowest and
    abstains on the rest (Steinke, Nasr & Jagielski 2023, Section 6 / Algorithm 1).
    Then r = k_plus + k_minus and v = number of correct guesses.

    Choosing the best of several (k_plus, k_minus) after seeing the outcome costs
    confidence. We apply a Bonferroni correction: each of the K choices is evaluated
    at confidence ``1 - (1 - confidence) / K``, so the maximum over them holds with
    overall confidence ``confidence`` (union bound). Keep K small.

    Parameters
    ----------
    scores : array_like, shape [m]
        Membership score per canary (higher = more likely included). Ties are broken
        by a stable sort on the canary order.
    included : array_like of bool, shape [m]
        True inclusion bit of each canary (the auditor's secret coins).
    delta : float
        Delta at which the bound is stated.
    confidence : float, default 0.95
        Overall confidence of the returned bound.
    guess_counts : sequence of (k_plus, k_minus), optional
        Choices to try. Default: k_plus = k_minus = k for k in
        {m/20, m/10, m/5, m/2} (rounded, >= 1, distinct), i.e. 4 choices.

    Returns
    -------
    OneRunAuditResult

    Raises
    ------
    ValueError
        If shapes differ, m == 0, or a choice has k_plus + k_minus > m or negative
        counts.
    """
    s = np.asarray(scores, dtype=float).reshape(-1)
    b = np.asarray(included, dtype=bool).reshape(-1)
    if s.shape != b.shape:
        raise ValueError(f"scores {s.shape} and included {b.shape} differ in shape")
    m = int(s.size)
    if m == 0:
        raise ValueError("need at least one canary")
    if guess_counts is None:
        if m == 1:
            guess_counts = [(1, 0)]
        else:
            ks = {min(m // 2, max(1, int(round(m * f)))) for f in (0.05, 0.1, 0.2, 0.5)}
            guess_counts = [(k, k) for k in sorted(ks)]
    choices = [(int(a), int(c)) for a, c in guess_counts]
    for kp, km in choices:
        if kp < 0 or km < 0 or kp + km > m:
            raise ValueError(f"invalid guess counts (k_plus={kp}, k_minus={km}) for m={m}")
    order = np.argsort(-s, kind="stable")  # descending score
    n_choices = len(choices)
    per_choice_conf = 1.0 - (1.0 - confidence) / n_choices
    best = None
    for kp, km in choices:
        top = order[:kp]
        bottom = order[m - km :] if km > 0 else order[:0]
        v = int(b[top].sum() + (~b[bottom]).sum())
        eps = one_run_epsilon_lower_bound(m, kp + km, v, delta, per_choice_conf)
        if best is None or eps > best[0]:
            best = (eps, kp, km, v)
    eps, kp, km, v = best
    return OneRunAuditResult(eps, kp, km, kp + km, v, m, delta, confidence, n_choices)


# ----------------------------------------------------------------------------------
# Clopper-Pearson audit (Jagielski, Ullman, Oprea 2020)
# ----------------------------------------------------------------------------------


def _check_binomial(k: int, n: int, alpha: float) -> None:
    if int(k) != k or int(n) != n or not (0 <= k <= n) or n <= 0:
        raise ValueError(f"need integers 0 <= k <= n, n > 0, got k={k}, n={n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided Clopper-Pearson lower confidence bound on a binomial proportion.

    ``p_lo = Beta.ppf(alpha; k, n - k + 1)`` (0 when k == 0): P[p < p_lo] <= alpha.

    Parameters
    ----------
    k, n : int
        Successes and trials, 0 <= k <= n, n > 0.
    alpha : float
        One-sided error level in (0, 1).

    Returns
    -------
    float
        Lower bound in [0, 1].

    Raises
    ------
    ValueError
        On invalid counts or alpha.
    """
    _check_binomial(k, n, alpha)
    return 0.0 if k == 0 else float(stats.beta.ppf(alpha, k, n - k + 1))


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """One-sided Clopper-Pearson upper confidence bound on a binomial proportion.

    ``p_hi = Beta.ppf(1 - alpha; k + 1, n - k)`` (1 when k == n): P[p > p_hi] <= alpha.

    Parameters and errors as in :func:`clopper_pearson_lower`.
    """
    _check_binomial(k, n, alpha)
    return 1.0 if k == n else float(stats.beta.ppf(1.0 - alpha, k + 1, n - k))


def _safe_log_ratio(num: float, den: float) -> float:
    if num <= 0.0:
        return 0.0
    if den <= 0.0:
        return math.inf
    return max(0.0, math.log(num / den))


def clopper_pearson_epsilon_lower_bound(
    true_positives: int,
    n_positives: int,
    false_positives: int,
    n_negatives: int,
    delta: float,
    confidence: float = 0.95,
) -> float:
    """Empirical epsilon LOWER bound from TPR/FPR with Clopper-Pearson intervals.

    Jagielski, Ullman & Oprea (2020), Section 3 (Algorithm 2, "Monte Carlo estimate"):
    for an (eps, delta)-DP mechanism, any test distinguishing "with canary"
    (positives) from "without" (negatives) obeys TPR <= e^eps FPR + delta, and, by the
    same argument on the complementary event, (1 - FPR) <= e^eps (1 - TPR) + delta.
    Hence

    .. math::

        \\varepsilon \\ge \\max\\Big(
            \\log\\frac{\\underline{TPR} - \\delta}{\\overline{FPR}},\\;
            \\log\\frac{1 - \\overline{FPR} - \\delta}{1 - \\underline{TPR}}\\Big)

    where the under/over-lined rates are one-sided Clopper-Pearson bounds, each at
    level alpha/2 (alpha = 1 - confidence split equally between the two rates, as in
    the paper, which uses the two ends of a 1 - alpha interval). By a union bound
    the result holds with probability >= ``confidence``. Negative values are reported
    as 0.

    Parameters
    ----------
    true_positives : int
        Positive trials (canary present) on which the test said "present".
    n_positives : int
        Number of positive trials, > 0.
    false_positives : int
        Negative trials (canary absent) on which the test said "present".
    n_negatives : int
        Number of negative trials, > 0.
    delta : float
        Delta at which the bound is stated, in [0, 1).
    confidence : float, default 0.95

    Returns
    -------
    float
        Epsilon lower bound in nats, >= 0 (``inf`` only if the FPR upper bound is 0,
        which Clopper-Pearson never gives for n_negatives > 0).

    Raises
    ------
    ValueError
        On invalid counts, delta or confidence.

    Examples
    --------
    >>> round(clopper_pearson_epsilon_lower_bound(50, 1000, 1, 1000, 1e-5), 2)
    1.9
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    a = (1.0 - confidence) / 2.0
    tpr_lo = clopper_pearson_lower(true_positives, n_positives, a)
    fpr_hi = clopper_pearson_upper(false_positives, n_negatives, a)
    direct = _safe_log_ratio(tpr_lo - delta, fpr_hi)
    complement = _safe_log_ratio(1.0 - fpr_hi - delta, 1.0 - tpr_lo)
    return max(direct, complement)


@dataclass(frozen=True)
class ClopperPearsonSweepResult:
    """Outcome of :func:`clopper_pearson_threshold_sweep`.

    Attributes
    ----------
    epsilon_lower_bound : float
        Best bound (nats) over the thresholds, Bonferroni-corrected; a LOWER bound.
    threshold : float
        Score threshold achieving it (predict "member" when score >= threshold).
    true_positives, n_positives, false_positives, n_negatives : int
    confidence : float
        Overall confidence after the correction.
    n_thresholds : int
        Number of thresholds tried (the Bonferroni factor).
    """

    epsilon_lower_bound: float
    threshold: float
    true_positives: int
    n_positives: int
    false_positives: int
    n_negatives: int
    confidence: float
    n_thresholds: int


def clopper_pearson_threshold_sweep(
    scores: Sequence[float],
    labels: Sequence[bool],
    delta: float,
    confidence: float = 0.95,
    n_thresholds: int = 20,
) -> ClopperPearsonSweepResult:
    """Best Clopper-Pearson epsilon lower bound over score thresholds.

    Thresholds are ``n_thresholds`` quantiles of the positives' scores (predict
    "member" when score >= t). Picking the best threshold after seeing the data
    costs confidence: each threshold is evaluated at confidence
    ``1 - (1 - confidence) / n_thresholds`` (Bonferroni), so the returned maximum
    holds at overall ``confidence``. (Jagielski et al. 2020 choose the threshold on
    separate trials; a held-out split is the alternative if trials are plentiful.)

    Parameters
    ----------
    scores : array_like, shape [n]
        Test statistic per trial (higher = more likely "canary present").
    labels : array_like of bool, shape [n]
        True when the trial had the canary (positive).
    delta : float
    confidence : float, default 0.95
    n_thresholds : int, default 20

    Returns
    -------
    ClopperPearsonSweepResult

    Raises
    ------
    ValueError
        If shapes differ, either class is empty or n_thresholds < 1.
    """
    s = np.asarray(scores, dtype=float).reshape(-1)
    y = np.asarray(labels, dtype=bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in shape")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("need at least one positive and one negative trial")
    if n_thresholds < 1:
        raise ValueError("n_thresholds must be >= 1")
    thresholds = np.unique(np.quantile(s[y], np.linspace(0.0, 1.0, n_thresholds)))
    k = int(thresholds.size)
    conf_each = 1.0 - (1.0 - confidence) / k
    best = None
    for t in thresholds:
        pred = s >= t
        tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
        eps = clopper_pearson_epsilon_lower_bound(tp, n_pos, fp, n_neg, delta, conf_each)
        if best is None or eps > best[0]:
            best = (eps, float(t), tp, fp)
    eps, t, tp, fp = best
    return ClopperPearsonSweepResult(eps, t, tp, n_pos, fp, n_neg, confidence, k)
