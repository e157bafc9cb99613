"""Out-of-scope test utterances: a named out-of-scope label, or intents held out as out of scope.

Two standard settings of intent detection with out-of-scope queries:

* **a declared out-of-scope label** (``--oos-label NAME``, Larson et al. 2019, CLINC150's
  ``oos``): its test utterances are out of scope; where the training data has it, it stays a class
  the model learns (oos-train).
* **held-out intents** (``--oos-holdout-intents F``, Zhang et al. 2021 on BANKING77, CLINC150 and
  StackOverflow): a fixed, seeded fraction F of the intents is removed from training (their
  utterances and names) and their test utterances become out of scope.

The choice of held-out intents reads only the label schema and ``--oos-split-seed`` (public).
"""

from __future__ import annotations

import numpy as np

from partitions.errors import DataError
from partitions.loading import NLUData

__all__ = ["DEFAULT_OOS_NAME", "held_out_intents", "split_out_of_scope"]

#: The name out-of-scope utterances go by when no ``--oos-label`` is given.
DEFAULT_OOS_NAME = "out_of_scope"

#: Mixed into ``--oos-split-seed`` (the split has a stream of its own).
_SPLIT_STREAM = 0x005C0E


def held_out_intents(num_labels: int, fraction: float, split_seed: int, exclude: int | None = None) -> list[int]:
    """Sorted label ids of the intents held out: ``round(fraction * n)`` of the ``n`` intents other
    than ``exclude`` (the out-of-scope class), chosen uniformly with numpy's PCG64 seeded with
    ``(split_seed, 0x5C0E)``.

    Raises
    ------
    DataError
        If that leaves no intent out, or no intent in scope.
    """
    candidates = np.array([i for i in range(int(num_labels)) if i != exclude], dtype=np.int64)
    k = int(round(float(fraction) * len(candidates)))
    if not 1 <= k < len(candidates):
        raise DataError(f"--oos-holdout-intents {fraction}: holds out {k} of the data set's {len(candidates)} intents; "
                        "choose a fraction that holds out at least one and keeps at least one")
    rng = np.random.default_rng([int(split_seed), _SPLIT_STREAM])
    return sorted(int(i) for i in rng.choice(candidates, size=k, replace=False))


def _relabel(ds, rows: np.ndarray, lut: np.ndarray):
    import datasets

    cols = ds.select(rows.tolist()).to_dict()
    cols["label"] = lut[np.asarray(cols["label"], dtype=np.int64)].tolist()
    return datasets.Dataset.from_dict(cols, features=ds.features)


def split_out_of_scope(data: NLUData, oos_label: str | None, holdout_fraction: float, split_seed: int) -> NLUData:
    """``data`` with its out-of-scope test utterances apart (``test_oos``, label -1) and, with
    ``holdout_fraction`` > 0, the held-out intents removed from its labels and its train split.

    The in-scope labels keep their order and are renumbered 0..K'-1; an out-of-scope label present
    in the label schema stays one of them (``oos_index``), so a model trained on it can predict it.

    Raises
    ------
    DataError
        If intents are to be held out of a data set whose label names were read off its training
        split (not a declared schema); if ``oos_label`` is not one of the data set's labels and no intents are held out, or the
        fraction holds out no intent or every intent; if the train split is generated (the
        built-in set) and intents are to be held out.
    """
    names = list(data.label_names)
    oos_id = names.index(oos_label) if oos_label and oos_label in names else None
    if oos_label and oos_id is None and holdout_fraction <= 0:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise DataError(f"--oos-label {oos_label!r}: not a label of {data.source} (labels: {shown}); name one of them "
                        "or hold out intents with --oos-holdout-intents F")
    if holdout_fraction > 0 and not data.labels_declared:
        raise DataError("--oos-holdout-intents: the label names were read off the training data (no labels.json beside "
                        "train.jsonl), so which intents are held out would depend on it; write the public label schema "
                        "to labels.json (a JSON list of the names)")
    held = held_out_intents(len(names), holdout_fraction, split_seed, exclude=oos_id) if holdout_fraction > 0 else []
    if held and data.generated_train is not None:
        raise DataError("--oos-holdout-intents needs a real data set (--data-dir or --dataset): the built-in set's "
                        "training split is generated device by device")
    drop = set(held)
    keep = [i for i in range(len(names)) if i not in drop]
    lut = np.full(len(names), -1, dtype=np.int64)
    lut[keep] = np.arange(len(keep))
    oos_test = drop | ({oos_id} if oos_id is not None else set())
    test_labels = np.asarray(data.test["label"], dtype=np.int64)
    is_oos = np.isin(test_labels, sorted(oos_test))
    test_in = _relabel(data.test, np.nonzero(~is_oos)[0], lut)
    test_oos = _relabel(data.test, np.nonzero(is_oos)[0], np.full(len(names), -1, dtype=np.int64))
    if held:
        train_labels = np.asarray(data.train.select_columns(["label"])["label"], dtype=np.int64)
        train = _relabel(data.train, np.nonzero(~np.isin(train_labels, held))[0], lut)
    else:
        train = data.train if data.generated_train is None else None
    source = data.source
    if held:
        source += f"; {len(held)} of {len(names) - (oos_id is not None)} intents held out as out of scope (split seed {split_seed})"
    return NLUData(
        train=train, generated_train=data.generated_train if train is None else None, test=test_in,
        label_names=[names[i] for i in keep], slot_names=data.slot_names, source=source,
        labels_declared=data.labels_declared, test_oos=test_oos,
        oos_label=oos_label or DEFAULT_OOS_NAME, oos_index=None if oos_id is None else int(lut[oos_id]),
        oos_intents=tuple(names[i] for i in held),
    )
