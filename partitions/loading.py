"""One entry point for every data source: :func:`load_data` -> :class:`NLUData`.

Sources (exactly one):

- ``data_dir``: a directory with ``train.jsonl`` and ``test.jsonl`` (see :mod:`partitions.jsonl`);
- ``dataset``: a Hugging Face hub name (see :mod:`partitions.hub`; needs the network);
- neither: the built-in synthetic home-assistant set (see :mod:`partitions.synthetic`).

Columns of both splits: ``text`` (str), ``label`` (int64 id into ``label_names``), ``uid``
(int64: the row's index in the split as loaded, before any ``max_examples`` cap, so it is a
stable example id), and, when the source has slot annotations, ``tokens`` and ``slots``
(lists of str; tags are names, map them with ``slot_names``). The synthetic train split also
has ``device`` (int64 natural device id, used by the ``natural`` partitioner); with
``device_column`` set, a JSONL or hub train split that has that field keeps it under its
own name (int64 when every id is an integer, else string), for ``natural``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from partitions.errors import DataError

__all__ = ["NLUData", "SyntheticTrain", "load_data", "stratified_subset", "capped_test_size"]


@dataclass(frozen=True, init=False)
class NLUData:
    """A loaded data set.

    Attributes
    ----------
    train, test : datasets.Dataset
        Columns ``text``, ``label``, ``uid`` and optionally ``tokens``, ``slots`` (and
        ``device`` on the synthetic train split). The built-in synthetic train split is
        generated device by device when rows are asked for (:meth:`select_train`,
        :class:`SyntheticTrain`); reading ``train`` materialises it all (once per process).
    label_names : list of str
        Label id -> name.
    slot_names : list of str or None
        BIO tag vocabulary with ``"O"`` first, or None when there are no slot annotations.
    source : str
        Where the data came from, for logs and reports.
    labels_declared : bool
        True when the label names come from a declared schema (``labels.json`` beside the JSONL
        files, a hub ClassLabel, the built-in set), False when they were read off the training
        split's label values (then the set of names is itself a function of the training data).
    generated_train : SyntheticTrain or None
        The generator of a train split that is built on demand; None when ``train`` is loaded.
    test_oos : datasets.Dataset or None
        The out-of-scope test utterances (label -1), kept apart from ``test`` (in scope only) when
        the run evaluates out-of-scope detection (:func:`partitions.out_of_scope.split_out_of_scope`).
    oos_label : str or None
        The name out-of-scope utterances go by.
    oos_index : int or None
        The out-of-scope class's id in ``label_names`` when the training data has one (oos-train).
    oos_intents : tuple of str
        The intents held out as out of scope (``--oos-holdout-intents``).

    Raises
    ------
    ValueError
        Unless exactly one of ``train`` and ``generated_train`` is given.
    """

    test: datasets.Dataset
    label_names: list[str]
    slot_names: list[str] | None
    source: str
    labels_declared: bool = False
    generated_train: "SyntheticTrain | None" = None
    test_oos: datasets.Dataset | None = None
    oos_label: str | None = None
    oos_index: int | None = None
    oos_intents: tuple = ()

    def __init__(self, train: datasets.Dataset | None = None, test: datasets.Dataset | None = None,
                 label_names: list[str] = (), slot_names: list[str] | None = None, source: str = "",
                 labels_declared: bool = False, generated_train: "SyntheticTrain | None" = None,
                 test_oos: datasets.Dataset | None = None, oos_label: str | None = None, oos_index: int | None = None,
                 oos_intents: tuple = ()):
        if (train is None) == (generated_train is None):
            raise ValueError("NLUData: give the train split or its generator, not both or neither")
        for k, v in (("test", test), ("label_names", list(label_names)), ("slot_names", slot_names),
                     ("source", source), ("labels_declared", labels_declared), ("generated_train", generated_train),
                     ("test_oos", test_oos), ("oos_label", oos_label), ("oos_index", oos_index),
                     ("oos_intents", tuple(oos_intents))):
            object.__setattr__(self, k, v)
        object.__setattr__(self, "_train", train)
        object.__setattr__(self, "_lock", threading.Lock())

    @property
    def train(self) -> datasets.Dataset:
        """The whole train split (a generated one is materialised on first use, once per process)."""
        if self._train is None:
            with self._lock:
                if self._train is None:
                    object.__setattr__(self, "_train", self.generated_train.materialise())
        return self._train

    @property
    def num_train(self) -> int:
        """Rows of the train split (without building it)."""
        return self.generated_train.size if self._train is None else len(self._train)

    @property
    def train_columns(self) -> list[str]:
        """Column names of the train split (without building it)."""
        return list(SyntheticTrain.COLUMNS) if self._train is None else list(self._train.column_names)

    def select_train(self, rows) -> datasets.Dataset:
        """Train rows ``rows`` (indices into the split, in that order) as a Dataset; a generated split
        builds only the devices that hold them."""
        rows = [int(r) for r in rows]
        if self._train is None:
            return self.generated_train.select(rows)
        return self._train.select(rows)

    def train_records(self, rows) -> dict[str, list]:
        """Train rows ``rows`` (in that order) as plain columns (name -> list), without a Dataset around
        them: what a device task tokenises (a generated split builds only the devices that hold them)."""
        rows = [int(r) for r in rows]
        if self._train is None:
            return self.generated_train.records(rows)
        return self._train.select(rows).to_dict()

    def train_uids(self) -> np.ndarray:
        """The ``uid`` column of the train split, int64 [N] (a generated split's uid is its row index)."""
        if self._train is None:
            return np.arange(self.generated_train.size, dtype=np.int64)
        return np.asarray(self._train.select_columns(["uid"]).with_format("numpy")[:]["uid"])

    def with_train(self, train: datasets.Dataset) -> "NLUData":
        """A copy with ``train`` as its (loaded) train split."""
        return NLUData(train=train, test=self.test, label_names=self.label_names, slot_names=self.slot_names,
                       source=self.source, labels_declared=self.labels_declared, test_oos=self.test_oos,
                       oos_label=self.oos_label, oos_index=self.oos_index, oos_intents=self.oos_intents)

    @property
    def num_labels(self) -> int:
        """Number of labels (intents)."""
        return len(self.label_names)

    @property
    def has_slots(self) -> bool:
        """Whether the splits carry ``tokens``/``slots``."""
        return self.slot_names is not None


class SyntheticTrain:
    """The built-in synthetic train split as an index: device sizes, and rows built when asked for.

    Row ``r`` is example ``r - offsets[k]`` of device k, where ``offsets[k] <= r < offsets[k+1]``
    (rows grouped by device, as :func:`partitions.synthetic.generate` lays them out); its
    ``uid`` is ``r``. A device's records are a function of (seed, device id) alone
    (:func:`partitions.synthetic.device_records`), so the rows of a few selected devices cost
    what those devices hold, whatever the population's size.

    Parameters
    ----------
    seed : int
        The run seed.
    sizes : numpy.ndarray
        Examples per device, shape [K] int64 (:func:`partitions.synthetic.device_sizes`).
    """

    COLUMNS = ("text", "label", "uid", "tokens", "slots", "device")

    def __init__(self, seed: int, sizes: np.ndarray):
        from partitions.device_index import DeviceIndex

        self.seed = int(seed)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        #: the natural devices' rows: device k holds rows offsets[k] .. offsets[k + 1] - 1
        self.index = DeviceIndex.ranges(self.sizes)
        self.offsets = self.index.offsets

    @property
    def size(self) -> int:
        """Train rows in all."""
        return int(self.offsets[-1])

    def _records(self, device: int) -> dict[str, list]:
        from partitions.synthetic import device_records

        return device_records(self.seed, device, int(self.sizes[device]))

    def records(self, rows: list[int]) -> dict[str, list]:
        """Rows ``rows`` (in that order) as columns: those of :attr:`COLUMNS` (``uid`` = the row).

        Raises
        ------
        IndexError
            A row outside ``0 .. size - 1``.
        """
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.size):
            raise IndexError(f"train row out of range 0..{self.size - 1}")
        dev = np.searchsorted(self.offsets, idx, side="right") - 1
        built = {int(k): self._records(int(k)) for k in np.unique(dev)}
        cols: dict[str, list] = {k: [] for k in ("text", "label", "tokens", "slots", "device")}
        for r, k in zip(idx.tolist(), dev.tolist()):
            j = r - int(self.offsets[k])
            for c in cols:
                cols[c].append(built[k][c][j])
        return {"text": cols["text"], "label": cols["label"], "uid": idx.tolist(), "tokens": cols["tokens"],
                "slots": cols["slots"], "device": cols["device"]}

    def select(self, rows: list[int]) -> datasets.Dataset:
        """Rows ``rows`` (in that order) as a Dataset with the columns of :attr:`COLUMNS` (see :meth:`records`)."""
        cols = self.records(rows)
        uids = cols.pop("uid")
        return _to_dataset(cols, uids=np.asarray(uids, dtype=np.int64), hashed=False)

    def materialise(self) -> datasets.Dataset:
        """The whole split (every device's records, in device order)."""
        from partitions.synthetic import train_columns

        return _to_dataset(train_columns(self.seed, self.sizes))


def _features(cols: dict[str, list]) -> datasets.Features:
    feats = {k: datasets.Value("int64" if all(isinstance(v, (int, np.integer)) for v in vals) else "string")
             for k, vals in cols.items()}
    feats |= {"text": datasets.Value("string"), "label": datasets.Value("int64"), "uid": datasets.Value("int64")}
    if "tokens" in cols:
        feats["tokens"] = datasets.Sequence(datasets.Value("string"))
        feats["slots"] = datasets.Sequence(datasets.Value("string"))
    return datasets.Features({k: feats[k] for k in cols})


def _to_dataset(cols: dict[str, list], rows: np.ndarray | None = None, uids: np.ndarray | None = None,
                hashed: bool = True) -> datasets.Dataset:
    """Build a split; ``uid`` = row index in ``cols`` (or ``uids``); ``rows`` (sorted) keeps only those rows.

    ``hashed=False`` gives the Dataset a random fingerprint instead of a hash of its content
    (``datasets`` pickles every value to hash it: 20 ms for a device's 30 rows, most of a
    device task's cost with a small model); an in-memory split never uses it as a cache key.
    """
    n = len(cols["text"])
    keep = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    order = [k for k in ("text", "label", "tokens", "slots", "device") if k in cols]
    order += [k for k in cols if k not in order]  # e.g. a user id column kept for "natural"
    out: dict[str, list] = {}
    for k in order:
        out[k] = cols[k] if rows is None else [cols[k][i] for i in keep]
        if k not in ("text", "label", "tokens", "slots") and not all(isinstance(v, int) for v in out[k]):
            out[k] = [str(v) for v in out[k]]  # ids mixing strings and integers: all strings
        if k == "label":
            out["uid"] = keep if uids is None else np.asarray(uids, dtype=np.int64)
    feats = _features(out)
    if hashed:
        return datasets.Dataset.from_dict(out, features=feats)
    import secrets

    import pyarrow as pa

    table = datasets.table.InMemoryTable(pa.Table.from_pydict(feats.encode_batch(out), schema=feats.arrow_schema))
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=feats), fingerprint=secrets.token_hex(16))


def stratified_subset(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Sorted row indices of a seeded, label-stratified subset of size ``k``.

    Each label keeps about ``k * (its share)`` rows (proportional allocation, so rare labels
    keep at least one row when ``k`` allows). Rows are ranked within their label in a random
    order; a row's key is ``(rank + u) / label_count`` with ``u`` uniform in [0, 1), and the
    ``k`` smallest keys are kept. If ``k >= len(labels)`` every row is kept.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if k >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    lab = labels[perm]
    order = np.argsort(lab, kind="stable")
    sorted_lab = lab[order]
    starts = np.r_[0, np.flatnonzero(sorted_lab[1:] != sorted_lab[:-1]) + 1]
    counts = np.diff(np.r_[starts, n])
    rank = np.arange(n) - np.repeat(starts, counts)
    keys = np.empty(n)
    keys[order] = (rank + rng.random(n)) / np.repeat(counts, counts)
    chosen = perm[np.argsort(keys, kind="stable")[:k]]
    return np.sort(chosen).astype(np.int64)


def capped_test_size(max_examples: int) -> int:
    """Test rows kept when train is capped to ``max_examples``: ``max(500, max_examples // 2)``."""
    return max(500, max_examples // 2)


def load_data(
    data_dir: str | Path | None = None,
    dataset: str | None = None,
    *,
    text_column: str = "text",
    label_column: str = "label",
    max_examples: int | None = None,
    seed: int = 0,
    synthetic_devices: int = 100,
    device_column: str | None = None,
) -> NLUData:
    """Load a data set from exactly one source.

    Parameters
    ----------
    data_dir : str or Path, optional
        Directory with ``train.jsonl`` and ``test.jsonl`` (and optionally ``labels.json``).
    dataset : str, optional
        Hugging Face hub data set name, loaded with ``datasets.load_dataset``.
    text_column, label_column : str
        Field/column names of the utterance and its label in the source (the returned
        columns are always ``text`` and ``label``). Not used by the synthetic set.
    max_examples : int, optional
        Cap on TRAIN rows: a seeded, label-stratified subset (:func:`stratified_subset`),
        kept in the original row order with ``uid`` = the original row index. TEST is capped
        to ``max(500, max_examples // 2)`` rows the same way. ``None``: no cap.
    seed : int
        Seed of the cap's subset and of the synthetic generator.
    synthetic_devices : int
        Natural devices of the built-in synthetic set (ignored for other sources).
    device_column : str, optional
        A device/user id field of JSONL or hub train records to keep as a column of that name
        (for the ``natural`` partitioner); ignored when the source has no such field. The
        synthetic set always has ``device``.

    Returns
    -------
    NLUData

    Raises
    ------
    DataError
        Both ``data_dir`` and ``dataset`` given; any file problem (names file and line, see
        :func:`partitions.jsonl.read_jsonl_dir`); the hub is unreachable or the hub data set
        is unusable (suggests ``--data-dir``).
    ValueError
        ``max_examples < 1`` or ``synthetic_devices < 1``.
    """
    if data_dir is not None and dataset is not None:
        raise DataError("give either a data directory (--data-dir) or a hub dataset (--dataset), not both")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 (or None for no cap), got {max_examples}")

    if data_dir is not None:
        from partitions.jsonl import read_jsonl_dir

        extra = (device_column,) if device_column and device_column not in ("text", "label", "uid", "tokens",
                                                                             "slots") else ()
        tr, te, label_names, slot_names = read_jsonl_dir(data_dir, text_column=text_column, label_column=label_column,
                                                         extra_columns=extra)
        index = {n: i for i, n in enumerate(label_names)}
        cols = []
        for split in (tr, te):
            c: dict[str, list] = {"text": split.texts, "label": [index[x] for x in split.labels]}
            if split.tokens is not None:
                c["tokens"], c["slots"] = split.tokens, split.slots
            c.update(split.extra)
            cols.append(c)
        train_cols, test_cols = cols
        source = f"JSONL files in {Path(data_dir)}"
        declared = (Path(data_dir) / "labels.json").is_file()
    elif dataset is not None:
        from partitions.hub import read_hub

        raw = read_hub(dataset, text_column=text_column, label_column=label_column, device_column=device_column)
        train_cols, test_cols = raw["train"], raw["test"]
        label_names, slot_names, source = raw["label_names"], raw["slot_names"], raw["source"]
        declared = bool(raw.get("labels_declared"))
    else:
        from partitions import synthetic

        if synthetic_devices < 1:
            raise ValueError(f"synthetic_devices must be >= 1, got {synthetic_devices}")
        sizes = synthetic.device_sizes(synthetic_devices, seed, mean=synthetic.default_mean_examples(synthetic_devices))
        gen_train = SyntheticTrain(seed, sizes)
        test_cols = synthetic.test_records(seed, synthetic.default_test_size(gen_train.size))
        label_names, slot_names = list(synthetic.INTENTS), synthetic.slot_names()
        declared = True
        source = (f"built-in SYNTHETIC home-assistant commands (seed {seed}, {synthetic_devices} devices, "
                  f"{len(label_names)} intents; generated, not real user data)")
        if max_examples is None:  # the train split stays an index: devices are built when selected
            return NLUData(generated_train=gen_train, test=_to_dataset(test_cols), label_names=label_names,
                           slot_names=slot_names, source=source, labels_declared=declared)
        train_cols = synthetic.train_columns(seed, sizes)  # a cap needs every label first

    train_rows = test_rows = None
    if max_examples is not None:
        n_train, n_test = len(train_cols["text"]), len(test_cols["text"])
        train_rows = stratified_subset(np.asarray(train_cols["label"]), max_examples, seed)
        test_rows = stratified_subset(np.asarray(test_cols["label"]), capped_test_size(max_examples), seed + 1)
        if len(train_rows) < n_train or len(test_rows) < n_test:
            source += (f"; capped to {len(train_rows)}/{n_train} train and "
                       f"{len(test_rows)}/{n_test} test examples (seed {seed})")
    train, test = _to_dataset(train_cols, train_rows), _to_dataset(test_cols, test_rows)
    return NLUData(train=train, test=test, label_names=list(label_names),
                   slot_names=None if slot_names is None else list(slot_names), source=source,
                   labels_declared=declared)
