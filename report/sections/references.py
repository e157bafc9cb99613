"""The sources of the report's methods, closing the utility section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from report.blocks import Block
from report.context import Context
from report.sections.base import Doc, Section

SOURCES = ("Mironov 2017 (Renyi DP); Koskela, Jalko & Honkela 2020 and Google's dp-accounting "
           "(privacy loss distributions); Balle et al. 2020 (RDP to (epsilon, delta)); Abadi et al. 2016 "
           "(DP-SGD); McMahan et al. 2018 (DP-FedAvg).")


@dataclass(frozen=True)
class References:
    """The works the report's accounting and mechanisms follow (one citation line)."""

    sources: str = SOURCES

    def to_json(self) -> dict[str, Any]:
        """Nothing of its own in summary.json."""
        return {}


#: Added when the run's noise is correlated across rounds (``--bands``).
BANDMF_SOURCES = (" Choquette-Choo et al. 2023 ((amplified) banded matrix factorization) and Google's jax-privacy "
                  "(its strategies and accounting).")


#: Added for noise shares summed under secure aggregation (``--noise-at secure``).
SECURE_SOURCES = (" Bonawitz et al. 2017 (SecAgg); Bell et al. 2020 (SecAgg+); Agarwal, Kairouz & Liu 2021 (the "
                  "Skellam mechanism and its Renyi DP bound); Kairouz, Liu & Steinke 2021 (the distributed discrete "
                  "Gaussian: rotation, scaling and conditional randomised rounding).")


def compute(ctx: Context) -> References:
    """The references (the same for every run, plus banded matrix factorization or secure aggregation where
    the run used them)."""
    banded = int(ctx.cfg.get("bands") or 1) > 1 and (ctx.cfg.get("bands_noise") or "correlated") == "correlated"
    return References(SOURCES + (BANDMF_SOURCES if banded else "") + (SECURE_SOURCES if ctx.facts.secure else ""))


def render(r: References, doc: Doc) -> list[Block]:
    """One paragraph: "Sources: ..."."""
    return [("p", "Sources: " + r.sources)]


SECTION = Section("references", References, compute, render)
