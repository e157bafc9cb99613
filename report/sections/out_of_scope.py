"""The "Out-of-scope detection" section (``--oos-label`` / ``--oos-holdout-intents``): which test
utterances are out of scope, the rule that rejects them, where its threshold came from and what
that cost, and the final model's figures on the test split (``oos.json``, server/out_of_scope.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from report.blocks import Block, fmt
from report.context import Context
from report.sections.base import Doc, Section
from report.sections.holdout import releases_epsilon

#: The test figures of oos.json (nlu.oos.oos_metrics), in the order the table and summary.json give them.
FIGURES = ("in_scope_accuracy", "closed_set_accuracy", "oos_recall", "oos_precision", "overall_accuracy",
           "in_scope_rejected", "auroc", "in_scope", "out_of_scope")

#: summary.json's ``out_of_scope`` keys, in order.
SUMMARY_FIELDS = ("threshold", "threshold_source", "quantile", "score", "oos_label", "oos_intents", "oos_index",
                  *FIGURES, "threshold_epsilon")


@dataclass(frozen=True)
class OutOfScope:
    """The out-of-scope evaluation of the final model, read from oos.json.

    ``threshold`` (tau) and its ``threshold_source`` (``"public"``: ``--oos-threshold``;
    ``"holdout"``: the ``quantile``-quantile of the holdout's noised confidence histogram), the
    confidence ``score``, the out-of-scope ``oos_label`` (``label_named``: given with ``--oos-label``
    rather than the default name), the held-out ``oos_intents`` (``oos_fraction`` of the intents,
    chosen with ``oos_split_seed``), the model's out-of-scope class ``oos_index`` (None: it has
    none), the ``round`` of the model scored and its test ``figures`` (nlu.oos.oos_metrics).
    ``threshold_epsilon``: the holdout examples' epsilon (nats at ``delta``) composed over the
    ``holdout_releases`` on record when the threshold came from the holdout (inf when not noised,
    None without delta), 0.0 for a public threshold. ``histogram_bins``, ``noise_std_per_bin``,
    ``holdout_noise_at`` and ``noise_multiplier_release`` describe the holdout release the
    threshold was read from (None when holdout.json is absent or the threshold is public).
    ``trade_off``: oos.json's figures at the thresholds of other quantiles of the same histogram.
    """

    threshold: float
    threshold_source: str
    quantile: float | None
    score: str
    oos_label: str | None
    label_named: bool
    oos_intents: tuple[str, ...]
    oos_fraction: float | None
    oos_split_seed: int | None
    oos_index: int | None
    round: int | None
    figures: dict[str, Any]
    threshold_epsilon: float | None
    delta: float | None
    holdout_releases: int
    histogram_bins: int | None
    noise_std_per_bin: float | None
    holdout_noise_at: str | None
    noise_multiplier_release: float | None
    reproducible_noise: bool
    trade_off: tuple = ()

    def to_json(self) -> dict[str, Any]:
        """``{"out_of_scope": {threshold, threshold_source, quantile, score, oos_label, oos_intents,
        oos_index, the test figures, threshold_epsilon}}``."""
        out = {"threshold": self.threshold, "threshold_source": self.threshold_source, "quantile": self.quantile,
               "score": self.score, "oos_label": self.oos_label, "oos_intents": list(self.oos_intents),
               "oos_index": self.oos_index, **{k: self.figures.get(k) for k in FIGURES},
               "threshold_epsilon": self.threshold_epsilon}
        return {"out_of_scope": {k: out[k] for k in SUMMARY_FIELDS}}


def compute(ctx: Context) -> OutOfScope | None:
    """The out-of-scope evaluation of oos.json with the threshold's epsilon (the holdout's, recomputed
    from the ledger's ``holdout_releases`` rows, when the threshold came from the holdout); None
    when the run has no oos.json."""
    oos, cfg = ctx.data.oos, ctx.cfg
    if not oos:
        return None
    source = str(oos.get("threshold_source"))
    hold = ctx.data.holdout or {}
    hist = hold.get("oos_histogram") if source == "holdout" else None
    rows = ctx.data.holdout_releases
    eps = releases_epsilon(rows, ctx.facts.delta, ctx.facts.accountant) if source == "holdout" else 0.0
    intents = tuple(str(n) for n in oos.get("oos_intents") or ())
    label = oos.get("oos_label")
    fraction = cfg.get("oos_holdout_intents")
    return OutOfScope(
        threshold=float(oos["threshold"]), threshold_source=source, quantile=oos.get("quantile"),
        score=str(oos.get("score") or "max-softmax"), oos_label=label,
        label_named=bool(cfg.get("oos_label")) or (not intents and bool(label)),
        oos_intents=intents, oos_fraction=float(fraction) if fraction else None,
        oos_split_seed=oos.get("oos_split_seed"), oos_index=oos.get("oos_index"), round=oos.get("round"),
        figures=dict(oos.get("test") or {}), threshold_epsilon=eps, delta=ctx.facts.delta,
        holdout_releases=len(rows) if source == "holdout" else 0,
        histogram_bins=int(hist["bins"]) if hist else None,
        noise_std_per_bin=hist.get("noise_std_per_bin") if hist else None,
        holdout_noise_at=hold.get("noise_at") if source == "holdout" and hold else None,
        noise_multiplier_release=hold.get("noise_multiplier_release") if source == "holdout" and hold else None,
        reproducible_noise=bool(cfg.get("reproducible_noise", False)),
        trade_off=tuple(dict(t) for t in oos.get("trade_off") or ()),
    )


def _which(o: OutOfScope) -> str:
    """The paragraph saying which test utterances are out of scope."""
    text = "An utterance is out of scope when it matches none of the model's intents. "
    label = o.oos_label
    if o.oos_intents:
        k = len(o.oos_intents)
        flag = "--oos-holdout-intents" + (f" {fmt(o.oos_fraction)}" if o.oos_fraction is not None else "")
        seed = f"--oos-split-seed {o.oos_split_seed}" if o.oos_split_seed is not None else "--oos-split-seed"
        text += (f"Here the out-of-scope test utterances are those of the {k} intent{'' if k == 1 else 's'} held out "
                 f"of the data set ({flag}): {', '.join(o.oos_intents)}. The choice reads only the data set's label "
                 f"schema, that fraction and {seed} (not the run's --seed), so every run with these settings holds "
                 f"out the same intents. {'Its' if k == 1 else 'Their'} training utterances were dropped "
                 "before the devices' data was formed, so no device trained on them or held them as holdout "
                 f"examples, and the model has no class for {'it' if k == 1 else 'them'}.")
        if o.label_named and label:
            if o.oos_index is not None:
                text += (f" Test utterances labelled {label} (--oos-label) are out of scope too; {label} is one of "
                         f"the model's classes (class index {o.oos_index}, the oos-train setting of Larson et al. "
                         "2019), so the model can predict it.")
            else:
                text += (f" --oos-label {label} is not one of the data set's labels, so no test utterance is out of "
                         "scope by that label.")
        return text
    text += f"Here the out-of-scope test utterances are those labelled {label} (--oos-label)."
    if o.oos_index is not None:
        text += (f" {label} is one of the model's classes (class index {o.oos_index}, the oos-train setting of "
                 f"Larson et al. 2019): its training utterances, where the devices hold any, train it like any other "
                 "class, so the model can predict it.")
    else:
        text += f" {label} is not one of the model's classes."
    return text


def _rule(o: OutOfScope) -> str:
    """The paragraph stating the rejection rule."""
    score = "max-softmax" if o.score == "max-softmax" else o.score
    over = ("every class of the model is in scope" if o.oos_index is None
            else f"every class but {o.oos_label}")
    model = "The final released model" + (f" (after round {o.round})" if o.round is not None else "")
    text = (f"{model} rejects an utterance as out of scope when its confidence, the largest softmax probability "
            f"over the in-scope intents ({score}; {over}), is below the threshold tau = {fmt(o.threshold)}")
    if o.oos_index is not None:
        text += f", or when its top class is {o.oos_label}; otherwise it assigns its top class, an in-scope intent."
    else:
        text += "; otherwise it assigns its top intent."
    if o.threshold <= 0:
        text += " A threshold of 0 rejects no utterance by its confidence."
    return text


def _source(o: OutOfScope) -> str:
    """The paragraph saying where tau came from and what it cost."""
    tau = fmt(o.threshold)
    if o.threshold_source == "public":
        return (f"tau = {tau} is public: it was set with --oos-threshold, reads no data and costs no privacy "
                "(its epsilon is 0).")
    q = fmt(o.quantile)
    if o.histogram_bins is None:
        return (f"tau = {tau} was chosen from the holdout evaluation's confidence histogram (the {q}-quantile, "
                "--oos-quantile), but holdout.json holds no histogram now, so the release cannot be described "
                f"here; the holdout examples' epsilon on record is {fmt(o.threshold_epsilon)} at delta "
                f"{fmt(o.delta)}.")
    exact = o.holdout_noise_at == "none" or o.noise_std_per_bin == 0
    noise = ("exact (the run is not private)" if exact else
             "with Gaussian noise on each bin" if o.noise_std_per_bin is None else
             f"with Gaussian noise of std {fmt(o.noise_std_per_bin)} on each bin of the released histogram")
    text = (f"tau = {tau} was chosen from the holdout evaluation (see \"Who the model serves\"): with its counts of "
            "correct predictions, it released a histogram of the max-softmax confidences of the devices' in-scope "
            f"holdout examples over {o.histogram_bins} public bins on [0, 1], {noise}. tau is the largest bin edge "
            f"below which the histogram counts at most a fraction {q} of the holdout examples it counts (their number, an "
            f"example count, or with an out-of-scope class the histogram's noised sum; its {q}-quantile, --oos-quantile "
            f"{q}), so that about a fraction {q} of in-scope holdout examples lie below it, up to "
            f"{'the bin width' if exact else 'the noise and the bin width'} (the test split's in-scope rejected rate is in the table).")
    if exact:
        return text + (" Nothing protects the holdout examples, and tau is a function of their exact confidences: its "
                       f"epsilon is {fmt(o.threshold_epsilon)}.")
    if o.threshold_epsilon is None:
        return text + " No delta is on record, so the release's epsilon is not computed."
    n = o.holdout_releases
    text += (" Choosing tau from the released histogram is post-processing, so the threshold costs nothing beyond that "
             f"release: its guarantee is the holdout examples', epsilon {fmt(o.threshold_epsilon)} at delta "
             f"{fmt(o.delta)}, composed over the {n} holdout release{'' if n == 1 else 's'} on record (noise "
             f"multiplier {fmt(o.noise_multiplier_release)} each, the count and the histogram together). It covers "
             "the holdout examples only: they never train, and the training examples, never evaluated, are "
             "unaffected by the threshold.")
    if o.reproducible_noise:
        text += (" This run used --reproducible-noise, so that noise can be regenerated from the seed in config.toml "
                 "and in fact no guarantee holds.")
    return text


def render(o: OutOfScope, doc: Doc) -> list[Block]:
    """Which utterances are out of scope, the rule, the threshold's origin and cost, and the test figures."""
    f = o.figures
    out: list[Block] = [("h", 2, "Out-of-scope detection"), ("p", _which(o)), ("p", _rule(o)), ("p", _source(o))]
    out.append(("p", f"All figures below are on the run's test split, scored with the final released model: "
                     f"{fmt(f.get('in_scope'))} in-scope and {fmt(f.get('out_of_scope'))} out-of-scope utterances. "
                     "The test split is not the devices' data (it is the split the per-round metrics are computed "
                     "on), so no private data is read for them and they cost no privacy."))
    rows = [
        ["in-scope accuracy", fmt(f.get("in_scope_accuracy")),
         "in-scope utterances accepted and given their intent"],
        ["closed-set accuracy", fmt(f.get("closed_set_accuracy")),
         "in-scope utterances whose top in-scope intent is right (no rejection)"],
        ["out-of-scope recall", fmt(f.get("oos_recall")), "out-of-scope utterances rejected"],
        ["out-of-scope precision", fmt(f.get("oos_precision")),
         "rejected utterances that are out of scope (n/a when none is rejected)"],
        ["overall accuracy", fmt(f.get("overall_accuracy")),
         "all utterances, out of scope counted as one more class"],
        ["in-scope rejected", fmt(f.get("in_scope_rejected")), "in-scope utterances rejected"],
        ["AUROC", fmt(f.get("auroc")),
         "threshold-free: the chance that an out-of-scope utterance has a lower confidence than an in-scope one "
         "(ties count half)"],
        ["in-scope utterances", fmt(f.get("in_scope")), "test utterances of the in-scope intents"],
        ["out-of-scope utterances", fmt(f.get("out_of_scope")), "test utterances out of scope"],
    ]
    out.append(("table", ["figure", "value", "what it measures"], rows))
    trade = o.trade_off
    if trade:
        out.append(("p", "The same released histogram gives a threshold at any other quantile (post-processing: no "
                         "further privacy cost). Scored on the test split, the trade-off between the two kinds of "
                         "error:"))
        out.append(("table", ["quantile", "threshold", "in-scope rejected", "in-scope accuracy", "out-of-scope recall",
                              "out-of-scope precision", "overall accuracy"],
                    [[fmt(t.get("quantile")), fmt(t.get("threshold")), fmt(t.get("in_scope_rejected")),
                      fmt(t.get("in_scope_accuracy")), fmt(t.get("oos_recall")), fmt(t.get("oos_precision")),
                      fmt(t.get("overall_accuracy"))] for t in trade]))
    return out


SECTION = Section("out_of_scope", OutOfScope, compute, render, keys=("out_of_scope",))
