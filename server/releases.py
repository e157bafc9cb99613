"""Releases: which rounds' models are released, and how a release's predictions flip against the last.

A production NLU model is released again and again; its owners ask whether a new release breaks
what the previous one got right. For each release the server measures, on the test split:

* the negative flip rate ``NFR = (1/N) sum_i 1[old_i correct and new_i wrong]`` and
* the positive flip rate ``PFR = (1/N) sum_i 1[old_i wrong and new_i correct]``

(Yan et al. 2021, "Positive-congruent training: towards regression-free model updates", CVPR,
Sec. 3), against the previous release and, with ``--baseline-model``, against a model the user
already ships. Both are computed from the released models and the public test split only, so
they cost no privacy. :class:`ReleaseTracker` keeps the previous release's correctness and, for
positive-congruent training (``--pc-weight``), its trainable parameters, which the server sends
to the cohort as the teacher (part of the server state, so a resumed run compares against, and
distils towards, the right release).
"""

from __future__ import annotations

import numpy as np

__all__ = ["ReleaseTracker", "flip_rates", "is_release"]


def flip_rates(old_correct: np.ndarray, new_correct: np.ndarray) -> tuple[float, float]:
    """(NFR, PFR) of a new model against an old one on the same N examples.

    Parameters
    ----------
    old_correct, new_correct : numpy.ndarray of bool, shape [N]
        Whether each test example is classified correctly by the old / new model.

    Returns
    -------
    (float, float)
        NFR = share of examples old gets right and new gets wrong; PFR = the converse
        (Yan et al. 2021, Sec. 3). accuracy(new) - accuracy(old) = PFR - NFR.

    Raises
    ------
    ValueError
        If the arrays differ in shape or are empty.
    """
    old = np.asarray(old_correct, dtype=bool)
    new = np.asarray(new_correct, dtype=bool)
    if old.shape != new.shape or old.ndim != 1 or old.size == 0:
        raise ValueError(f"flip rates need two non-empty [N] arrays of one shape, got {old.shape} and {new.shape}")
    n = float(old.size)
    return float((old & ~new).sum() / n), float((~old & new).sum() / n)


def is_release(t: int, rounds: int, release_every: int | None, eval_every: int) -> bool:
    """Whether round ``t``'s model is a release: every ``release_every``-th round and the last;
    by default (``release_every`` None) the evaluation rounds (every ``eval_every``-th and the last)."""
    every = release_every if release_every is not None else eval_every
    return t % every == 0 or t == rounds


class ReleaseTracker:
    """The previous release's per-example correctness and the baseline model's, on the test split.

    Parameters
    ----------
    baseline_correct : numpy.ndarray of bool [N], optional
        Correctness of the ``--baseline-model`` on the test split.
    """

    def __init__(self, baseline_correct: np.ndarray | None = None):
        self.baseline_correct = None if baseline_correct is None else np.asarray(baseline_correct, dtype=bool)
        self.last_correct: np.ndarray | None = None
        self.last_round: int | None = None
        #: the previous release's trainable parameters (kept only when asked, for --pc-weight)
        self.last_arrays: dict[str, np.ndarray] | None = None

    def release(self, t: int, correct: np.ndarray, arrays: dict[str, np.ndarray] | None = None) -> dict[str, float | None | bool | int]:
        """Record round ``t``'s release (``arrays``: its trainable parameters, to keep as the
        teacher of positive-congruent training); return its metrics-line fields.

        ``release`` (True), ``previous_release`` (round or None), ``nfr`` / ``pfr`` against the
        previous release (None at the first) and ``nfr_baseline`` / ``pfr_baseline`` (None
        without a baseline).
        """
        correct = np.asarray(correct, dtype=bool)
        out: dict[str, float | None | bool | int] = {"release": True, "previous_release": self.last_round,
                                                     "nfr": None, "pfr": None, "nfr_baseline": None,
                                                     "pfr_baseline": None}
        if self.last_correct is not None:
            out["nfr"], out["pfr"] = flip_rates(self.last_correct, correct)
        if self.baseline_correct is not None:
            out["nfr_baseline"], out["pfr_baseline"] = flip_rates(self.baseline_correct, correct)
        self.last_correct, self.last_round = correct, t
        if arrays is not None:
            self.last_arrays = {k: np.array(v, copy=True) for k, v in arrays.items()}
        return out

    def state_dict(self) -> dict:
        """The previous release (picklable; part of the server checkpoint)."""
        return {"last_correct": self.last_correct, "last_round": self.last_round, "last_arrays": self.last_arrays}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output."""
        state = state or {}
        self.last_correct = state.get("last_correct")
        self.last_round = state.get("last_round")
        self.last_arrays = state.get("last_arrays")
