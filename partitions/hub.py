"""Loading a Hugging Face hub data set (``--dataset NAME``) through ``datasets.load_dataset``.

Splits: ``train`` and ``test`` are used when present; without ``test`` the first of
``validation``/``valid``/``dev`` stands in. Labels: a ``ClassLabel`` column keeps its names
and ids; any other label column (strings or integers) is mapped like the JSONL files
(sorted distinct train labels). A ``tokens``/``slots`` pair of sequence columns is kept
when present (``slots`` as tag strings; a ``Sequence(ClassLabel)`` is decoded).

Network and offline failures become a :class:`~partitions.errors.DataError` that says the
hub could not be reached and suggests ``--data-dir``.
"""

from __future__ import annotations

from typing import Any

from partitions.errors import DataError
from partitions.jsonl import sorted_labels, slot_vocabulary

__all__ = ["read_hub"]

_TEST_SPLITS = ("test", "validation", "valid", "dev")
_NETWORK_HINTS = ("offline", "connection", "couldn't reach", "could not reach", "network", "timed out",
                  "timeout", "max retries", "name resolution", "hf_hub_offline", "internet")


def _unreachable(name: str, exc: BaseException) -> DataError:
    return DataError(
        f"dataset {name!r}: the Hugging Face hub is unreachable ({type(exc).__name__}: {str(exc)[:300]}). "
        "Work offline with --data-dir DIR (train.jsonl and test.jsonl), or use the built-in "
        "synthetic data set (give neither --data-dir nor --dataset)."
    )


def _load(name: str):
    import datasets  # imported here: loading datasets is slow and only this path needs the hub

    try:
        return datasets.load_dataset(name)
    except Exception as exc:  # noqa: BLE001 - classify every failure into a DataError
        msg = f"{type(exc).__name__} {exc}".lower()
        offline = any(h in msg for h in ("offline", "couldn't reach", "could not reach"))
        if "notfound" in type(exc).__name__.lower() and not offline:  # e.g. DatasetNotFoundError (an OSError)
            raise DataError(f"dataset {name!r}: not found on the Hugging Face hub ({str(exc)[:300]}); "
                            "check the name, or use --data-dir DIR with train.jsonl and test.jsonl") from exc
        if isinstance(exc, (ConnectionError, TimeoutError, OSError)) or any(h in msg for h in _NETWORK_HINTS):
            raise _unreachable(name, exc) from exc
        raise DataError(f"dataset {name!r}: could not load it from the Hugging Face hub: "
                        f"{type(exc).__name__}: {str(exc)[:300]} (or use --data-dir)") from exc


def read_hub(name: str, *, text_column: str = "text", label_column: str = "label",
             device_column: str | None = None) -> dict[str, Any]:
    """Load ``name`` from the hub and return plain columns.

    Returns
    -------
    dict
        ``train``/``test``: dicts of columns (text, label as int id, optional tokens/slots;
        train also ``device_column`` when given and present);
        ``label_names``; ``slot_names`` (or None); ``source``.

    Raises
    ------
    DataError
        The hub is unreachable (offline) or the data set cannot be loaded; it has no
        ``train`` split or no test-like split; a column is missing; a text is empty; a test
        label is not a train label.
    """
    dsd = _load(name)
    if not hasattr(dsd, "keys"):
        raise DataError(f"dataset {name!r}: expected named splits, got {type(dsd).__name__}")
    if "train" not in dsd:
        raise DataError(f"dataset {name!r}: no 'train' split (splits: {sorted(dsd.keys())})")
    test_split = next((s for s in _TEST_SPLITS if s in dsd), None)
    if test_split is None:
        raise DataError(f"dataset {name!r}: no test split (looked for {', '.join(_TEST_SPLITS)}; "
                        f"splits: {sorted(dsd.keys())})")
    splits = {"train": dsd["train"], "test": dsd[test_split]}
    for split, ds in splits.items():
        for col in (text_column, label_column):
            if col not in ds.column_names:
                raise DataError(f"dataset {name!r} split {split!r}: no column {col!r} "
                                f"(columns: {ds.column_names}; set text_column / label_column)")

    feat = splits["train"].features[label_column]
    names = getattr(feat, "names", None)
    out: dict[str, Any] = {"source": f"Hugging Face hub dataset {name!r} (train, {test_split})"}
    if names:
        label_names = [str(n) for n in names]
        convert = lambda v, where: int(v)  # noqa: E731
    else:
        train_labels = [str(v) for v in splits["train"][label_column]]
        label_names = sorted_labels(set(train_labels))
        index = {n: i for i, n in enumerate(label_names)}

        def convert(v, where):
            try:
                return index[str(v)]
            except KeyError:
                raise DataError(f"dataset {name!r} {where}: label {v!r} does not occur in train") from None
    out["label_names"] = label_names
    out["labels_declared"] = bool(names)  # a ClassLabel's names: the data set's declared schema

    has_slots = all("tokens" in ds.column_names and "slots" in ds.column_names for ds in splits.values())
    for split, ds in splits.items():
        texts = ds[text_column]
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise DataError(f"dataset {name!r} split {split!r} row {i + 1}: empty or non-string text")
        labels = [convert(v, f"split {split!r} row {i + 1}") for i, v in enumerate(ds[label_column])]
        cols: dict[str, list] = {"text": list(texts), "label": labels}
        if has_slots:
            slot_feat = getattr(ds.features["slots"], "feature", None)
            tag_names = getattr(slot_feat, "names", None)
            slots = ds["slots"]
            if tag_names:
                slots = [[tag_names[t] for t in row] for row in slots]
            cols["tokens"], cols["slots"] = ds["tokens"], [list(map(str, r)) for r in slots]
            for i, (tk, sl) in enumerate(zip(cols["tokens"], cols["slots"])):
                if len(tk) != len(sl):
                    raise DataError(f"dataset {name!r} split {split!r} row {i + 1}: "
                                    f"{len(tk)} tokens but {len(sl)} slot tags")
        if split == "train" and device_column and device_column in ds.column_names and device_column not in cols:
            cols[device_column] = list(ds[device_column])
        out[split] = cols
    out["slot_names"] = slot_vocabulary(out["train"].get("slots"), out["test"].get("slots")) if has_slots else None
    return out
