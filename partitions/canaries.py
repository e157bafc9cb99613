"""Audit canaries as data: the inserted utterances, their records and uids (secret-sharer style, for NLU).

This is data generation (it knows utterances, labels and devices, not models): the population
(:mod:`partitions.population`) inserts the records it draws into devices' training data, and
the audit maths that scores a model on them lives in :mod:`audit` (exposure, extraction,
membership; :mod:`audit.canaries` re-exports these names for it).

A canary is a template utterance carrying a random numeric secret, e.g.
``"my pin code is 4 8 1 9"``, paired with a chosen intent label. Secrets are written
as space-separated digits so that every digit is its own token under BERT wordpiece
(checked for the all-MiniLM-L6-v2 tokenizer: "4 8 1 9" -> ['4', '8', '1', '9'],
whereas "4819" -> ['48', '##19']). Each canary is included in training independently
with probability 1/2 (seeded), as the one-run audit (Steinke, Nasr & Jagielski 2023)
requires; the excluded half are the audit's controls.

Record uids
-----------
Inserted records get *negative* uids so they never collide with dataset indices
(which are >= 0):

    uid = -(1 + canary_id * UID_STRIDE + copy),   copy in 0..repeats-1

with ``UID_STRIDE = 1_000_000`` (so repeats must be < 1_000_000). The mapping is
stable (depends only on canary_id and copy) and invertible with :func:`parse_uid`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

__all__ = [
    "DEFAULT_TEMPLATES",
    "UID_STRIDE",
    "Canary",
    "CanaryRecord",
    "space_digits",
    "canary_uid",
    "parse_uid",
    "make_canaries",
]

#: Templates with one ``{secret}`` slot at the end (the prefix is what the attacker knows).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "my pin code is {secret}",
    "call me at {secret}",
    "my card number ends with {secret}",
    "the door code is {secret}",
    "my account number is {secret}",
    "the security code on the back is {secret}",
)

UID_STRIDE = 1_000_000


def space_digits(secret: str) -> str:
    """``"4819" -> "4 8 1 9"``.

    Raises
    ------
    ValueError
        If ``secret`` is empty or contains anything but ASCII digits.
    """
    if not secret or not all(c in "0123456789" for c in secret):
        raise ValueError(f"secret must be a non-empty string of digits, got {secret!r}")
    return " ".join(secret)


def canary_uid(canary_id: int, copy: int) -> int:
    """Stable negative uid of copy ``copy`` of canary ``canary_id`` (see module doc).

    Raises
    ------
    ValueError
        If ``canary_id < 0`` or ``copy`` is outside [0, UID_STRIDE).
    """
    if canary_id < 0 or not 0 <= copy < UID_STRIDE:
        raise ValueError(f"invalid canary_id={canary_id} / copy={copy}")
    return -(1 + canary_id * UID_STRIDE + copy)


def parse_uid(uid: int) -> tuple[int, int] | None:
    """Inverse of :func:`canary_uid`: ``(canary_id, copy)``, or None for uid >= 0."""
    if uid >= 0:
        return None
    k = -uid - 1
    return k // UID_STRIDE, k % UID_STRIDE


@dataclass(frozen=True)
class Canary:
    """One canary.

    Attributes
    ----------
    canary_id : int
        0-based id, unique within a run.
    text : str
        Full utterance, ``prefix + " " + space_digits(secret) + suffix``.
    prefix : str
        Known part before the secret (no trailing space).
    secret : str
        The secret as compact digits, e.g. ``"4819"`` (the text holds it spaced).
    label : hashable
        Intent label as the dataset spells it (str or int).
    included : bool
        Whether the canary's records are inserted into training.
    repeats : int
        Number of copies inserted when included (>= 1).
    suffix : str
        Text after the secret ("" for the default templates; starts with a space
        when non-empty).
    """

    canary_id: int
    text: str
    prefix: str
    secret: str
    label: Hashable
    included: bool
    repeats: int
    suffix: str = ""

    @property
    def n_digits(self) -> int:
        """Number of digits in the secret."""
        return len(self.secret)

    def text_with(self, secret: str) -> str:
        """The canary's utterance with ``secret`` (compact digits) in place of its own."""
        return f"{self.prefix} {space_digits(secret)}{self.suffix}"

    def uids(self) -> list[int]:
        """uids of the inserted copies (empty when not included)."""
        return [canary_uid(self.canary_id, c) for c in range(self.repeats)] if self.included else []

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (for saving a run's canaries)."""
        return {
            "canary_id": self.canary_id, "text": self.text, "prefix": self.prefix,
            "secret": self.secret, "label": self.label, "included": self.included,
            "repeats": self.repeats, "suffix": self.suffix,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Canary":
        """Inverse of :meth:`to_dict`."""
        return cls(int(d["canary_id"]), d["text"], d["prefix"], str(d["secret"]), d["label"],
                   bool(d["included"]), int(d["repeats"]), d.get("suffix", ""))


@dataclass(frozen=True)
class CanaryRecord:
    """One inserted training record (a copy of an included canary).

    Attributes
    ----------
    uid : int
        Negative stable uid, :func:`canary_uid`.
    device_id : hashable
        Device whose training data gets this record.
    canary_id : int
    copy : int
        0..repeats-1.
    text : str
    label : hashable
    """

    uid: int
    device_id: Hashable
    canary_id: int
    copy: int
    text: str
    label: Hashable

    def to_example(self, with_slots: bool = False) -> dict[str, Any]:
        """Dataset row ``{"uid", "text", "label"}`` (+ ``tokens``/``slots`` all "O")."""
        row: dict[str, Any] = {"uid": self.uid, "text": self.text, "label": self.label}
        if with_slots:
            toks = self.text.split()
            row["tokens"], row["slots"] = toks, ["O"] * len(toks)
        return row


def make_canaries(
    n_canaries: int,
    labels: Sequence[Hashable],
    device_ids: Sequence[Hashable],
    *,
    n_digits: int = 4,
    repeats: int = 1,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    inclusion_prob: float = 0.5,
    assignment: str = "random",
    seed: int = 0,
) -> tuple[list[Canary], list[CanaryRecord]]:
    """Generate canaries and the training records to insert.

    For canary i (seeded ``random.Random(seed)``, drawn in this order): template =
    ``templates[i % len(templates)]``; secret uniform over the 10**n_digits codes,
    distinct among canaries sharing a template; label uniform over ``labels``;
    included ~ Bernoulli(inclusion_prob). All ``repeats`` copies of an included
    canary go to ONE device (so that device-level and example-level audits both see
    a well-defined unit): ``device_ids[j % len(device_ids)]`` for the j-th included
    canary with ``assignment="round_robin"``, or a seeded uniform draw with
    ``assignment="random"``.

    Parameters
    ----------
    n_canaries : int
        Number of canaries m (included and excluded), >= 0.
    labels : sequence of hashable
        Candidate intent labels (as the dataset spells them), non-empty.
    device_ids : sequence of hashable
        Devices that may receive canaries, non-empty.
    n_digits : int, default 4
        Digits per secret (>= 1); 4 gives 10**4 candidates for exposure.
    repeats : int, default 1
        Copies inserted per included canary, 1 <= repeats < UID_STRIDE.
    templates : sequence of str
        Each contains exactly one ``{secret}``; text before it is the prefix.
    inclusion_prob : float, default 0.5
        Probability each canary is included; the one-run audit needs 0.5.
    assignment : {"random", "round_robin"}
    seed : int

    Returns
    -------
    canaries : list of Canary, length n_canaries
    records : list of CanaryRecord
        ``repeats`` records per included canary, ordered by (canary_id, copy).

    Raises
    ------
    ValueError
        On empty labels/devices, bad template, n_digits < 1, repeats out of range,
        inclusion_prob outside [0, 1], unknown assignment, or more canaries per
        template than distinct secrets.
    """
    if n_canaries < 0:
        raise ValueError("n_canaries must be >= 0")
    if not labels:
        raise ValueError("labels must be non-empty")
    if not device_ids:
        raise ValueError("device_ids must be non-empty")
    if n_digits < 1:
        raise ValueError("n_digits must be >= 1")
    if not 1 <= repeats < UID_STRIDE:
        raise ValueError(f"repeats must be in [1, {UID_STRIDE}), got {repeats}")
    if not 0.0 <= inclusion_prob <= 1.0:
        raise ValueError("inclusion_prob must be in [0, 1]")
    if assignment not in ("random", "round_robin"):
        raise ValueError(f"assignment must be 'random' or 'round_robin', got {assignment!r}")
    parsed = []
    for t in templates:
        if t.count("{secret}") != 1:
            raise ValueError(f"template must contain exactly one {{secret}}: {t!r}")
        pre, suf = t.split("{secret}")
        pre = pre.rstrip()
        if not pre:
            raise ValueError(f"template needs a non-empty prefix: {t!r}")
        if suf and not suf.startswith(" "):
            suf = " " + suf
        parsed.append((pre, suf.rstrip()))
    if not parsed:
        raise ValueError("templates must be non-empty")
    per_template = -(-n_canaries // len(parsed)) if n_canaries else 0
    if per_template > 10**n_digits:
        raise ValueError("more canaries per template than distinct secrets")

    rng = random.Random(seed)
    used: list[set[str]] = [set() for _ in parsed]
    canaries: list[Canary] = []
    records: list[CanaryRecord] = []
    n_included = 0
    for i in range(n_canaries):
        ti = i % len(parsed)
        pre, suf = parsed[ti]
        while True:
            secret = "".join(rng.choice("0123456789") for _ in range(n_digits))
            if secret not in used[ti]:
                used[ti].add(secret)
                break
        label = labels[rng.randrange(len(labels))]
        included = rng.random() < inclusion_prob
        c = Canary(i, f"{pre} {space_digits(secret)}{suf}", pre, secret, label, included, repeats, suf)
        canaries.append(c)
        if included:
            if assignment == "round_robin":
                dev = device_ids[n_included % len(device_ids)]
            else:
                dev = device_ids[rng.randrange(len(device_ids))]
            n_included += 1
            for copy in range(repeats):
                records.append(CanaryRecord(canary_uid(i, copy), dev, i, copy, c.text, label))
    return canaries, records
