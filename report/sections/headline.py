"""The "Summary" section: the headline guarantee per unit (or that there is none), then the run's warnings.

Its bullets gather one sentence from several sections (epsilon, trust model, holdout, budgets,
utility); it is computed last, so it holds every warning the other sections added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from report.blocks import TIER_WORDS, Block, fmt
from report.context import Context
from report.sections.base import Doc, Section


@dataclass(frozen=True)
class Headline:
    """What the reader is warned about (in the order found), and how many metrics lines were unreadable."""

    warnings: tuple[str, ...]
    metrics_lines_skipped: int

    def to_json(self) -> dict[str, Any]:
        """``{"warnings": [str], "metrics_lines_skipped": int}``."""
        return {"warnings": list(self.warnings), "metrics_lines_skipped": self.metrics_lines_skipped}


def compute(ctx: Context) -> Headline:
    """The warnings of every section (computed after them all)."""
    return Headline(warnings=tuple(ctx.warnings), metrics_lines_skipped=ctx.data.metrics_skipped)


def render(h: Headline, doc: Doc) -> list[Block]:
    """The headline: a non-private run gets one paragraph saying so; a ``--reproducible-noise`` run is
    told that its epsilons do not hold before they are listed (see :func:`headline_items`)."""
    facts = doc.facts
    out: list[Block] = [("h", 2, "Summary")]
    if not facts.any_dp:
        out.append(("p", "THIS RUN IS NOT PRIVATE (dp = false, device_dp = false). No noise was added and no "
                         "differential privacy guarantee holds: epsilon = infinity for every example and every "
                         "device. The accuracy below is what training without privacy achieves."))
    else:
        if facts.reproducible:
            out.append(("p", "THIS RUN IS NOT PRIVATE (--reproducible-noise): its noise and its secret sampling "
                             "decisions were derived from the seed recorded in config.toml, so anyone holding the "
                             "run directory can regenerate them and subtract the noise. The epsilons below are what "
                             "the accounting gives for secret noise; they do NOT hold for this run."))
        out.append(("ul", headline_items(doc)))
    for w in h.warnings:
        out.append(("p", f"Note: {w}"))
    return out


def headline_items(doc: Doc) -> list[str]:
    """The bullet list of a private run: epsilon per unit, trust model, accountant, budgets, utility.

    Without example-level noise the example level is the bound implied by device level (2 x its
    epsilon, by group privacy); without device-level DP the device level is said to be unprotected.
    """
    facts, eps = doc.facts, doc.get("epsilon")
    delta, acc = facts.delta, facts.accountant
    ex, dv = eps.example, eps.device
    items = []
    if facts.dp_on:
        items.append(
            f"Example level (one utterance): epsilon = {fmt(ex.max)} at delta = {fmt(delta)} "
            f"(maximum over devices; median {fmt(ex.median)}). Strength: {TIER_WORDS[ex.tier]}.")
    elif dv:
        items.append(
            "Example level (one utterance): no example-level noise (dp = false), but the device-level guarantee "
            "implies one, because one example is part of one device's data: example-level epsilon <= 2 x "
            f"device-level epsilon = {fmt(ex.max)} at delta = (1 + e^epsilon_device) delta = "
            f"{fmt(ex.delta)} (group privacy over removing the device and adding it back with the "
            f"changed example; see Privacy units and adjacency). Strength: {TIER_WORDS[ex.tier]}.")
    if dv:
        items.append(
            f"Device level (all of one device's data): epsilon = {fmt(dv.max)} at delta = {fmt(delta)} "
            f"(maximum over devices; median {fmt(dv.median)}). Strength: {TIER_WORDS[dv.tier]}.")
    else:
        items.append("Device level: NOT protected. Device-level DP was off, so there is no guarantee "
                     "for a device's data as a whole (epsilon = infinity at device level); the server "
                     + ("sees each device's clipped gradient sum, which carries no noise of its own."
                        if facts.aggregate else
                        "sees only masked vectors and their masked sum, but the noise is sized for one example, "
                        "not for a device's whole data." if facts.secure else "sees each device's individual update."))
    trust = doc.get("setting").trust_model
    names = [f"{u} level: {t.name}" for u, t in (("example", trust.example), ("device", trust.device)) if t]
    if names:
        items.append("Trust model: " + "; ".join(names) + ".")
    if facts.integer_rdp:
        items.append(f"Accountant: RDP at integer orders, whichever accountant the run names (here {acc!r}): the "
                     "Skellam mechanism's Renyi DP bound holds at integer orders (Agarwal, Kairouz & Liu 2021, "
                     "Theorem 3.5), an upper bound; adjacency: add or remove one example, with the example counts the "
                     "server uses treated as public (see Privacy units and adjacency); sampling: none at example "
                     "level (p = 1: every example of a selected device is in its round's sum).")
    else:
        items.append(f"Accountant: {acc.upper()} ({'privacy loss distributions, tight' if acc == 'pld' else 'Renyi DP, an upper bound'}); "
                     "adjacency: add or remove one unit, with the example counts the server uses treated as public "
                     "(see Privacy units and adjacency); sampling: Poisson"
                     + (f", cyclic (device groups take turns, --bands {bands})" + (
                         ", with the server's noise correlated across rounds (banded matrix factorization)."
                         if (doc.get("setting").config.get("bands_noise") or "correlated") == "correlated" else ".")
                        if (bands := int(doc.get("setting").config.get("bands") or 1)) > 1 else "."))
    holdout = doc.get("holdout")
    if holdout is not None and holdout.epsilon is not None and holdout.noise_at != "none":
        items.append(f"Holdout examples (--holdout-per-device; never trained on): epsilon = {fmt(holdout.epsilon)} at "
                     f"delta = {fmt(delta)} from the noised counts of the holdout evaluation (see Who the model serves).")
    items.append(doc.get("budgets").headline())
    items.append(doc.get("utility").headline())
    return items


SECTION = Section("summary", Headline, compute, render, keys=("warnings", "metrics_lines_skipped"),
                  compute_last=True)
