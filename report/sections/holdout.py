"""The "Who the model serves" section: the holdout accuracy of the final model by activity quartile
(``--holdout-per-device``), beside the training examples' epsilon by the same quartiles."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dp.accounting import SubsampledGaussianEvent, compute_epsilon
from report.blocks import Block, fmt
from report.context import Context
from report.events import by_activity_quartile
from report.sections.base import Doc, Section


@dataclass(frozen=True)
class HoldoutQuartile:
    """One activity quartile of holdout.json (its ``record``: quartile, activity range, devices,
    devices evaluated, holdout examples, noisy accuracy and its noise std), with the example-level
    epsilon of the quartile's training examples (``epsilon_median`` / ``epsilon_max``; None when
    example level is not accounted)."""

    quartile: int
    activity_min: int
    activity_max: int
    devices: int
    devices_evaluated: int
    examples: int
    accuracy: float | None
    noise_std_accuracy: float | None
    epsilon_median: float | None
    epsilon_max: float | None
    record: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """holdout.json's quartile object with ``epsilon_median`` and ``epsilon_max``."""
        return {**self.record, "epsilon_median": self.epsilon_median, "epsilon_max": self.epsilon_max}


@dataclass(frozen=True)
class Holdout:
    """The holdout evaluation: the ``fraction`` of examples held out, the ``round`` after which it ran,
    where its counts were noised (``noise_at``: device, aggregate, or none for a non-private run) and
    with what ``noise_multiplier``, how many evaluations are on record (``releases``), the holdout
    examples' ``epsilon`` (nats, at delta; inf when not noised; None without delta or record), the
    devices asked and replied, the quartiles, ``incomplete`` (on record in the ledger, but the run
    stopped before holdout.json was written: no quartiles) and the ``task``. ``noise_multiplier`` is
    the std of the noise on each released number (sigma_h). With out-of-scope calibration the
    release also carried a noised histogram of the in-scope holdout examples' confidences over
    ``histogram_bins`` bins (None without one; holdout.json's ``oos_histogram``), and
    ``noise_multiplier_release`` is the release's noise multiplier over its L2 sensitivity (sigma_h /
    sqrt(2) with the histogram, sigma_h without; None when holdout.json does not record it)."""

    fraction: float | None
    round: int | None
    noise_at: str | None
    noise_multiplier: float | None
    releases: int
    epsilon: float | None
    devices_asked: int | None
    devices_replied: int | None
    quartiles: tuple[HoldoutQuartile, ...]
    incomplete: bool
    task: str
    histogram_bins: int | None = None
    noise_multiplier_release: float | None = None

    def to_json(self) -> dict[str, Any]:
        """``{"holdout": {the fields above}}``."""
        return {"holdout": {
            "fraction": self.fraction, "round": self.round, "noise_at": self.noise_at,
            "noise_multiplier": self.noise_multiplier, "releases": self.releases, "epsilon": self.epsilon,
            "devices_asked": self.devices_asked, "devices_replied": self.devices_replied,
            "quartiles": [q.to_json() for q in self.quartiles], "incomplete": self.incomplete, "task": self.task}}


def releases_epsilon(rows: list[dict[str, Any]], delta: float | None, accountant: str) -> float | None:
    """Epsilon (nats, at ``delta``) of a holdout example read by every release of the ledger's
    ``holdout_releases`` ``rows``, each one Gaussian mechanism of its recorded noise multiplier (std
    over the release's L2 sensitivity: sigma_h, or sigma_h / sqrt(2) when the release also carried
    the out-of-scope confidence histogram); inf when one was not noised; None without rows or delta."""
    if not rows or delta is None:
        return None
    if not all(float(r["noise_multiplier"]) > 0 for r in rows):
        return math.inf
    events = [SubsampledGaussianEvent(float(r["noise_multiplier"]), 1.0, 1) for r in rows]
    return compute_epsilon(events, delta, accountant)


def compute(ctx: Context) -> Holdout | None:
    """The holdout evaluation read from holdout.json, its epsilon recomputed from the ledger's
    ``holdout_releases`` rows (every holdout example was read by each, one Gaussian mechanism of the
    release's noise multiplier, :func:`releases_epsilon`); None without a holdout."""
    data, delta = ctx.data, ctx.facts.delta
    hold, rows = data.holdout, data.holdout_releases
    if not hold and not rows:
        return None
    if not hold:  # recorded (the counts left the devices) but stopped before holdout.json was written
        last = rows[-1]
        hold = {"round": last["round"], "noise_at": last["noise_at"], "noise_multiplier": last["noise_multiplier"],
                "devices_asked": last["devices"], "devices_replied": None, "quartiles": [], "incomplete": True}
    eps = releases_epsilon(rows, delta, ctx.facts.accountant)
    hist = hold.get("oos_histogram")
    train = ({q.quartile: q for q in by_activity_quartile(data, "example", ctx.epsilons["example"])}
             if ctx.accounted("example") else {})
    quartiles = tuple(
        HoldoutQuartile(quartile=q["quartile"], activity_min=q["activity_min"], activity_max=q["activity_max"],
                        devices=q["devices"], devices_evaluated=q["devices_evaluated"], examples=q["examples"],
                        accuracy=q.get("accuracy"), noise_std_accuracy=q.get("noise_std_accuracy"),
                        epsilon_median=train[q["quartile"]].epsilon_median if q["quartile"] in train else None,
                        epsilon_max=train[q["quartile"]].epsilon_max if q["quartile"] in train else None,
                        record=dict(q))
        for q in hold.get("quartiles", []))
    return Holdout(fraction=hold.get("fraction"), round=hold.get("round"), noise_at=hold.get("noise_at"),
                   noise_multiplier=hold.get("noise_multiplier"), releases=len(rows), epsilon=eps,
                   devices_asked=hold.get("devices_asked"), devices_replied=hold.get("devices_replied"),
                   quartiles=quartiles, incomplete=bool(hold.get("incomplete")), task=ctx.cfg.get("task", "intent"),
                   histogram_bins=int(hist["bins"]) if hist else None,
                   noise_multiplier_release=hold.get("noise_multiplier_release"))


def render(h: Holdout, doc: Doc) -> list[Block]:
    """How the holdout was split and evaluated, its guarantee, and the table by quartile (or, for an
    evaluation on record without its result, what is accounted so far)."""
    delta = doc.facts.delta
    if h.incomplete:
        return [("h", 2, "Who the model serves"),
                ("p", f"A holdout evaluation after round {h.round} is on record in the ledger "
                      f"({h.devices_asked} devices asked), but the run stopped before its result was written "
                      "(dpfl simulate --resume evaluates again). Its counts may have left the devices, so they are "
                      f"accounted: each holdout example's epsilon so far is {fmt(h.epsilon)} at delta {fmt(delta)}.")]
    sigma = fmt(h.noise_multiplier)
    if h.histogram_bins:
        hist = (f"a histogram of the max-softmax confidences of its in-scope holdout examples over "
                f"{h.histogram_bins} public bins on [0, 1] (the out-of-scope threshold's input, see "
                "\"Out-of-scope detection\")")
        how = {
            "aggregate": f"Each device sent the server its count of correct predictions and {hist}; the server added "
                         f"Gaussian noise of std {sigma} once to each quartile's sum of counts and once to each bin of "
                         "the devices' summed histogram (central DP, as the run's training noise).",
            "device": f"Each device added Gaussian noise of std {sigma} to its own count of correct predictions and "
                      f"to each bin of {hist} before sending them (as the run's training noise, on the device).",
            "none": "The run is not private: the counts and the confidence histogram are exact and nothing protects "
                    "the holdout examples.",
        }.get(h.noise_at, "")
        release = (f"One holdout example changes one count by at most 1 and one bin of the histogram by at most 1, "
                   "so each release (the counts with the histogram) has L2 sensitivity sqrt(2) and noise multiplier "
                   f"{sigma}/sqrt(2) = {fmt(h.noise_multiplier_release)}")
    else:
        how = {
            "aggregate": f"Each device sent the server its count of correct predictions; the server added Gaussian "
                         f"noise of std {sigma} once to each quartile's sum (central DP, as the run's training noise).",
            "device": f"Each device added Gaussian noise of std {sigma} to its own count of correct predictions before "
                      "sending it (as the run's training noise, on the device).",
            "none": "The run is not private: the counts are exact and nothing protects the holdout examples.",
        }.get(h.noise_at, "")
        release = "One holdout example changes one count by at most 1"
    guarantee = ("" if h.noise_at == "none" or h.epsilon is None else
                 f" {release}, and each holdout example was read by "
                 f"{h.releases} such release(s): its guarantee is epsilon {fmt(h.epsilon)} at delta "
                 f"{fmt(delta)}, separate from the training examples' (holdout examples never train; "
                 "training examples are never evaluated). The number of holdout examples per device is an "
                 "example count, which the adjacency treats as public like the activity; it was not sent.")
    right = "predicts every word tag of correctly" if h.task == "slots" else "classifies correctly"
    out: list[Block] = [("h", 2, "Who the model serves")]
    out.append(("p", f"Each example was kept out of training with probability {fmt(h.fraction)} (--holdout-per-"
                     "device), decided by a keyed hash of its id and the run seed, so the split is the same in every "
                     "process and one example's membership depends on no other example. After round "
                     f"{h.round} each device asked (those in an activity quartile that hold holdout examples "
                     "and were not deleted) counted the holdout examples the final released model "
                     f"{right}: {h.devices_replied} of {h.devices_asked} replied. {how}{guarantee}"))
    rows = []
    for q in h.quartiles:
        acc = "n/a" if q.accuracy is None else f"{fmt(q.accuracy)} ± {fmt(q.noise_std_accuracy)}"
        rows.append([f"Q{q.quartile}", f"{q.activity_min}-{q.activity_max}", str(q.devices),
                     str(q.devices_evaluated), str(q.examples), acc, fmt(q.epsilon_median), fmt(q.epsilon_max)])
    out.append(("table", ["quartile", "activity", "devices", "evaluated", "holdout examples",
                          "accuracy (± noise std)", "median epsilon (training)", "max epsilon (training)"], rows))
    out.append(("p", "Quartiles as in the epsilon section: devices holding data sorted by starting activity, Q1 the "
                     "lightest. Accuracy is the noisy count over the quartile's holdout examples, clipped to [0, 1]; "
                     "the ± gives the noise's standard deviation on it. The epsilon columns are the example-level "
                     "epsilon of the quartile's devices' training examples."))
    return out


SECTION = Section("holdout", Holdout, compute, render, keys=("holdout",))
