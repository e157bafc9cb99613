"""Render the privacy budget report as Markdown and as self-contained HTML.

The text is built once as a list of blocks and written in both formats, so the two say
the same thing. The HTML has inline CSS and the plots embedded as base64 PNG: it opens
in a browser with no other file and no network.
"""

from __future__ import annotations

import base64
import html as _html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Block = tuple  # ("h", level, text) | ("p", text) | ("ul", [text]) | ("table", header, rows) | ("img", name, caption)

TIER_WORDS = {
    "strong": "strong (epsilon <= 1)",
    "reasonable": "reasonable (1 < epsilon <= 10)",
    "weak": "weak (epsilon > 10)",
    "none": "no guarantee",
}
#: Device-level DP's trust model, in words (the same as report.build.DEVICE_TRUST_MODEL's name).
DEVICE_TRUST = "central DP: DP-FedAvg on the server (trusts the aggregator)"


def fmt(x: Any, digits: int = 4) -> str:
    """Human number: inf as the infinity sign, None as n/a."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if math.isinf(x):
            return "∞ (infinity)"
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
            return f"{x:.3g}"
        return f"{x:.{digits}g}"
    return str(x)


def _range(r: dict | None) -> str:
    """A ledger range as text: one value when min == max, else "min to max (median m)"; n/a when absent."""
    if not r:
        return "n/a"
    if r["min"] == r["max"]:
        return fmt(r["min"])
    return f"{fmt(r['min'])} to {fmt(r['max'])} (median {fmt(r['median'])})"


def _param(cfg: dict, key: str) -> str:
    """A config.toml setting as text, or "not recorded" when the run's config lacks it."""
    return fmt(cfg.get(key)) if key in cfg else "not recorded"


def _n_devices(n: int, verb: str | None = None) -> str:
    """``"1 device"`` / ``"3 devices"``, with ``verb`` ("have" or "were") agreeing when given."""
    text = f"{n} device{'' if n == 1 else 's'}"
    if verb:
        text += " " + {"have": "has", "were": "was"}[verb] if n == 1 else " " + verb
    return text


def _example_budget_source(u: dict[str, Any], b: dict[str, Any]) -> str:
    """Which settings set the example-level budget, e.g. ``--max-epsilon 6`` or the min of two."""
    names = {"max_epsilon": "--max-epsilon", "target_epsilon": "--target-epsilon"}
    parts = [f"{names[k]} {fmt(b.get(k))}" for k in u.get("from", []) if k in names]
    if len(parts) == 2:
        return f"from {parts[0]} and {parts[1]}: the server uses the smaller, min(--max-epsilon, --target-epsilon)"
    return f"from {parts[0]}" if parts else "source not recorded"


def budget_blocks(summary: dict[str, Any]) -> list[Block]:
    """The "Budgets" section: every budget that applies, how many devices reached it, any device above it.

    The bullets come from :func:`_budget_items`, the BUDGET EXCEEDED alerts from
    :func:`_exceeded_alerts`, and the devices removed from selection from :func:`_budget_event_blocks`.
    """
    out: list[Block] = [("h", 2, "Budgets")]
    if not (summary["dp"] or bool(summary.get("device_dp"))):
        out.append(("p", "No privacy budget applies: the run is not private."))
        return out
    items, any_budget = _budget_items(summary)
    out.append(("ul", items))
    exceeded = _exceeded_alerts(summary)
    out += exceeded
    out += _budget_event_blocks(summary, any_budget, bool(exceeded))
    return out


def _budget_items(summary: dict[str, Any]) -> tuple[list[str], bool]:
    """One bullet per unit that applies (its budget, where it came from, how many devices reached it), and whether any budget is set.

    A unit without a budget says that devices were selected whatever their epsilon.
    """
    b = summary.get("budget") or {}
    delta = summary.get("delta")
    dp_on, device_dp = summary["dp"], bool(summary.get("device_dp"))
    items = []
    any_budget = False
    for unit, label, applies in (("example", "Example level", dp_on), ("device", "Device level", device_dp)):
        u = b.get(unit)
        if u is None:
            if applies:
                items.append(f"{label}: no budget set ("
                             + ("neither --max-epsilon nor --target-epsilon" if unit == "example"
                                else "no --target-epsilon-device") + "); devices were selected whatever their epsilon.")
            continue
        if u.get("epsilon") is None:
            items.append(f"{label}: {_n_devices(u['devices_reached'], 'have')} budget events in the ledger, but "
                         "config.toml records no budget of this unit.")
            continue
        any_budget = True
        src = (_example_budget_source(u, b) if unit == "example"
               else f"from --target-epsilon-device {fmt(b.get('target_epsilon_device'))}")
        text = (f"{label}: epsilon <= {fmt(u['epsilon'])} per device at delta = {fmt(delta)} ({src}). "
                f"{_n_devices(u['devices_reached'])} reached it (the next round would have passed the budget, "
                "so the device was not selected again).")
        if unit == "example" and "target_epsilon" in u.get("from", []):
            text += (" --target-epsilon also calibrated the noise multiplier for the planned schedule; it is "
                     "enforced as a budget as well, so crashed and re-run rounds cannot push a device past it.")
        items.append(text)
    return items, any_budget


def _exceeded_alerts(summary: dict[str, Any]) -> list[Block]:
    """A loud BUDGET EXCEEDED alert for each unit with a device above its budget (which the server should prevent)."""
    b = summary.get("budget") or {}
    out: list[Block] = []
    exceeded = [(unit, b[unit]) for unit in ("example", "device") if (b.get(unit) or {}).get("devices_over")]
    for unit, u in exceeded:
        per = ((summary["epsilon"].get(unit) or {}).get("per_device")) or {}
        worst = max((per.get(d, 0.0) for d in u["devices_over"]), default=0.0)
        out.append(("alert", f"BUDGET EXCEEDED at {unit} level: {_n_devices(len(u['devices_over']), 'have')} an "
                             f"epsilon above the budget {fmt(u['epsilon'])} (largest {fmt(worst)}; devices "
                             f"{', '.join(map(str, u['devices_over'][:20]))}{', ...' if len(u['devices_over']) > 20 else ''}). "
                             "This should not happen: the server removes a device from selection before its "
                             "next round would pass its budget."))
    return out


def _budget_event_blocks(summary: dict[str, Any], any_budget: bool, exceeded: bool) -> list[Block]:
    """The devices removed from selection for their budget (a table of the first 200), or that none was.

    Nothing is said here when no device was removed but some device exceeded its budget (the alert says it).
    """
    out: list[Block] = []
    if summary["budget_events"]:
        out.append(("p", f"{_n_devices(summary['devices_over_budget'], 'were')} removed from selection because their "
                         "next round would have exceeded their budget:"))
        out.append(("table", ["device", "unit", "round", "epsilon its next round would have reached"],
                    [[str(e["device_id"]), e["unit"], str(e["round"]), fmt(e["epsilon"])]
                     for e in summary["budget_events"][:200]]))
        if len(summary["budget_events"]) > 200:
            out.append(("p", f"... and {len(summary['budget_events']) - 200} more (see summary.json)."))
    elif not exceeded:
        out.append(("p", "No device reached its budget." if any_budget
                         else "No device was removed from selection for a budget."))
    return out


def _budget_headline(summary: dict[str, Any]) -> str:
    """The summary's budget sentence: each unit's budget, how many devices reached or passed it, and how many were removed."""
    b = summary.get("budget") or {}
    parts = []
    for unit in ("example", "device"):
        u = b.get(unit)
        if u and u.get("epsilon") is not None:
            over = len(u.get("devices_over") or [])
            parts.append(f"{unit} level epsilon <= {fmt(u['epsilon'])} per device ({_n_devices(u['devices_reached'])} "
                         "reached it" + (f"; {over} ABOVE it" if over else "") + ")")
    text = "Budgets: " + ("; ".join(parts) if parts else "none set") + "."
    return text + f" Devices removed from selection because of their budget: {summary['devices_over_budget']}."


def _counts_paragraph(summary: dict[str, Any]) -> str:
    """What the example-level guarantee means given that the server knows every device's example count."""
    cfg = summary.get("config") or {}
    placement = summary.get("noise_at")
    uses = []
    if summary["dp"] and placement == "device":
        uses.append("the local sampling rate q = B / n_k and the number of local steps")
    if summary["dp"] and placement == "aggregate":
        uses.append("the denominator of the noisy sum (the expected number of sampled examples, the sum of "
                    "p n_k over the cohort)")
    uses.append("the selection probabilities q_k (from activity)")
    if not summary.get("device_dp") and placement != "aggregate":
        uses.append("the FedAvg weights")
    if cfg.get("selection_constant") is None and (summary.get("selection") or {}).get("calibration_note"):
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
           if summary.get("device_dp") and not summary["dp"] else "")
    )


@dataclass(frozen=True)
class _Run:
    """The few facts about a run that most report sections branch on, read once from the summary.

    ``dp_on`` is example-level DP, ``device_dp`` device-level DP; ``aggregate`` is example-level
    noise added on the aggregate (by the server) rather than on the device; ``reproducible`` is
    a private run whose noise came from the recorded seed (``--reproducible-noise``), so no
    guarantee holds. ``trust`` is the summary's trust model per unit, ``cfg`` the run's config.
    """

    dp_on: bool
    device_dp: bool
    aggregate: bool
    reproducible: bool
    trust: dict[str, Any]
    cfg: dict[str, Any]

    @property
    def any_dp(self) -> bool:
        """Whether any guarantee was meant to hold (example level, device level or both)."""
        return self.dp_on or self.device_dp

    @classmethod
    def of(cls, summary: dict[str, Any]) -> "_Run":
        """The facts of ``summary`` (a noise placement left unrecorded counts as on the device)."""
        dp_on = bool(summary["dp"])
        device_dp = bool(summary.get("device_dp"))
        placement = summary.get("noise_at") or ("device" if dp_on else None)
        return cls(dp_on=dp_on, device_dp=device_dp, aggregate=dp_on and placement == "aggregate",
                   reproducible=(dp_on or device_dp) and bool(summary.get("reproducible_noise")),
                   trust=summary.get("trust_model") or {}, cfg=summary.get("config") or {})


def blocks(summary: dict[str, Any], images: dict[str, Path]) -> list[Block]:
    """The report's content, format-independent: one call per section, in reading order.

    A run without a guarantee (no DP, or ``--reproducible-noise``) starts with an ``("alert", text)``
    block saying so, which the writers put on the file's first line.
    """
    run = _Run.of(summary)
    out = _title_blocks(summary)
    out += _summary_blocks(summary, run)
    out += _setting_blocks(summary, run)
    out += _units_blocks(summary, run)
    out += _accountant_blocks(summary, run)
    out += _mechanism_blocks(summary, run)
    out += _selection_blocks(summary, run)
    out += _epsilon_blocks(summary, images, run)
    out += audit_blocks(summary, images)
    out += budget_blocks(summary)
    out += utility_blocks(summary, images)
    out += releases_blocks(summary, images)
    out += holdout_blocks(summary)
    out += deletion_blocks(summary)
    return out


# ------------------------------------------------------------------------- header and summary


def _title_blocks(summary: dict[str, Any]) -> list[Block]:
    """The report's opening: the NOT PRIVATE alert when the run has no guarantee, the title, and how far the run got.

    A run still in progress (or stopped early) says that its numbers cover the committed rounds only.
    """
    out: list[Block] = []
    if summary.get("not_private"):
        out.append(("alert", f"NOT PRIVATE: {summary['not_private']}."))
    title = f"Privacy budget report: run {summary['run_id']}"
    out.append(("h", 1, title))
    state = (
        f"Finished: {summary['rounds_completed']} of {fmt(summary['rounds_planned'])} rounds."
        if summary["status"] == "finished"
        else f"Run still in progress (or stopped early): {summary['rounds_completed']} round(s) committed "
        f"of {fmt(summary['rounds_planned'])} planned. Numbers cover the committed rounds only."
    )
    out.append(("p", state))
    lin = summary.get("lineage")
    if lin:
        removed = ", ".join(map(str, lin["removed_devices"]))
        out.append(("p", f"Retrained for exact removal (dpfl retrain): this run continues run {lin['parent_run_id']} "
                         f"({lin['parent_dir']}) from round {lin['from_round']} without device(s) {removed}, whose "
                         "deletion requests that run recorded. The ledger showed no privacy event of these devices "
                         f"before round {lin['from_round']}, so rounds 1-{lin['from_round'] - 1} (kept from that run, "
                         "with their privacy events) never read their data, and from round "
                         f"{lin['from_round']} on they were never selected: no model of this run was trained on their "
                         "data (their example counts still entered what the server computes from all devices' sizes "
                         "before round 1: delta and, where calibrated, the selection constant and the noise)." if lin["from_round"] > 1 else
                         f"Retrained for exact removal (dpfl retrain): this run retrains run {lin['parent_run_id']} "
                         f"({lin['parent_dir']}) from scratch without device(s) {removed}, whose deletion requests "
                         "that run recorded; they were never selected, so no model of this run was trained on their "
                         "data (their example counts still entered what the server computes from all devices' sizes "
                         "before round 1: delta and, where calibrated, the selection constant and the noise)."))
        kept = lin.get("epsilon_if_parent_kept") or {}
        out.append(("p", "This run's epsilons assume that the models of that run from round "
                         f"{lin['from_round']} on, which this run replaces, are withdrawn. If they stay released, "
                         "each unit's guarantee composes both runs: "
                         + "; ".join(f"{u}-level epsilon {fmt(e)} at delta {fmt(summary.get('delta'))} (max over devices)"
                                     for u, e in kept.items())
                         + " (the parent's events of those rounds are kept in this ledger, table replaced_events; "
                           "that run's holdout evaluation, if it had one, is not included)."
                         if kept else "This run's epsilons assume that the models of that run from round "
                         f"{lin['from_round']} on, which this run replaces, are withdrawn"
                         + ("; that run recorded no privacy event in those rounds." if lin.get("replaced_events")
                            == 0 else ".")))
    return out


def _summary_blocks(summary: dict[str, Any], run: _Run) -> list[Block]:
    """The "Summary" section: the headline guarantee per unit (or that there is none), then the run's warnings.

    A non-private run gets one paragraph saying so; a ``--reproducible-noise`` run is told that its
    epsilons do not hold before they are listed (see :func:`_headline_items`).
    """
    out: list[Block] = [("h", 2, "Summary")]
    if not run.any_dp:
        out.append(("p", "THIS RUN IS NOT PRIVATE (dp = false, device_dp = false). No noise was added and no "
                         "differential privacy guarantee holds: epsilon = infinity for every example and every "
                         "device. The accuracy below is what training without privacy achieves."))
    else:
        if run.reproducible:
            out.append(("p", "THIS RUN IS NOT PRIVATE (--reproducible-noise): its noise and its secret sampling "
                             "decisions were derived from the seed recorded in config.toml, so anyone holding the "
                             "run directory can regenerate them and subtract the noise. The epsilons below are what "
                             "the accounting gives for secret noise; they do NOT hold for this run."))
        out.append(("ul", _headline_items(summary, run)))
    for w in summary.get("warnings", []):
        out.append(("p", f"Note: {w}"))
    return out


def _headline_items(summary: dict[str, Any], run: _Run) -> list[str]:
    """The summary's bullet list for a private run: epsilon per unit, trust model, accountant, budgets, utility.

    Without example-level noise the example level is the bound implied by device level (2 x its
    epsilon, by group privacy); without device-level DP the device level is said to be unprotected.
    """
    eps, delta, acc = summary["epsilon"], summary["delta"], summary["accountant"]
    ex = eps.get("example") or {}
    dv = eps.get("device")
    items = []
    if run.dp_on:
        items.append(
            f"Example level (one utterance): epsilon = {fmt(ex.get('max'))} at delta = {fmt(delta)} "
            f"(maximum over devices; median {fmt(ex.get('median'))}). Strength: {TIER_WORDS[ex.get('tier', 'none')]}.")
    elif dv:
        items.append(
            "Example level (one utterance): no example-level noise (dp = false), but the device-level guarantee "
            "implies one, because one example is part of one device's data: example-level epsilon <= 2 x "
            f"device-level epsilon = {fmt(ex.get('max'))} at delta = (1 + e^epsilon_device) delta = "
            f"{fmt(ex.get('delta'))} (group privacy over removing the device and adding it back with the "
            f"changed example; see Privacy units and adjacency). Strength: {TIER_WORDS[ex.get('tier', 'none')]}.")
    if dv:
        items.append(
            f"Device level (all of one device's data): epsilon = {fmt(dv.get('max'))} at delta = {fmt(delta)} "
            f"(maximum over devices; median {fmt(dv.get('median'))}). Strength: {TIER_WORDS[dv.get('tier', 'none')]}.")
    else:
        items.append("Device level: NOT protected. Device-level DP was off, so there is no guarantee "
                     "for a device's data as a whole (epsilon = infinity at device level); the server "
                     + ("sees each device's clipped gradient sum, which carries no noise of its own."
                        if run.aggregate else "sees each device's individual update."))
    names = [f"{u} level: {t['name']}" for u, t in (("example", run.trust.get("example")),
                                                    ("device", run.trust.get("device"))) if t]
    if names:
        items.append("Trust model: " + "; ".join(names) + ".")
    items.append(f"Accountant: {acc.upper()} ({'privacy loss distributions, tight' if acc == 'pld' else 'Renyi DP, an upper bound'}); "
                 "adjacency: add or remove one unit, with the example counts the server uses treated as public "
                 "(see Privacy units and adjacency); sampling: Poisson.")
    h = summary.get("holdout")
    if h and h.get("epsilon") is not None and h.get("noise_at") != "none":
        items.append(f"Holdout examples (--holdout-per-device; never trained on): epsilon = {fmt(h['epsilon'])} at "
                     f"delta = {fmt(delta)} from the noised counts of the holdout evaluation (see Who the model serves).")
    items.append(_budget_headline(summary))
    items.append(_task_metrics_text(summary))
    return items


# ------------------------------------------------------------------------- setting and threat model


def _setting_blocks(summary: dict[str, Any], run: _Run) -> list[Block]:
    """The "Setting and threat model" section: where the noise is added, whom each unit trusts, what is released.

    The bullets run: example-level noise and its trust model (:func:`_example_noise_items`),
    device-level noise (:func:`_device_noise_item`), the metadata the server sees, the noise
    source (:func:`_noise_source_item`), and that every round's model is covered.
    """
    out: list[Block] = [("h", 2, "Setting and threat model")]
    if not run.any_dp:
        out.append(("p", "No differential privacy: updates are neither clipped nor noised for privacy, and the "
                         "server sees each device's update."))
        return out
    th = _example_noise_items(run)
    th.append(_device_noise_item(run))
    th.append("The server also sees activity counts (how many examples each device holds); these are "
              "metadata outside the guarantee.")
    th.append(_noise_source_item(run))
    th.append("Everything released is covered: each round's global model is a function of the noisy "
              "aggregates up to that round, and epsilon composes every round, so all rounds' models "
              "(not only the last) are covered.")
    if run.device_dp:
        th.append("This report and the run directory are for the operator: they record which rounds each "
                  "device joined and the realised cohort sizes, which the device-level guarantee (for the "
                  "released models) does not cover.")
    out.append(("ul", th))
    return out


def _example_noise_items(run: _Run) -> list[str]:
    """Where example-level noise is added (on the device, on the aggregate, or not at all) and its trust model.

    On the aggregate the server sees each device's clipped sum, so the run assumes it does not look.
    """
    cfg = run.cfg
    th = []
    ex_trust = run.trust.get("example")
    if run.dp_on and not run.aggregate:
        th.append(
            "Example-level noise is added on the device: each device trains with DP-SGD (per-example "
            "clipping to C, Gaussian noise of standard deviation sigma * C added to the summed clipped "
            "gradients of each Poisson-sampled batch). The update that leaves the device is already private "
            "for each of its examples.")
    elif run.aggregate:
        th.append(
            f"Example-level noise is added on the aggregate: each selected device Poisson-samples its examples "
            f"at rate p = {_param(cfg, 'sample_rate')}, clips each example's gradient to C and sends only the sum "
            "of the clipped gradients (no loss, no sample count, no timing). The server adds Gaussian noise of "
            "standard deviation sigma * C once per round to the cohort's sum, divides by the expected number of "
            "sampled examples (the sum of p n_k over the cohort, from the public counts) and takes a server "
            f"optimizer step (strategy {_param(cfg, 'strategy')}). A device's clipped sum carries no noise of "
            "its own.")
    else:
        th.append("No example-level noise (dp = false): devices train without DP-SGD. The guarantee comes from "
                  "device-level DP alone.")
    if ex_trust:
        th.append(f"Trust model at example level: {ex_trust['name']}. Trusted: {ex_trust['trusted']}. "
                  f"The guarantee holds against {ex_trust['holds_against']}."
                  + (" Here the server does see the individual clipped sums: the run assumes it does not "
                     "look at them." if run.aggregate else ""))
    return th


def _device_noise_item(run: _Run) -> str:
    """Device-level noise added on the server and its trust model, or what the server sees without it."""
    if run.device_dp:
        return (
            "Device-level noise is added on the server: each device's update is clipped to norm S and "
            "Gaussian noise of standard deviation sigma_u * S is added to the sum. Trust model at device level: "
            f"{(run.trust.get('device') or {}).get('name', DEVICE_TRUST)}. The server is trusted to add this noise: it sees the individual "
            + ("(example-level-private) updates before aggregation" if run.dp_on
               else "updates before aggregation, which carry no noise of their own")
            + ". The guarantee holds against observers of the released models.")
    return ("No device-level noise: the server sees each device's individual clipped gradient sum, "
            "which is not protected against it: only the noisy aggregate is (see the trust model)."
            if run.aggregate else "No device-level noise: the server sees each device's individual update, "
            "which is protected only at example level.")


def _noise_source_item(run: _Run) -> str:
    """Where the noise and the secret sampling decisions came from: the recorded seed (no guarantee) or a secret source."""
    if run.reproducible:
        return ("Noise source: derived from the seed in config.toml (--reproducible-noise), so the noise and "
                "the sampling decisions can be regenerated: no guarantee holds.")
    return ("Noise source: the noise and every sampling decision the accountant treats as random ("
            + ("example sampling" if run.aggregate else "Poisson batches" if run.dp_on else "")
            + (", " if run.dp_on else "") + "cohort selection, the Gaussian noise) came from a secret source, "
            "a ChaCha20 generator keyed by operating-system entropy, that was never recorded. The seed in "
            "config.toml drives only partitioning, initialisation and data splits.")


# ------------------------------------------------------------------------- units, accountant and delta


def _units_blocks(summary: dict[str, Any], run: _Run) -> list[Block]:
    """The "Privacy units and adjacency" subsection: what one example and one device are, and who their neighbours are.

    A private run adds the paragraph on public example counts (:func:`_counts_paragraph`); a
    non-private run shows the units for reference only.
    """
    out: list[Block] = [("h", 3, "Privacy units and adjacency")]
    if not run.any_dp:
        out.append(("p", "For reference only: the units a private run would protect. This run protects neither."))
    ex_unit = ("Example level: the unit is one example (one utterance). Two datasets are neighbours if one is the "
               "other with one example added or removed. An example lives on one device, so the run's example-level "
               "epsilon is the maximum over devices of each device's own composition.")
    if run.aggregate:
        ex_unit += (" With noise on the aggregate, each round a device joined is one Poisson-subsampled Gaussian "
                    "(rate p, noise multiplier sigma) for each of its examples: one example changes the cohort's "
                    "clipped sum by at most C. No amplification by device selection is claimed at example level: an "
                    "example's inclusion is correlated with its device's other examples, whose contribution can "
                    "reveal that the device took part, so the rate is p, not q_k * p.")
    dev_unit = ("Device level: the unit is one device with all of its data (add or remove one device). With Poisson "
                "selection each device's guarantee depends on its own inclusion probability q_k, so each device is "
                "accounted individually.")
    if run.device_dp and not run.dp_on:
        dev_unit += (" It also bounds the example level: changing one example of device k is at most removing the "
                     "device and adding it back with the changed data (same public count, same q_k), so group "
                     "privacy gives (2 epsilon_k, (1 + e^epsilon_k) delta) per example. The factor 2 is needed: one "
                     "changed example can move a device's clipped update by up to 2 S.")
    out.append(("ul", [ex_unit, dev_unit]))
    if run.any_dp:
        out.append(("p", _counts_paragraph(summary)))
    return out


def _accountant_blocks(summary: dict[str, Any], run: _Run) -> list[Block]:
    """The "Accountant and delta" subsection of a private run: the accountant, its sampling assumption, and delta against 1/N.

    delta is set beside 1/N for examples and for devices, with a warning when it is not far below.
    """
    if not run.any_dp:
        return []
    acc, delta = summary["accountant"], summary["delta"]
    dvu = summary.get("delta_vs_units") or {}
    n_ex, n_dev = summary.get("num_examples"), summary.get("num_devices")
    where = []
    if run.dp_on:
        where.append("example level: " + ("each example's inclusion in its device's clipped sum, rate p"
                                          if run.aggregate else "local batches"))
    if run.device_dp:
        where.append("device level: cohort selection")
    dl = [
        f"Accountant: {acc} ({'dp-accounting privacy loss distributions with pessimistic discretisation: an upper bound on epsilon (Koskela et al. 2020; Google dp-accounting)' if acc == 'pld' else 'dp-accounting Renyi DP (Mironov 2017) converted to (epsilon, delta) following Balle et al. 2020'}). "
        "It assumes Poisson sampling: each unit is included in each step independently with probability q "
        f"({'; '.join(where)}). Every epsilon in this report was recomputed from the ledger's privacy events.",
        f"delta = {fmt(delta)}, the probability with which the epsilon bound may fail. It must be far below "
        "1/N, since a mechanism that publishes one random unit's data outright is (0, 1/N)-DP.",
    ]
    if dvu.get("one_over_examples") and run.dp_on:
        dl.append(f"Example level: N = {n_ex} training examples, 1/N = {fmt(dvu['one_over_examples'])}; "
                  f"delta is {fmt(dvu['one_over_examples'] / delta, 3)} times smaller."
                  + ("" if delta * 10 <= dvu["one_over_examples"] else " WARNING: delta is not far below 1/N."))
    if dvu.get("one_over_devices") and run.device_dp:
        dl.append(f"Device level: N = {n_dev} devices, 1/N = {fmt(dvu['one_over_devices'])}; "
                  f"delta is {fmt(dvu['one_over_devices'] / delta, 3)} times smaller."
                  + ("" if delta * 10 <= dvu["one_over_devices"] else " WARNING: delta is not far below 1/N."))
    return [("h", 3, "Accountant and delta"), ("ul", dl)]


# ------------------------------------------------------------------------- mechanism parameters and selection


def _mechanism_blocks(summary: dict[str, Any], run: _Run) -> list[Block]:
    """The "Mechanism parameters" table: schedule, example-level and device-level mechanism, strategy, model, data.

    Configured values come from config.toml; the ranges "in the ledger" from the privacy events.
    """
    cfg = run.cfg
    rows = [
        ["rounds (planned / committed)", f"{fmt(summary['rounds_planned'])} / {summary['rounds_completed']}"],
        ["expected cohort size", _param(cfg, "cohort_size")],
        ["devices", fmt(summary.get("num_devices"))],
    ]
    if not run.aggregate:
        rows += [["local epochs", _param(cfg, "local_epochs")],
                 ["expected local batch size", _param(cfg, "batch_size")]]
    rows += _example_mechanism_rows(summary, run)
    rows += _device_mechanism_rows(summary, run)
    rows += [["strategy", _param(cfg, "strategy")], ["model", _param(cfg, "model")],
             ["dataset", _param(cfg, "dataset") if "dataset" in cfg else (_param(cfg, "data_dir") if "data_dir" in cfg else "built-in synthetic home-assistant set (generated)")]]
    return [("h", 3, "Mechanism parameters"), ("table", ["parameter", "value"], rows)]


def _example_mechanism_rows(summary: dict[str, Any], run: _Run) -> list[list[str]]:
    """The mechanism table's example-level rows: where the noise goes, sigma, C, p, and the ledger's ranges."""
    cfg = run.cfg
    rows: list[list[str]] = []
    if run.dp_on:
        rows += [
            ["example level: noise added", "on the aggregate (by the server, once per round, to the cohort's sum)"
             if run.aggregate else "on the device (DP-SGD, at every local step)"],
            ["example level: noise multiplier sigma", _param(cfg, "noise_multiplier")],
            ["example level: clipping norm C (max_grad_norm)", _param(cfg, "max_grad_norm")],
        ]
        if run.aggregate:
            rows += [["example level: example sampling rate p", _param(cfg, "sample_rate")],
                     ["server learning rate", _param(cfg, "server_learning_rate")]]
    else:
        rows.append(["example-level noise and clipping", "not applied (dp = false)"])
    ex = summary["epsilon"].get("example") if run.dp_on else None
    if ex and ex.get("mechanism"):
        m = ex["mechanism"]
        if run.aggregate:
            rows += [
                ["example level: sampling rate p in the ledger", _range(m["sample_rate"])],
                ["example level: noisy sums per round joined", _range(m["steps_per_event"])],
                ["example level: rounds composed, most-trained device", fmt(m["total_steps_max_device"])],
            ]
        else:
            rows += [
                ["example level: sigma in the ledger", _range(m["noise_multiplier"])],
                ["example level: sample rate q = batch / examples held", _range(m["sample_rate"])],
                ["example level: local steps per round", _range(m["steps_per_event"])],
                ["example level: total steps, most-trained device", fmt(m["total_steps_max_device"])],
            ]
    return rows


def _device_mechanism_rows(summary: dict[str, Any], run: _Run) -> list[list[str]]:
    """The mechanism table's device-level rows: whether it is on, sigma_u, S and the ledger's inclusion probabilities."""
    rows = [["device-level DP", fmt(run.device_dp)]]
    dv = summary["epsilon"].get("device") if run.device_dp else None
    if run.device_dp:
        rows += [
            ["device level: noise multiplier sigma_u", _param(run.cfg, "device_noise_multiplier")],
            ["device level: update clip norm S", _param(run.cfg, "update_clip_norm")],
            ["server learning rate", _param(run.cfg, "server_learning_rate")],
        ]
        if dv and dv.get("mechanism"):
            rows.append(["device level: inclusion probability q_k per round", _range(dv["mechanism"]["sample_rate"])])
    return rows


def _selection_blocks(summary: dict[str, Any], run: _Run) -> list[Block]:
    """The "Selection" subsection: how q_k follows activity, the expected cohort, and the calibration of c.

    Under example-level DP it adds that the accounting is conditioned on participation.
    """
    sel = summary["selection"]
    sel_text = [
        f"Selection: {fmt(sel['mode'])}; q_k = min(1, c * a_k^alpha) with alpha = {fmt(sel['activity_exponent'])} "
        f"and c = {fmt(sel['selection_constant'])}; expected cohort size {fmt(sel['expected_cohort_size'])}.",
        "Selection used activity counts (the number of examples each device holds), which the server sees.",
    ]
    if run.dp_on:
        sel_text.append(
            "Example-level accounting is conditioned on participation: each device composes the steps of the "
            "rounds it actually joined, so the example-level guarantee does not cover the fact of being selected.")
    if sel.get("calibration_note"):
        sel_text.append(f"Calibration: {sel['calibration_note']}")
    return [("h", 3, "Selection"), ("ul", sel_text)]


# ------------------------------------------------------------------------- epsilon per privacy unit


def _epsilon_blocks(summary: dict[str, Any], images: dict[str, Path], run: _Run) -> list[Block]:
    """The "Epsilon per privacy unit" section of a private run: the table, how to read it, epsilon over examples, figures."""
    if not run.any_dp:
        return []
    out: list[Block] = [("h", 2, "Epsilon per privacy unit")]
    out.append(_epsilon_table(summary))
    out.append(("p", _epsilon_note(summary, run)))
    out += _over_examples_blocks(summary)
    out += _quartile_blocks(summary)
    out += _epsilon_figures(images)
    return out


def _quartile_blocks(summary: dict[str, Any]) -> list[Block]:
    """Per-device epsilon by activity quartile (who spends the privacy), per accounted unit."""
    out: list[Block] = []
    for unit in ("example", "device"):
        rows = (summary["epsilon"].get(unit) or {}).get("by_activity_quartile") or []
        if not rows:
            continue
        # device level: every device with q_k > 0 takes part in each round's mechanism, picked or not
        joined = ("devices that joined", "rounds joined (mean)") if unit == "example" else \
            ("devices accounted", "rounds accounted (mean; every round with q_k > 0)")
        out.append(("p", f"{unit.capitalize()}-level epsilon by activity quartile: the devices holding data, "
                         "sorted by their starting activity (training examples) and split into four groups of "
                         "equal size, Q1 the lightest; a device that never joined a round counts with epsilon 0."))
        out.append(("table", ["quartile", "activity", "devices", *joined,
                              "median epsilon", "max epsilon"],
                    [[f"Q{r['quartile']}", f"{r['activity_min']}-{r['activity_max']}", str(r["devices"]),
                      str(r["devices_joined"]), f"{r['rounds_joined_mean']:.2f}", fmt(r["epsilon_median"]),
                      fmt(r["epsilon_max"])] for r in rows]))
    return out


def _epsilon_table(summary: dict[str, Any]) -> Block:
    """One row per unit: max, median, p90, min over devices, devices accounted, strength and the ledger's cached max.

    An example level implied by device level shows its bound (<=); an unprotected unit shows infinity.
    """
    eps = summary["epsilon"]
    header = ["unit", "max", "median", "p90", "min", "devices accounted", "strength", "ledger's cached max"]
    trows = []
    for unit in ("example", "device"):
        st = eps.get(unit)
        if st and st.get("implied_by") == "device":
            trows.append([unit, f"<= {fmt(st['max'])} (2 x device level, at delta {fmt(st.get('delta'))})",
                          f"<= {fmt(st['median'])}", "", "", str(st.get("devices_accounted", "")),
                          TIER_WORDS[st["tier"]], ""])
            continue
        if not st or "per_device" not in st:
            trows.append([unit, "∞ (not protected)", "", "", "", "", "none", ""])
            continue
        trows.append([unit, fmt(st["max"]), fmt(st["median"]), fmt(st["p90"]), fmt(st["min"]),
                      str(st["devices_accounted"]), TIER_WORDS[st["tier"]], fmt(st["ledger_max"])])
    return ("table", header, trows)


def _epsilon_note(summary: dict[str, Any], run: _Run) -> str:
    """How to read the epsilon table: the delta, what the medians are over, the strength tiers."""
    eps, delta = summary["epsilon"], summary["delta"]
    accounted = [u for u in ("example", "device") if (eps.get(u) or {}).get("per_device") is not None]
    return (f"All epsilons are at delta = {fmt(delta)} unless stated. The median is over devices with "
            "at least one event of that unit; devices that never trained have epsilon 0 (median over all "
            "devices: " + ", ".join(f"{u} {fmt(eps[u]['median_all_devices'])}" for u in accounted)
            + "). Strength tiers: <= 1 strong, <= 10 reasonable, > 10 weak."
            + (" These epsilons do NOT hold for this run (--reproducible-noise)." if run.reproducible else ""))


def _over_examples_blocks(summary: dict[str, Any]) -> list[Block]:
    """Example-level epsilon over examples instead of devices (from the ledger's holdings, or static data), when computed."""
    oe = (summary["epsilon"].get("example") or {}).get("over_examples")
    if not (oe and oe.get("examples")):
        return []
    how = ("the rounds in which its device trained while holding it (the ledger's example holdings: "
           "examples that arrived late or were deleted early compose fewer rounds)"
           if oe["source"] == "holdings" else "every round its device trained (static data: an example "
           "inherits its device's epsilon)")
    return [("p", f"Over examples instead of devices: each example's epsilon composes {how}. Over "
                  f"{oe['examples']} examples ({oe['examples_trained']} touched by training): max "
                  f"{fmt(oe['max'])}, median {fmt(oe['median'])}, p90 {fmt(oe['p90'])}, mean "
                  f"{fmt(oe['mean'])}, at delta = {fmt(summary['delta'])}.")]


def _epsilon_figures(images: dict[str, Path]) -> list[Block]:
    """The epsilon figures that were drawn: against round, against activity, and the distribution over devices."""
    out: list[Block] = []
    if "epsilon_vs_round" in images:
        out.append(("img", "epsilon_vs_round", "Epsilon against round (max and median over devices), "
                    "recomputed from the ledger by composing each device's events up to that round."))
    if "epsilon_vs_activity" in images:
        out.append(("img", "epsilon_vs_activity", "Each device's epsilon against its starting activity."))
    if "epsilon_distribution" in images:
        out.append(("img", "epsilon_distribution", "Distribution of per-device epsilon."))
    return out


def _has(metrics: list[dict[str, Any]], key: str) -> bool:
    """Whether some round of ``metrics`` has a number (not a flag or null) under ``key``."""
    return any(isinstance(m.get(key), (int, float)) and not isinstance(m.get(key), bool) for m in metrics)


def utility_blocks(summary: dict[str, Any], images: dict[str, Path]) -> list[Block]:
    """The "Utility beside privacy" section: final metrics, the per-round table and where each figure comes from.

    Columns appear only when some round has a value: a private run's devices send no training
    loss, and a non-private run has no epsilon.
    """
    out: list[Block] = [("h", 2, "Utility beside privacy")]
    if summary.get("baseline"):
        out.append(("p", _baseline_paragraph(summary)))
    if "accuracy_vs_round" in images:
        out.append(("img", "accuracy_vs_round", "Accuracy and macro-F1 against round."))
    out += _per_round_blocks(summary)
    out.append(("p", "Sources: Mironov 2017 (Renyi DP); Koskela, Jalko & Honkela 2020 and Google's dp-accounting "
                     "(privacy loss distributions); Balle et al. 2020 (RDP to (epsilon, delta)); Abadi et al. 2016 "
                     "(DP-SGD); McMahan et al. 2018 (DP-FedAvg)."))
    return out


def releases_blocks(summary: dict[str, Any], images: dict[str, Path]) -> list[Block]:
    """The "Releases" section: accuracy, NFR and PFR of each release, and their plot; nothing for a run without releases.

    The baseline columns appear only when some release was compared with a ``--baseline-model``;
    the plot (accuracy and NFR per release) only with two releases or more.
    """
    rel = summary.get("releases") or []
    if not rel:
        return []
    pc = float(summary.get("pc_weight") or 0.0)
    with_baseline = any(r.get("nfr_baseline") is not None or r.get("pfr_baseline") is not None for r in rel)
    rounds = ", ".join(str(r["round"]) for r in rel)
    out: list[Block] = [("h", 2, "Releases")]
    out.append(("p", f"{len(rel)} release{'' if len(rel) == 1 else 's'}: the model{'' if len(rel) == 1 else 's'} "
                     f"of round{'' if len(rel) == 1 else 's'} {rounds}. For each release the server measured on the "
                     "test split its accuracy, the negative flip rate NFR, the share of test examples the previous release "
                     "classified correctly and this release classifies wrongly, and the positive flip rate PFR, "
                     "the share the previous release got wrong and this one gets right (Yan et al. 2021, "
                     "\"Positive-congruent training: towards regression-free model updates\", CVPR)."
                     + (" The first release has no previous release, so its flip rates against it are n/a."
                        if rel[0].get("nfr") is None else "")
                     + (f" Positive-congruent training was on (--pc-weight {fmt(pc)}): after the first release each "
                        "device's per-example loss added the focal distillation term towards the previous release "
                        "on the examples that release classified correctly (Yan et al. 2021)"
                        + (", inside the loss whose per-example gradients are clipped and noised, so it added no "
                           "privacy cost" if summary.get("dp", True) and not summary.get("not_private") else "")
                        + "; the previous release, a released model, was sent to the cohort." if pc > 0 else "")))
    header = ["release round", "accuracy", "NFR vs previous", "PFR vs previous"]
    keys = ["accuracy", "nfr", "pfr"]
    if with_baseline:
        header += ["NFR vs baseline", "PFR vs baseline"]
        keys += ["nfr_baseline", "pfr_baseline"]
    out.append(("table", header, [[str(r["round"])] + [fmt(r.get(k)) for k in keys] for r in rel]))
    if with_baseline:
        out.append(("p", "The baseline columns measure the same flips, on the same test split, against the model "
                         "given with --baseline-model instead of the previous release"
                         + (" (not the non-private baseline run of the utility section)." if summary.get("baseline")
                            else ".")))
    if "accuracy_nfr_per_release" in images:
        out.append(("img", "accuracy_nfr_per_release", "Accuracy and NFR per release (test split; x = release "
                                                       "round; NFR against the previous release)."))
    return out


def holdout_blocks(summary: dict[str, Any]) -> list[Block]:
    """The "Who the model serves" section: holdout accuracy of the final model by activity quartile,
    beside the training examples' epsilon by the same quartiles; nothing without ``--holdout-per-device``."""
    h = summary.get("holdout")
    if not h:
        return []
    if h.get("incomplete"):
        return [("h", 2, "Who the model serves"),
                ("p", f"A holdout evaluation after round {h.get('round')} is on record in the ledger "
                      f"({h.get('devices_asked')} devices asked), but the run stopped before its result was written "
                      "(dpfl simulate --resume evaluates again). Its counts may have left the devices, so they are "
                      f"accounted: each holdout example's epsilon so far is {fmt(h.get('epsilon'))} at delta {fmt(summary.get('delta'))}.")]
    noise_at = h.get("noise_at")
    sigma = fmt(h.get("noise_multiplier"))
    how = {
        "aggregate": f"Each device sent the server its count of correct predictions; the server added Gaussian noise of "
                     f"std {sigma} once to each quartile's sum (central DP, as the run's training noise).",
        "device": f"Each device added Gaussian noise of std {sigma} to its own count of correct predictions before "
                  "sending it (as the run's training noise, on the device).",
        "none": "The run is not private: the counts are exact and nothing protects the holdout examples.",
    }.get(noise_at, "")
    eps = h.get("epsilon")
    guarantee = ("" if noise_at == "none" or eps is None else
                 f" One holdout example changes one count by at most 1, and each holdout example was read by "
                 f"{h.get('releases', 1)} such release(s): its guarantee is epsilon {fmt(eps)} at delta "
                 f"{fmt(summary.get('delta'))}, separate from the training examples' (holdout examples never train; "
                 "training examples are never evaluated). The number of holdout examples per device is an "
                 "example count, which the adjacency treats as public like the activity; it was not sent.")
    right = ("predicts every word tag of correctly" if h.get("task") == "slots" else
             "classifies correctly")
    out: list[Block] = [("h", 2, "Who the model serves")]
    out.append(("p", f"Each example was kept out of training with probability {fmt(h.get('fraction'))} (--holdout-per-"
                     "device), decided by a keyed hash of its id and the run seed, so the split is the same in every "
                     "process and one example's membership depends on no other example. After round "
                     f"{h.get('round')} each device asked (those in an activity quartile that hold holdout examples "
                     "and were not deleted) counted the holdout examples the final released model "
                     f"{right}: {h.get('devices_replied')} of {h.get('devices_asked')} replied. {how}{guarantee}"))
    rows = []
    for q in h.get("quartiles") or []:
        acc = "n/a" if q.get("accuracy") is None else f"{fmt(q['accuracy'])} ± {fmt(q.get('noise_std_accuracy'))}"
        rows.append([f"Q{q['quartile']}", f"{q['activity_min']}-{q['activity_max']}", str(q["devices"]),
                     str(q["devices_evaluated"]), str(q["examples"]), acc, fmt(q.get("epsilon_median")),
                     fmt(q.get("epsilon_max"))])
    out.append(("table", ["quartile", "activity", "devices", "evaluated", "holdout examples",
                          "accuracy (± noise std)", "median epsilon (training)", "max epsilon (training)"], rows))
    out.append(("p", "Quartiles as in the epsilon section: devices holding data sorted by starting activity, Q1 the "
                     "lightest. Accuracy is the noisy count over the quartile's holdout examples, clipped to [0, 1]; "
                     "the ± gives the noise's standard deviation on it. The epsilon columns are the example-level "
                     "epsilon of the quartile's devices' training examples."))
    return out


def deletion_blocks(summary: dict[str, Any]) -> list[Block]:
    """The "Deletion requests" section: each request, what the run did, and what its guarantee says
    about the deleted data; nothing for a run without requests."""
    dels = summary.get("deletions") or []
    if not dels:
        return []
    delta = summary.get("delta")
    out: list[Block] = [("h", 2, "Deletion requests")]
    out.append(("p", f"{len(dels)} device(s) asked to be forgotten (--deletions). From its request's round on a "
                     "device is never selected again and is not asked for a holdout evaluation; the ledger records "
                     "each request (table deletions). Models released before that round were trained while the "
                     "device took part, and they stay released: removal from them is not exact."))
    rows = []
    for d in dels:
        g = d.get("group")
        group = ("n/a" if g is None else
                 f"{fmt(g['epsilon'])} at delta {fmt(g['delta'])}" if g.get("delta") is not None else
                 f"{fmt(g['epsilon'])} (delta > 1: no bound)")
        rows.append([str(d["device_id"]), str(d["round"]), fmt(d.get("first_joined")), str(d["rounds_joined"]),
                     str(d["examples"]), fmt(d.get("epsilon_example")), group, fmt(d.get("epsilon_device"))])
    out.append(("table", ["device", "from round", "first joined", "rounds joined", "examples (round 1)",
                          "example-level epsilon", "all its examples (group privacy)", "device-level epsilon"], rows))
    out.append(("p", "What the guarantee says about the deleted data. Example-level DP bounds what every release "
                     "reveals about any ONE example of the device (the example-level epsilon above, at delta "
                     f"{fmt(delta)}). It does not cover the device's data as a whole: group privacy extends it to all "
                     "n_k examples only as (n_k epsilon, n_k e^((n_k - 1) epsilon) delta) (Dwork & Roth 2014, Theorem "
                     "2.2), which for more than a few examples says little. Device-level DP (--device-dp) covers "
                     "the whole device directly (device-level epsilon column, when the run has it). For exact "
                     "removal, `dpfl retrain RUN_DIR --from-round T` retrains from the kept checkpoint before the "
                     "first round T in which any deleted device joined; a device that never joined trained no "
                     "model. Its example count still entered what the server computes from all devices' sizes "
                     "before round 1: delta and, where calibrated, the selection constant and the noise."))
    return out


def _baseline_paragraph(summary: dict[str, Any]) -> str:
    """Final accuracy and macro-F1 (and slot F1 and sentence accuracy for slot tasks) against the non-private baseline's."""
    base = summary["baseline"]
    da = (summary["final_accuracy"] - base["final_accuracy"]
          if summary["final_accuracy"] is not None and base["final_accuracy"] is not None else None)
    return (f"Final accuracy {fmt(summary['final_accuracy'])} against {fmt(base['final_accuracy'])} "
            f"for the non-private baseline ({base['run_dir']}); difference {fmt(da)}. "
            f"Final macro-F1 {fmt(summary['final_macro_f1'])} against {fmt(base['final_macro_f1'])}."
            + (f" Final slot F1 {fmt(summary.get('final_slot_f1'))} against {fmt(base.get('final_slot_f1'))}; "
               f"sentence accuracy {fmt(summary.get('final_sentence_accuracy'))} against "
               f"{fmt(base.get('final_sentence_accuracy'))}." if summary.get("final_slot_f1") is not None else ""))


def _metric_columns(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The per-round table's optional columns as (header, metrics key), each only when some round has a value.

    The realised cohort size is left out under device-level DP, whose accounting treats the cohort as secret.
    """
    metrics = summary.get("metrics", [])
    slots = any("slot_f1" in m for m in metrics)
    cols = [("cohort", "cohort_size")] if not summary.get("device_dp") else []
    cols += [("train loss", "train_loss")] if _has(metrics, "train_loss") else []
    cols += [("accuracy", "accuracy"), ("macro-F1", "macro_f1")]
    cols += [("test loss", "test_loss")] if _has(metrics, "test_loss") else []
    cols += [("slot F1", "slot_f1"), ("sentence accuracy", "sentence_accuracy")] if slots else []
    cols += [("example eps (server, max)", "epsilon_example_max")] if _has(metrics, "epsilon_example_max") else []
    cols += [("device eps (server, max)", "epsilon_device_max")] if _has(metrics, "epsilon_device_max") else []
    return cols


def _per_round_blocks(summary: dict[str, Any]) -> list[Block]:
    """The per-round table (round, skipped, then :func:`_metric_columns`) and the paragraph on its sources, or "No metrics recorded yet."."""
    metrics = summary.get("metrics", [])
    cols = _metric_columns(summary)
    mrows = [[str(m["round"])] + ["yes" if m.get("skipped") else ""] + [fmt(m.get(k)) for _, k in cols]
             for m in metrics]
    if not mrows:
        return [("p", "No metrics recorded yet.")]
    return [("table", ["round", "skipped"] + [h for h, _ in cols], mrows), ("p", _per_round_sources(summary))]


def _per_round_sources(summary: dict[str, Any]) -> str:
    """Where the per-round figures come from (test split, the server's accountant), and why a column is absent.

    A private run's devices send no training loss; under device-level DP the realised cohort is secret.
    """
    metrics = summary.get("metrics", [])
    any_dp = summary["dp"] or bool(summary.get("device_dp"))
    slots = any("slot_f1" in m for m in metrics)
    src = ("Per-round figures: accuracy, macro-F1" + (", test loss" if _has(metrics, "test_loss") else "")
           + (", slot F1 and sentence accuracy" if slots else "") + " are computed on the test split"
           + ("; the epsilon columns are the server's accountant's running maxima (privacy quantities from "
              "public counts and the rounds joined, not from device data)."
              if _has(metrics, "epsilon_example_max") or _has(metrics, "epsilon_device_max") else "."))
    if _has(metrics, "train_loss"):
        src += (" The train loss is the example-weighted mean of the losses the devices reported, which only a "
                "run without DP sends" + (": this run's config says DP was on, so check it." if any_dp else "."))
    elif any_dp:
        src += (" No training loss is shown: a private run's devices send no loss or other un-noised "
                "statistic of their data.")
    if summary.get("device_dp"):
        src += (" The realised cohort size is not shown (the device-level accounting treats the cohort as "
                "secret); the expected cohort size is in the mechanism table.")
    return src


def _task_metrics_text(summary: dict[str, Any]) -> str:
    """The headline's utility sentence: accuracy and macro-F1, plus slot F1 and sentence accuracy for slot tasks."""
    base = summary.get("baseline") or None

    def part(d: dict[str, Any]) -> str:
        text = f"accuracy {fmt(d.get('final_accuracy'))}, macro-F1 {fmt(d.get('final_macro_f1'))}"
        if d.get("final_slot_f1") is not None:
            text += f", slot F1 {fmt(d.get('final_slot_f1'))}, sentence accuracy {fmt(d.get('final_sentence_accuracy'))}"
        return text

    return "Final " + part(summary) + (f" (non-private baseline: {part(base)})" if base else "") + "."


def _eps_text(x: Any) -> str:
    """An accounted epsilon as text, infinity (or audit.json's "inf") as no guarantee."""
    return "∞ (no guarantee)" if x == "inf" or (isinstance(x, float) and math.isinf(x)) else fmt(x)


def audit_blocks(summary: dict[str, Any], images: dict[str, Path]) -> list[Block]:
    """The "Measured leakage" section (from RUN_DIR/audit/audit.json, written by ``dpfl audit``).

    Without an audit it says how to run one. With one: what an audit can and cannot show, the
    table of measures (:func:`_audit_rows`), the verdict beside the accounted epsilon
    (:func:`_audit_verdict`), the method notes, the audit's warnings and the ROC figure.
    """
    out: list[Block] = [("h", 2, "Measured leakage: privacy audit")]
    a = summary.get("audit")
    if not a:
        return out + [_no_audit_paragraph(summary)]
    out.append(("p", "An audit attacks the released model and measures what leaks. The empirical epsilon it implies "
                     "is a LOWER bound: with the stated confidence the run is not (epsilon, delta)-DP for any "
                     "smaller epsilon. It can show that a run is less private than claimed, never that it is "
                     "private; the accounted epsilon above is the guarantee (an upper bound). A correct "
                     "implementation keeps the lower bound below the accounted epsilon."))
    out.append(("table", ["measure", "value"], _audit_rows(a)))
    out += _audit_verdict(summary, a)
    out.append(("p", _audit_method_notes(a)))
    for w in (a.get("details") or {}).get("warnings") or []:
        out.append(("p", f"Note: {w}"))
    if "audit_roc" in images:
        out.append(("img", "audit_roc", "ROC curves of the loss-based membership attacks (left linear, right "
                                        "log-log to show the low-FPR region); the dotted line is chance."))
    return out


def _no_audit_paragraph(summary: dict[str, Any]) -> Block:
    """What to do when no audit was run: run ``dpfl audit`` on a run with canaries, or insert canaries first."""
    cfg = summary.get("config") or {}
    if cfg.get("canaries"):
        return ("p", f"This run inserted {cfg['canaries']} canaries, but no audit has been run yet: "
                     "run `dpfl audit RUN_DIR`, then this section shows the measured leakage.")
    return ("p", "No privacy audit was run. Insert canaries with `--canaries M` when training and "
                 "run `dpfl audit RUN_DIR` to measure leakage beside the guarantee.")


def _audit_rows(a: dict[str, Any]) -> list[list[str]]:
    """The audit table: model and canaries, membership inference, the epsilon lower bounds, the accounted epsilon, exposure and extraction."""
    d = a.get("details") or {}
    can = d.get("canaries") or {}
    mem = d.get("membership") or {}
    rep = can.get("repeats") or 1
    rows = [
        ["model audited", f"final global model (round {fmt(d.get('checkpoint_round'))})"],
        ["canaries", f"{fmt(can.get('m'))} ({fmt(can.get('included'))} included, each with probability 1/2), "
                     f"{rep} cop{'y' if rep == 1 else 'ies'} each on one device, {fmt(can.get('n_digits'))}-digit secrets"],
    ]
    for key, name in (("canaries", "membership inference, canaries (included vs excluded)"),
                      ("real", "membership inference, real examples (training vs held-out)")):
        m = mem.get(key)
        if m:
            rows.append([name, f"AUC {fmt(m['auc'])}; TPR {fmt(m['tpr_at_1pct_fpr'])} at 1% FPR, "
                               f"{fmt(m['tpr_at_0_1pct_fpr'])} at 0.1% FPR ({m['n_members']} members, "
                               f"{m['n_nonmembers']} non-members; chance: AUC 0.5, TPR = FPR)"])
    rows += _lower_bound_rows(a)
    rows += _accounted_rows(a, rep)
    rows += _exposure_rows(d.get("exposure") or {})
    rows += _extraction_rows(d.get("extraction") or {})
    return rows


def _lower_bound_rows(a: dict[str, Any]) -> list[list[str]]:
    """The empirical epsilon lower bound, then the one-run and Clopper-Pearson bounds it is the larger of."""
    lb = (a.get("details") or {}).get("epsilon_lower_bound") or {}
    rows = [["empirical epsilon lower bound (larger of the two below)",
             f"{fmt(a.get('epsilon_lower_bound'))} at delta = {fmt(a.get('delta'))}, confidence {fmt(a.get('confidence'))}"]]
    one = lb.get("one_run")
    if one:
        rows.append(["  one-run lower bound (Steinke, Nasr & Jagielski 2023)",
                     f"{fmt(one['epsilon_lower_bound'])} ({one['v']} of {one['r']} guesses right; at most "
                     f"{fmt(one.get('ceiling'))} with {one['m']} canaries even if every guess were right)"])
    cp = lb.get("clopper_pearson")
    if cp:
        rows.append(["  Clopper-Pearson lower bound (Jagielski, Ullman & Oprea 2020)",
                     f"{fmt(cp['epsilon_lower_bound'])} (TP {cp['true_positives']}/{cp['n_positives']}, "
                     f"FP {cp['false_positives']}/{cp['n_negatives']})"])
    return rows


def _accounted_rows(a: dict[str, Any], rep: int) -> list[list[str]]:
    """The accounted example-level epsilon, and for canaries of ``rep`` copies the group (or device-level) epsilon."""
    theo = (a.get("details") or {}).get("theoretical") or {}
    delta = a.get("delta")
    rows = [["accounted (theoretical) epsilon, example level", _eps_text(theo.get("epsilon_example_max"))
             + f" at delta = {fmt(delta)} (maximum over devices)"]]
    if rep > 1 and theo.get("epsilon_group") not in (None, "inf"):
        dg = theo.get("delta_group")
        rows.append([f"accounted epsilon for a group of {rep} copies on one device",
                     f"{fmt(theo.get('epsilon_group'))} (group privacy{' or device level' if theo.get('epsilon_device_max') is not None else ''}; "
                     + (f"delta {fmt(dg)})" if isinstance(dg, (int, float)) and dg < 1 else
                        "its delta R e^((R-1) epsilon) delta reaches 1, so group privacy gives no meaningful bound here)")])
    return rows


def _exposure_rows(ex: dict[str, Any]) -> list[list[str]]:
    """The exposure row (Carlini et al. 2019): included against excluded canaries, chance and the maximum; none without exposure."""
    if not ex:
        return []
    return [["exposure (Carlini et al. 2019), bits",
             f"included canaries mean {fmt(ex.get('mean_included'))} (max {fmt(ex.get('max_included'))}); "
             f"excluded {fmt(ex.get('mean_excluded'))}; chance {fmt(ex.get('chance'))}; maximum "
             f"{fmt(ex.get('max_possible'))} ({ex.get('method')}"
             + (f", {ex.get('samples')} sampled candidates per canary" if ex.get("samples") else
                f", all {ex.get('n_candidates')} candidates") + ")"]]


def _extraction_rows(xt: dict[str, Any]) -> list[list[str]]:
    """The model-inversion row (Parikh et al. 2022): secrets recovered among included and excluded canaries; none without extraction."""
    if not xt:
        return []
    parts = []
    for key in ("included", "excluded"):
        g = xt.get(key)
        if g:
            parts.append(f"{key}: {g['n_exact']} of {g['n']} secrets recovered exactly (digit accuracy "
                         f"{fmt(g['digit_accuracy'])})")
    return [["extraction by model inversion (Parikh et al. 2022)",
             "; ".join(parts) + f"; chance {fmt(xt.get('chance_rate'))} per secret, 0.1 per digit "
             f"({xt.get('steps')} steps, {xt.get('restarts')} restarts)"]]


def _audit_verdict(summary: dict[str, Any], a: dict[str, Any]) -> list[Block]:
    """The lower bound set beside the guarantee: consistent, consistent with the canaries' group bound, or a WARNING.

    A run without a guarantee only states what the audit certified; a device-level-only run compares
    with the example-level bound that device level implies.
    """
    theo = (a.get("details") or {}).get("theoretical") or {}
    rep = ((a.get("details") or {}).get("canaries") or {}).get("repeats") or 1
    lbv = a.get("epsilon_lower_bound")
    theo_ex = theo.get("epsilon_example_max")
    implied = (summary.get("epsilon") or {}).get("example") or {}
    if summary.get("not_private"):
        return [("p", f"This run has no privacy guarantee ({summary['not_private']}); the empirical lower "
                      f"bound {fmt(lbv)} shows the leakage the audit could certify without one.")]
    if implied.get("implied_by") == "device":
        if not isinstance(lbv, (int, float)):
            return []
        return [("p", f"No example-level noise: the empirical lower bound {fmt(lbv)} is to be set beside "
                      f"the example-level bound implied by device level, {fmt(implied.get('max'))} at delta "
                      f"{fmt(implied.get('delta'))}"
                      + (" (consistent)." if lbv <= implied.get("max", math.inf) else
                         ". WARNING: it exceeds that bound; if the audit's assumptions hold, the accounting "
                         "or the DP implementation is wrong for this run."))]
    if not (isinstance(lbv, (int, float)) and isinstance(theo_ex, (int, float))):
        return []
    group = theo.get("epsilon_group") if rep > 1 else theo_ex
    if lbv <= theo_ex:
        return [("p", f"The empirical lower bound {fmt(lbv)} is below the accounted epsilon {fmt(theo_ex)}: "
                      "consistent with the guarantee (the audit is a lower bound, the accounting an upper one).")]
    if isinstance(group, (int, float)) and lbv <= group:
        return [("p", f"The empirical lower bound {fmt(lbv)} exceeds the per-example epsilon {fmt(theo_ex)} "
                      f"but not the guarantee for the {rep} copies of a canary ({fmt(group)}), which is what "
                      "the canaries test: consistent.")]
    return [("p", f"WARNING: the empirical lower bound {fmt(lbv)} exceeds the accounted epsilon "
                  f"{fmt(theo_ex)}. If the audit's assumptions hold, the accounting or the DP "
                  "implementation is wrong for this run.")]


def _audit_method_notes(a: dict[str, Any]) -> str:
    """How the audit's numbers are made: loss-based membership scores, the union bound over the two bounds, exposure."""
    lb = (a.get("details") or {}).get("epsilon_lower_bound") or {}
    return ("Method notes: membership scores are the model's loss on the canary's (or example's) "
            "label (Yeom et al. 2018), lower loss = member; TPR at low FPR as in Carlini et al. 2022. "
            "Each bound is computed at confidence " + fmt(lb.get("per_method_confidence"))
            + " so that the larger of the two holds at " + fmt(a.get("confidence")) + " (union bound). The "
            "Clopper-Pearson bound treats the canaries of one run as independent trials (Jagielski et "
            "al. train one model per trial); the one-run bound is the one whose assumptions hold for "
            "many canaries in one run. Exposure: log2(candidates) - log2(rank of the true secret). "
            "Real-data membership compares training examples of devices that trained with held-out "
            "test examples.")


# ------------------------------------------------------------------------- writers


def markdown(summary: dict[str, Any], images: dict[str, Path]) -> str:
    """Markdown text; plots are linked as sibling PNG files."""
    lines: list[str] = []
    for b in blocks(summary, images):
        kind = b[0]
        if kind == "h":
            lines += ["#" * b[1] + " " + b[2], ""]
        elif kind == "p":
            lines += [b[1], ""]
        elif kind == "alert":
            lines += [f"**{b[1]}**", ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in b[1]] + [""]
        elif kind == "table":
            esc = [[c.replace("|", "\\|") for c in row] for row in b[2]]
            lines.append("| " + " | ".join(b[1]) + " |")
            lines.append("|" + "---|" * len(b[1]))
            lines += ["| " + " | ".join(row) + " |" for row in esc]
            lines.append("")
        elif kind == "img":
            lines += [f"![{b[2]}]({images[b[1]].name})", "", f"*{b[2]}*", ""]
    return "\n".join(lines)


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:980px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #ddd;padding-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #eee}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}figure{margin:1em 0}img{max-width:100%}
figcaption{font-size:.85em;color:#555}.note{background:#fff8e1;border-left:4px solid #f0ad4e;padding:.4em .8em}
.alert{background:#fdecea;border-left:4px solid #d9534f;padding:.4em .8em;font-weight:bold}
"""


def html(summary: dict[str, Any], images: dict[str, Path]) -> str:
    """Self-contained HTML: inline CSS, plots as base64 data URIs, no external references."""
    e = _html.escape
    reason = summary.get("not_private")
    title = ("NOT PRIVATE: " if reason else "") + "Privacy budget report: " + str(summary["run_id"])
    # The first line names the file and, for a run without a guarantee, says so and why (the
    # title and a meta element, both on line 1; the body then opens with the same alert).
    first = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
             + (f'<meta name="dpfl-not-private" content="NOT PRIVATE: {e(reason, quote=True)}.">' if reason else ""))
    parts = [first, f"<style>{CSS}</style></head><body>"]
    for b in blocks(summary, images):
        kind = b[0]
        if kind == "h":
            parts.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
        elif kind == "alert":
            parts.append(f'<p class="alert">{e(b[1])}</p>')
        elif kind == "p":
            cls = ""
            if b[1].startswith("Note:"):
                cls = ' class="note"'
            elif b[1].startswith("THIS RUN IS NOT PRIVATE"):
                cls = ' class="alert"'
            parts.append(f"<p{cls}>{e(b[1])}</p>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in b[2])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(Path(images[b[1]]).read_bytes()).decode("ascii")
            parts.append(f'<figure><img alt="{e(b[2])}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{e(b[2])}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
