"""The "Accountant and delta" subsection: the accountant, its sampling assumption, and delta against 1/N."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from report.blocks import Block, fmt
from report.context import Context, Facts
from report.sections.base import Doc, Section


@dataclass(frozen=True)
class Accountant:
    """The accountant every epsilon was recomputed with and the delta they are stated at, beside the
    population: ``num_devices``, ``num_examples`` (sum of starting activities; None without a
    ledger), and 1/N of each (None when N is unknown or 0)."""

    facts: Facts
    num_devices: int | None
    num_examples: int | None
    one_over_examples: float | None
    one_over_devices: float | None
    bands: int = 1  # b of cyclic selection (--bands; 1: every device may join every round)

    def to_json(self) -> dict[str, Any]:
        """``delta``, ``accountant``, ``num_devices``, ``num_examples`` and (with a delta) ``delta_vs_units``.

        ``accountant`` is the one every epsilon was composed with: ``"rdp"`` for a secure run (integer orders,
        :attr:`report.context.Facts.integer_rdp`) whatever config.toml names."""
        out: dict[str, Any] = {"delta": self.facts.delta,
                               "accountant": "rdp" if self.facts.integer_rdp else self.facts.accountant,
                               "num_devices": self.num_devices, "num_examples": self.num_examples}
        if self.facts.delta is not None:
            out["delta_vs_units"] = {"one_over_examples": self.one_over_examples,
                                     "one_over_devices": self.one_over_devices}
        return out


def compute(ctx: Context) -> Accountant:
    """The accountant, delta and the population sizes."""
    n_ex, n_dev = ctx.num_examples, ctx.num_devices
    return Accountant(facts=ctx.facts, num_devices=n_dev, num_examples=n_ex,
                      one_over_examples=(1.0 / n_ex) if n_ex else None,
                      one_over_devices=(1.0 / n_dev) if n_dev else None, bands=int(ctx.cfg.get("bands") or 1))


def render(a: Accountant, doc: Doc) -> list[Block]:
    """The accountant and delta of a private run (nothing without DP); delta is set beside 1/N for
    examples and for devices, with a warning when it is not far below."""
    run = a.facts
    if not run.any_dp:
        return []
    acc, delta = run.accountant, run.delta
    where = []
    if run.dp_on:
        where.append("example level: " + ("each example's inclusion in its device's clipped sum, rate p"
                                          if run.aggregate else "local batches"))
    if run.device_dp:
        where.append("device level: cohort selection")
    if run.integer_rdp:
        dl = [_integer_rdp_line(acc)]
    else:
        dl = [
            f"Accountant: {acc} ({'dp-accounting privacy loss distributions with pessimistic discretisation: an upper bound on epsilon (Koskela et al. 2020; Google dp-accounting)' if acc == 'pld' else 'dp-accounting Renyi DP (Mironov 2017) converted to (epsilon, delta) following Balle et al. 2020'}). "
            "It assumes Poisson sampling: each unit is included in each step independently with probability q "
            + ("(under cyclic selection, --bands, q is 0 outside the rounds of a device's group, which are not composed) "
               if a.bands > 1 else "")
            + f"({'; '.join(where)}). Every epsilon in this report was recomputed from the ledger's privacy events.",
        ]
    dl.append(f"delta = {fmt(delta)}, the probability with which the epsilon bound may fail. It must be far below "
              "1/N, since a mechanism that publishes one random unit's data outright is (0, 1/N)-DP.")
    if a.one_over_examples and run.dp_on:
        dl.append(f"Example level: N = {a.num_examples} training examples, 1/N = {fmt(a.one_over_examples)}; "
                  f"delta is {fmt(a.one_over_examples / delta, 3)} times smaller."
                  + ("" if delta * 10 <= a.one_over_examples else " WARNING: delta is not far below 1/N."))
    if a.one_over_devices and run.device_dp:
        dl.append(f"Device level: N = {a.num_devices} devices, 1/N = {fmt(a.one_over_devices)}; "
                  f"delta is {fmt(a.one_over_devices / delta, 3)} times smaller."
                  + ("" if delta * 10 <= a.one_over_devices else " WARNING: delta is not far below 1/N."))
    return [("h", 3, "Accountant and delta"), ("ul", dl)]


def _integer_rdp_line(named: str) -> str:
    """The accountant of a secure run (``--noise-at secure``): RDP at integer orders, whatever the run named."""
    from dp.accounting import INTEGER_RDP_ORDERS

    return (
        f"Accountant: Renyi DP at integer orders ({min(INTEGER_RDP_ORDERS)} to {max(INTEGER_RDP_ORDERS)}; "
        "dp-accounting's RDP accountant, Mironov 2017, converted to (epsilon, delta) following Balle et al. 2020): "
        "an upper bound on epsilon. Each round a device joined is, for each of its examples, one Skellam mechanism, "
        "whose Renyi DP bound holds at integer orders (Agarwal, Kairouz & Liu 2021, Theorem 3.5; the ledger records "
        "its first branch as a zCDP event, ZCDpEvent(rho, xi)), so every epsilon is composed at integer orders, "
        f"whichever accountant the run names (here {named!r}). No sampling is assumed at example level: every "
        "example of a selected device is in its round's sum (p = 1), and each device composes one event per round "
        "it joined. The sensitivity bound of the integer sum comes from the conditional randomised rounding "
        "(Kairouz, Liu & Steinke 2021). The wrap-around mod 2^b is post-processing: it can cost accuracy, not "
        "privacy. Every epsilon in this report was recomputed from the ledger's privacy events.")


SECTION = Section("accountant", Accountant, compute, render,
                  keys=("delta", "accountant", "num_devices", "num_examples", "delta_vs_units"))
