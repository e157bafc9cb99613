"""Reading a data directory of JSON Lines files (``--data-dir``).

Layout::

    DIR/train.jsonl    one JSON object a line: {"text": ..., "label": ...}
    DIR/test.jsonl     same fields
    DIR/labels.json    optional: a JSON list of label names, which fixes the label ids

For slot filling a record also has ``"tokens"`` (list of str) and ``"slots"`` (BIO tags,
one per token), as in the SNIPS files. Other fields (e.g. SNIPS' ``"entities"``) are ignored.

Files are streamed line by line; blank lines are skipped. Every problem is a
:class:`~partitions.errors.DataError` naming the file and the 1-based line.

Label ids: if ``labels.json`` sits beside the files, its order; otherwise the sorted
order of the distinct train labels. Integer labels are accepted and turned into their
decimal string (so ``3`` and ``"3"`` are the same label); sorting is then numeric when
every label is an integer string, so ids follow ``0, 1, 2, ..., 10`` rather than
``0, 1, 10, 2``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from partitions.errors import DataError

__all__ = ["JsonlSplit", "read_jsonl", "read_labels_json", "read_jsonl_dir", "slot_vocabulary", "sorted_labels"]

#: The slot fields; a data set either has both on every record or on none.
TOKENS, SLOTS = "tokens", "slots"


@dataclass
class JsonlSplit:
    """The validated columns of one JSONL file (labels still as names).

    Attributes
    ----------
    path : Path
        The file read.
    texts : list of str
    labels : list of str
        Label names (integers already turned into strings).
    lines : list of int
        The 1-based line each record came from (for later error messages).
    tokens, slots : list of list of str, or None
        Present when the records carry slot annotations.
    extra : dict of str to list
        The requested ``extra_columns`` the records carry (e.g. a device/user id), str or int.
    """

    path: Path
    texts: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    tokens: list[list[str]] | None = None
    slots: list[list[str]] | None = None
    extra: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)


def _label_to_str(value: object, where: str, label_column: str) -> str:
    # bool is an int subclass: reject it explicitly, "true" is not a sensible intent id.
    if isinstance(value, bool) or value is None:
        raise DataError(f"{where}: field {label_column!r} must be a string or an integer, got {json.dumps(value)}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field {label_column!r} is empty")
        return value
    raise DataError(
        f"{where}: field {label_column!r} must be a string or an integer, got {type(value).__name__} {json.dumps(value)[:60]}"
    )


def _str_list(value: object, name: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: field {name!r} must be a list of strings")
    return value


def _check_bio(tags: list[str], where: str) -> None:
    for i, tag in enumerate(tags):
        if tag != "O" and not ((tag.startswith("B-") or tag.startswith("I-")) and len(tag) > 2):
            raise DataError(f"{where}: slot tag {tag!r} (token {i + 1}) is not a BIO tag ('O', 'B-<type>' or 'I-<type>')")


def read_jsonl(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    with_slots: bool | None = None,
    extra_columns: tuple[str, ...] = (),
) -> JsonlSplit:
    """Stream and validate one JSONL file.

    Parameters
    ----------
    path : str or Path
        The file.
    text_column, label_column : str
        Field names of the utterance and its label.
    with_slots : bool or None
        Whether records must carry ``tokens``/``slots``. ``None``: the first record decides,
        and every later record must agree with it.
    extra_columns : tuple of str
        Optional fields to keep (e.g. ``("device",)``): when the first record has one, every
        record must have it, as a string or an integer; absent from the first, it is ignored.

    Returns
    -------
    JsonlSplit

    Raises
    ------
    DataError
        The file is missing or unreadable; a line is not valid UTF-8 or JSON, or not an
        object; the text field is missing, not a string or empty; the label field is missing
        or not a string/integer; tokens/slots are missing (when the data set has them), not
        lists of strings, of different lengths, or not BIO tags; the file has no records.
        Each message names the file and the 1-based line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found" + ("" if path.parent.is_dir() else f" (no directory {path.parent})"))
    out = JsonlSplit(path=path)
    first_slot_line: int | None = None
    first_line: int | None = None
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not valid UTF-8: {exc.reason} at byte {exc.start}") from exc
            if lineno == 1 and line.startswith("\ufeff"):  # tolerate a byte-order mark
                line = line[1:]
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                near = line[max(exc.pos - 15, 0) : exc.pos + 15].rstrip("\r\n")
                raise DataError(f"{where}: not valid JSON: {exc.msg} (column {exc.colno}, at character {exc.pos + 1} "
                                f"of the line, near {near!r})") from exc
            if not isinstance(rec, dict):
                raise DataError(f"{where}: record must be a JSON object, got {type(rec).__name__}")

            if text_column not in rec:
                raise DataError(f"{where}: missing field {text_column!r}")
            text = rec[text_column]
            if not isinstance(text, str):
                raise DataError(f"{where}: field {text_column!r} must be a string, got {type(text).__name__}")
            if not text.strip():
                raise DataError(f"{where}: field {text_column!r} is empty")
            if label_column not in rec:
                raise DataError(f"{where}: missing field {label_column!r}")
            label = _label_to_str(rec[label_column], where, label_column)

            has = (TOKENS in rec, SLOTS in rec)
            if with_slots is None:
                with_slots = any(has)
                first_slot_line = lineno if with_slots else None
            if with_slots:
                for name, present in zip((TOKENS, SLOTS), has):
                    if not present:
                        ref = f" ({path.name}:{first_slot_line} has it)" if first_slot_line else ""
                        raise DataError(f"{where}: missing field {name!r}; the data set has slot annotations{ref}")
                toks = _str_list(rec[TOKENS], TOKENS, where)
                tags = _str_list(rec[SLOTS], SLOTS, where)
                if len(toks) != len(tags):
                    raise DataError(f"{where}: {len(toks)} tokens but {len(tags)} slot tags")
                if not toks:
                    raise DataError(f"{where}: field {TOKENS!r} is empty")
                _check_bio(tags, where)
                if out.tokens is None:
                    out.tokens, out.slots = [], []
                out.tokens.append(toks)
                out.slots.append(tags)
            out.texts.append(text)
            out.labels.append(label)
            out.lines.append(lineno)
            if first_line is None:
                first_line = lineno
                for col in extra_columns:
                    if col in rec:
                        out.extra[col] = []
            for col, values in out.extra.items():
                if col not in rec:
                    raise DataError(f"{where}: missing field {col!r} ({path.name}:{first_line} has it)")
                v = rec[col]
                if isinstance(v, bool) or not isinstance(v, (str, int)):
                    raise DataError(f"{where}: field {col!r} must be a string or an integer, got {json.dumps(v)[:60]}")
                values.append(v)
    if not out.texts:
        raise DataError(f"{path}: no records (the file is empty or has only blank lines)")
    if with_slots and out.tokens is None:  # pragma: no cover - with_slots forced but no records
        out.tokens, out.slots = [], []
    return out


def read_labels_json(path: str | Path) -> list[str]:
    """Read ``labels.json``: a JSON list of distinct label names (strings or integers).

    Raises
    ------
    DataError
        Not valid JSON, not a non-empty list, an entry that is not a string/integer, or a
        duplicate name; the message names the file.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: must be a non-empty JSON list of label names")
    names = [_label_to_str(v, str(path), "labels") for v in data]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(f"{path}: label {name!r} is listed twice")
        seen.add(name)
    return names


def sorted_labels(labels: set[str]) -> list[str]:
    """Default label order: numeric when every label is an integer string, else lexicographic."""
    if all(lab.lstrip("-").isdigit() for lab in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def slot_vocabulary(*tag_lists: list[list[str]] | None) -> list[str]:
    """BIO tag vocabulary: ``"O"`` first, then the other tags sorted (each type's B- before I-)."""
    tags: set[str] = set()
    for lists in tag_lists:
        for tl in lists or ():
            tags.update(tl)
    tags.discard("O")
    return ["O"] + sorted(tags, key=lambda t: (t[2:], t[:2]))


def read_jsonl_dir(
    data_dir: str | Path, *, text_column: str = "text", label_column: str = "label",
    extra_columns: tuple[str, ...] = (),
) -> tuple[JsonlSplit, JsonlSplit, list[str], list[str] | None]:
    """Read and cross-check ``train.jsonl``, ``test.jsonl`` and the optional ``labels.json``.

    Returns
    -------
    train, test : JsonlSplit
    label_names : list of str
        id -> name (labels.json order, else sorted train labels).
    slot_names : list of str or None
        BIO vocabulary over train and test (``"O"`` first), or None without slots.

    Raises
    ------
    DataError
        The directory or either file is missing (the message names the path); any error of
        :func:`read_jsonl` or :func:`read_labels_json`; a train label missing from
        labels.json; a test label that is not a known label (names the label and the first
        test line with it); slots in one file but not the other.
    """
    data_dir = Path(data_dir)
    if data_dir.is_file():
        raise DataError(f"--data-dir {data_dir}: is a file; give the directory that holds train.jsonl and test.jsonl"
                        + (f" (here: {data_dir.parent})" if data_dir.name in ("train.jsonl", "test.jsonl") else ""))
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data directory not found (it must hold train.jsonl and test.jsonl)")
    for name in ("train.jsonl", "test.jsonl"):
        if not (data_dir / name).is_file():
            raise DataError(f"{data_dir / name}: file not found (--data-dir needs train.jsonl and test.jsonl)")
    kw = dict(text_column=text_column, label_column=label_column)
    train = read_jsonl(data_dir / "train.jsonl", extra_columns=extra_columns, **kw)
    test = read_jsonl(data_dir / "test.jsonl", with_slots=train.tokens is not None, **kw)

    labels_path = data_dir / "labels.json"
    if labels_path.is_file():
        label_names = read_labels_json(labels_path)
        known = set(label_names)
        for lab, line in zip(train.labels, train.lines):
            if lab not in known:
                raise DataError(f"{train.path}:{line}: label {lab!r} is not listed in {labels_path}")
    else:
        label_names = sorted_labels(set(train.labels))
        known = set(label_names)
    for lab, line in zip(test.labels, test.lines):
        if lab not in known:
            raise DataError(
                f"{test.path}:{line}: label {lab!r} does not occur in {train.path.name}"
                + (" or labels.json" if labels_path.is_file() else "")
                + " (the first test record with this label)"
            )
    slot_names = slot_vocabulary(train.slots, test.slots) if train.tokens is not None else None
    return train, test, label_names, slot_names
