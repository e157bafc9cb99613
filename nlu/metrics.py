"""Classification metrics (accuracy, macro-F1) from scikit-learn."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score


def intent_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (unweighted mean of per-label F1 over labels present in either array).

    Parameters
    ----------
    y_true, y_pred : numpy.ndarray, shape [N]
        Integer label ids.
    num_labels : int
        Size of the label set (for the macro average over every label that appears).
    """
    if len(y_true) == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    labels = np.unique(np.concatenate([y_true, y_pred]))
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
    }
