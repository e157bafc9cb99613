"""The "Privacy units and adjacency" subsection: what one example and one device are, who their
neighbours are, and what the example-level guarantee means with public example counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from report.blocks import Block, fmt
from report.context import Context, Facts
from report.sections.base import Doc, Section


@dataclass(frozen=True)
class Units:
    """The run's privacy units (from its facts) and whether the selection constant c was calibrated
    once from the example counts (``c_calibrated``: no ``--selection-constant`` and a calibration on record);
    ``bands``: b of correlated noise across rounds (1: independent noise)."""

    facts: Facts
    c_calibrated: bool
    adaptive_clip: bool = False
    bands: int = 1
    correlated: bool = True
    secure_min_l2: float | None = None  # --noise-at secure: the Delta_2 its events are computed at

    def to_json(self) -> dict[str, Any]:
        """Nothing of its own in summary.json."""
        return {}


def compute(ctx: Context) -> Units:
    """The units of the run."""
    return Units(facts=ctx.facts,
                 c_calibrated=ctx.cfg.get("selection_constant") is None and bool(ctx.run.get("calibration_note")),
                 adaptive_clip=ctx.cfg.get("adaptive_clip_quantile") is not None,
                 bands=int(ctx.cfg.get("bands") or 1),
                 correlated=(ctx.cfg.get("bands_noise") or "correlated") == "correlated",
                 secure_min_l2=_secure_min_l2() if ctx.facts.secure else None)


def _secure_min_l2() -> float:
    """The Delta_2 a secure run's events are computed at (mechanisms/secure.py ``MIN_SCALED_CLIP``)."""
    from mechanisms.secure import MIN_SCALED_CLIP

    return float(MIN_SCALED_CLIP)


def render(u: Units, doc: Doc) -> list[Block]:
    """The two units and their adjacency; a private run adds the paragraph on public example counts
    (:func:`_counts_paragraph`), a non-private run shows the units for reference only."""
    run = u.facts
    out: list[Block] = [("h", 3, "Privacy units and adjacency")]
    if not run.any_dp:
        out.append(("p", "For reference only: the units a private run would protect. This run protects neither."))
    ex_unit = ("Example level: the unit is one example (one utterance). Two datasets are neighbours if one is the "
               "other with one example added or removed. An example lives on one device, so the run's example-level "
               "epsilon is the maximum over devices of each device's own composition.")
    if run.aggregate:
        ex_unit += (" With noise on the aggregate, each round a device joined is one Poisson-subsampled Gaussian "
                    "(rate p, noise multiplier sigma) for each of its examples: one example changes the cohort's "
                    "clipped sum by at most C"
                    + (" and the cohort's centred count of unclipped examples by at most 1/2 (adaptive clipping): with "
                       "noise sigma_g C on the sum and sigma_b on the count, the pair is one Gaussian mechanism of "
                       "noise multiplier sigma, (sigma_g^-2 + (2 sigma_b)^-2)^-1/2 (Andrew et al. 2021, Theorem 1)"
                       if u.adaptive_clip and not run.device_dp else "")
                    + (". With correlated noise across rounds (banded matrix factorization, b = "
                       f"{u.bands} bands) each round's noise is a row of C^-1 z; every column of the strategy C has "
                       "norm at most 1 and spans b rounds, and cyclic selection keeps a device's rounds at least b "
                       "apart, so each round joined is still one such Gaussian and they compose over the at most "
                       "ceil(T / b) rounds a device can join (Choquette-Choo et al. 2023, Theorem 4)"
                       if u.bands > 1 and u.correlated else
                       f". Cyclic selection (b = {u.bands} groups) lets a device join at most ceil(T / b) rounds, "
                       "which are composed" if u.bands > 1 else "")
                    + ". No amplification by device selection is claimed at example level: an "
                    "example's inclusion is correlated with its device's other examples, whose contribution can "
                    "reveal that the device took part, so the rate is p, not q_k * p.")
    elif run.secure:
        ex_unit += (" With noise shares summed under secure aggregation, each round a device joined is one Skellam "
                    "mechanism for each of its examples (Agarwal, Kairouz & Liu 2021): one example changes the "
                    "cohort's integer sum by at most Delta_2 in L2 norm and Delta_2^2 in L1 norm (the conditional "
                    "rounding bounds each rounded example exactly), and a sum of at least n_min devices carries "
                    "Skellam noise of variance at least mu = (sigma Delta_2)^2 per coordinate. The events are "
                    f"computed at Delta_2 = {fmt(u.secure_min_l2)} integer units, the smallest a round may use (a "
                    "round's Delta_2 is at least its scaled clip gamma C, which is at least that), where the bound is "
                    "largest. Every example of a selected device is in its round's sum (p = 1): no amplification by "
                    "example sampling is claimed, and none by device selection either, since an example's inclusion "
                    "is correlated with its device's other examples, whose contribution can reveal that the device "
                    "took part. The reduction mod 2^b and the decoding are post-processing.")
    elif run.dp_on and u.adaptive_clip and not run.device_dp:
        ex_unit += (" With adaptive clipping on the device, one example changes a local step's clipped sum by at most "
                    "C and the step's centred count of unclipped examples by at most 1/2: with noise sigma_g C on the "
                    "sum and sigma_b on the count, each step is one Gaussian mechanism of noise multiplier sigma, "
                    "(sigma_g^-2 + (2 sigma_b)^-2)^-1/2 (Andrew et al. 2021, Theorem 1).")
    dev_unit = ("Device level: the unit is one device with all of its data (add or remove one device). With Poisson "
                "selection each device's guarantee depends on its own inclusion probability q_k, so each device is "
                "accounted individually."
                + ((f" With correlated noise across rounds (banded matrix factorization, b = {u.bands} bands) and "
                    if u.correlated else " With ")
                   + "cyclic selection a device is accounted one Poisson-subsampled Gaussian for each of the at most "
                   "ceil(T / b) rounds its group may be selected, at least b apart (Choquette-Choo et al. 2023, "
                   "Theorem 4)." if u.bands > 1 and run.device_dp else "")
                + (" With adaptive clipping one device also changes the centred count of unclipped updates by at "
                   "most 1/2: with noise sigma_g S on the sum and sigma_b on the count, the pair is one Gaussian "
                   "mechanism of noise multiplier sigma_u, (sigma_g^-2 + (2 sigma_b)^-2)^-1/2 (Andrew et al. 2021, "
                   "Theorem 1)." if u.adaptive_clip and run.device_dp else ""))
    if run.device_dp and not run.dp_on:
        dev_unit += (" It also bounds the example level: changing one example of device k is at most removing the "
                     "device and adding it back with the changed data (same public count, same q_k), so group "
                     "privacy gives (2 epsilon_k, (1 + e^epsilon_k) delta) per example. The factor 2 is needed: one "
                     "changed example can move a device's clipped update by up to 2 S.")
    out.append(("ul", [ex_unit, dev_unit]))
    if run.any_dp:
        out.append(("p", _counts_paragraph(u)))
    return out


def _counts_paragraph(u: Units) -> str:
    """What the example-level guarantee means given that the server knows every device's example count."""
    run = u.facts
    placement = run.noise_at
    uses = []
    if run.dp_on and placement == "device":
        uses.append("the local sampling rate q = B / n_k and the number of local steps")
    if run.dp_on and placement == "aggregate":
        uses.append("the denominator of the noisy sum (the expected number of sampled examples, the sum of "
                    "p n_k over the cohort)")
    if run.dp_on and placement == "secure":
        uses.append("the denominator of the decoded sum (the number of examples the cohort holds, the sum of n_k "
                    "over the cohort, p = 1)")
        uses.append("the quantisation scale gamma (from the same sum)")
    uses.append("the selection probabilities q_k (from activity)")
    if not run.device_dp and placement not in ("aggregate", "secure"):
        uses.append("the FedAvg weights")
    if u.c_calibrated:
        uses.append("the one calibration of the selection constant c")
    return (
        "Example counts are public. The server knows each device's exact example count n_k and uses it for "
        + (", ".join(uses[:-1]) + " and " + uses[-1] if len(uses) > 1 else uses[0]) + ". The accounting treats these counts as public metadata fixed in advance: the "
        "example-level guarantee is for adding or removing one example while the counts the server uses are held "
        "fixed. The counts themselves are not protected: the released models depend on them through these uses, "
        "so they can reveal them (for instance whether a device's count changed). "
        "The guarantee therefore protects an example's content and presence only relative to those public counts: "
        "it hides which examples a device holds and what they say, given how many it holds, not how many. "
        "Equivalently, for two datasets with the same counts that differ in one example (replace-one adjacency: "
        "remove one example and add another), group privacy over the two add/remove steps gives "
        "(2 epsilon, (1 + e^epsilon) delta) from the add/remove (epsilon, delta) stated in this report."
        + (" (In this run the example-level bound is itself derived from device level by removing the device "
           "and adding it back with the changed data, so it already covers replacing one example.)"
           if run.device_dp and not run.dp_on else "")
    )


SECTION = Section("units", Units, compute, render)
