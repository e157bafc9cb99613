"""The shape every report section has: a spec naming its ``compute``, its ``render`` and the
summary.json keys it owns, and the view of the computed report its ``render`` reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from report.blocks import Block
from report.context import Context, Facts


@dataclass(frozen=True)
class Doc:
    """What a section's ``render`` may read besides its own object: the run's facts, every
    section's computed object by name (None when that section has nothing to state) and the
    plots drawn (name -> PNG path)."""

    facts: Facts
    sections: Mapping[str, Any]
    images: Mapping[str, Path] = field(default_factory=dict)

    def get(self, name: str) -> Any:
        """The computed object of section ``name`` (None when it states nothing).

        Raises
        ------
        KeyError
            If no section of that name is registered.
        """
        return self.sections[name]


@dataclass(frozen=True)
class Section:
    """One report section.

    ``name`` names it; ``cls`` is the frozen dataclass of what it states; ``compute(ctx)`` returns a
    ``cls`` or None (nothing to state); ``render(obj, doc)`` its blocks (only called with an
    object); ``keys`` the top-level summary.json keys its object's ``to_json()`` may give (a None
    object gives each key as null). ``compute_last``: computed after every other section (it
    reads the warnings they add); sections are otherwise computed in reading order.
    """

    name: str
    cls: type
    compute: Callable[[Context], Any]
    render: Callable[[Any, Doc], list[Block]]
    keys: tuple[str, ...] = ()
    compute_last: bool = False

    def to_json(self, obj: Any) -> dict[str, Any]:
        """The section's contribution to the summary (inf kept as ``math.inf``; see report.build).

        Raises
        ------
        ValueError
            If the object gives a key the section does not declare.
        """
        out = {k: None for k in self.keys} if obj is None else obj.to_json()
        extra = set(out) - set(self.keys)
        if extra:
            raise ValueError(f"section {self.name!r} gives undeclared summary key(s) {sorted(extra)}")
        return out
