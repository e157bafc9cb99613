"""The "Setting and threat model" section: where the noise is added, whom each unit trusts, what is released."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from report.blocks import Block, param
from report.context import Context, Facts
from report.sections.base import Doc, Section
from settings.config import as_recorded


@dataclass(frozen=True)
class Trust:
    """One unit's trust model: its ``name``, who is ``trusted``, and whom the guarantee ``holds_against``."""

    name: str
    trusted: str
    holds_against: str

    def to_json(self) -> dict[str, str]:
        """``{"name", "trusted", "holds_against"}``."""
        return {"name": self.name, "trusted": self.trusted, "holds_against": self.holds_against}


#: The trust model of each placement of the example-level noise (``noise_at`` in config.toml).
TRUST_MODELS: dict[str, Trust] = {
    "device": Trust(
        name="local DP: noise on the device (trusts nobody)",
        trusted="nobody",
        holds_against="everyone who sees a device's update: the server, the other devices and every "
                      "observer of the released models",
    ),
    "aggregate": Trust(
        name="central DP: noise on the aggregate (trusts the aggregator)",
        trusted="the aggregator (the server), to add the noise and not to look at the individual clipped sums",
        holds_against="observers of the released models, and an aggregator that sees the cohort but only the "
                      "noisy sum (as with secure aggregation with noise shares on the devices; dpfl simulates "
                      "the noise at the server)",
    ),
    "secure": Trust(
        name="distributed DP: noise shares on the devices, summed under secure aggregation (trusts the protocol "
             "and the dropout tolerance, not the server)",
        trusted="the server and the devices to follow the protocol (honest-but-curious: keys are not signed), and "
                "at most floor(f n) devices of a round's cohort of n to drop out or collude with the server "
                "(f: the dropout tolerance, dropout_tolerance in config.toml)",
        holds_against="the server, which sees only masked vectors and their masked sum, and devices colluding "
                      "with it (colluders know their own noise shares), as long as the devices that drop out or "
                      "collude number at most floor(f n) of the round's cohort; and every observer of the "
                      "released models",
    ),
}
#: The trust model of device-level DP (DP-FedAvg: the server clips each update and adds the noise).
DEVICE_TRUST_MODEL = Trust(
    name="central DP: DP-FedAvg on the server (trusts the aggregator)",
    trusted="the server, to clip each device's update and add the noise; it sees the individual updates",
    holds_against="observers of the released models",
)


@dataclass(frozen=True)
class TrustModels:
    """The trust model each privacy unit's guarantee assumes (None: that unit has no noise of its own)."""

    example: Trust | None
    device: Trust | None

    def to_json(self) -> dict[str, dict[str, str] | None]:
        """``{"example": trust | null, "device": trust | null}``."""
        return {"example": self.example.to_json() if self.example else None,
                "device": self.device.to_json() if self.device else None}


@dataclass(frozen=True)
class Setting:
    """Which DP ran where: the flags (as :class:`report.context.Facts`), where the noise came from
    (``noise_source``: ``"secret"``, ``"reproducible"`` or None without DP), each unit's trust model,
    and the run's config.toml (``config``, as read)."""

    facts: Facts
    noise_source: str | None
    trust_model: TrustModels
    config: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """``dp``, ``device_dp``, ``noise_at``, ``reproducible_noise``, ``noise_source``, ``trust_model``, ``config``."""
        f = self.facts
        return {"dp": f.dp_on, "device_dp": f.device_dp, "noise_at": f.noise_at,
                "reproducible_noise": f.reproducible_noise, "noise_source": self.noise_source,
                "trust_model": self.trust_model.to_json(), "config": self.config}


def compute(ctx: Context) -> Setting:
    """The setting of the run."""
    f = ctx.facts
    return Setting(facts=f, noise_source=("reproducible" if f.reproducible_noise else "secret") if f.any_dp else None,
                   trust_model=TrustModels(example=TRUST_MODELS.get(f.noise_at) if f.noise_at else None,
                                           device=DEVICE_TRUST_MODEL if f.device_dp else None),
                   config=ctx.cfg)


def render(s: Setting, doc: Doc) -> list[Block]:
    """The bullets: example-level noise and its trust model (:func:`_example_noise_items`),
    device-level noise (:func:`_device_noise_item`), the metadata the server sees, the noise
    source (:func:`_noise_source_item`), and that every round's model is covered."""
    run = s.facts
    out: list[Block] = [("h", 2, "Setting and threat model")]
    prior = _head_init_item(s.config)
    if not run.any_dp:
        fedsgd = as_recorded(s.config).get("noise_at") == "aggregate"  # (an old --no-dp was FedAvg)
        algorithm = ("FedSGD: each device sends the sum of its sampled examples' gradients, the server steps on "
                     "their mean" if fedsgd else "FedAvg of local training")
        out.append(("p", "No differential privacy: updates are neither clipped nor noised for privacy, and the "
                         f"server sees each device's update ({algorithm})." + (" " + prior if prior else "")))
        return out
    th = _example_noise_items(s)
    th.append(_device_noise_item(s))
    th.append("The server also sees activity counts (how many examples each device holds); these are "
              "metadata outside the guarantee.")
    th.append(_noise_source_item(run))
    if _bands(s.config) > 1:
        th.append(f"Cyclic selection (--bands {_bands(s.config)}): each device belonged to one of {_bands(s.config)} "
                  f"groups (ranked by examples held, dealt in snake order) and could be selected only in its group's "
                  f"rounds, one round in {_bands(s.config)}, so its rounds are at least {_bands(s.config)} apart, as "
                  "the correlated noise requires.")
    cap = s.config.get("participation_cap")
    if run.dp_on and cap and int(cap) < int(s.config.get("rounds") or 0):
        th.append(f"Participation cap: the example-level noise was calibrated for at most {int(cap)} of a "
                  "device's rounds (--participation-cap) instead of every round, and a device stopped joining "
                  "once its next round would have passed its budget (an individual privacy filter: the rule reads "
                  "only that device's own accounted epsilon, a function of its public example count).")
    if prior:
        th.append(prior)
    th.append("Everything released is covered: each round's global model is a function of the noisy "
              "aggregates up to that round, and epsilon composes every round, so all rounds' models "
              "(not only the last) are covered.")
    if run.device_dp:
        th.append("This report and the run directory are for the operator: they record which rounds each "
                  "device joined and the realised cohort sizes, which the device-level guarantee (for the "
                  "released models) does not cover.")
    out.append(("ul", th))
    return out


def _example_noise_items(s: Setting) -> list[str]:
    """Where example-level noise is added (on the device, on the aggregate, in shares under secure
    aggregation, or not at all) and its trust model.

    On the aggregate the server sees each device's clipped sum, so the run assumes it does not look;
    under secure aggregation it sees only masked vectors and their masked sum.
    """
    run, cfg = s.facts, s.config
    th = []
    ex_trust = s.trust_model.example
    if run.secure:
        th += _secure_items(cfg)
    elif run.dp_on and not run.aggregate and cfg.get("adaptive_clip_quantile") is not None and not run.device_dp:
        th.append(
            "Example-level noise is added on the device: each device trains with DP-SGD (per-example "
            "clipping to C, Gaussian noise of standard deviation sigma_g * C added to the summed clipped "
            "gradients of each Poisson-sampled batch, and of standard deviation sigma_b to the batch's centred "
            f"count of unclipped examples, which moves C towards the {param(cfg, 'adaptive_clip_quantile')} "
            "quantile of the gradient norms after every step: adaptive clipping, Andrew et al. 2021). The update "
            "and the final C that leave the device are already private for each of its examples; the next round "
            "starts from the geometric mean of the devices' final C.")
    elif run.dp_on and not run.aggregate:
        th.append(
            "Example-level noise is added on the device: each device trains with DP-SGD (per-example "
            "clipping to C, Gaussian noise of standard deviation sigma * C added to the summed clipped "
            "gradients of each Poisson-sampled batch). The update that leaves the device is already private "
            "for each of its examples.")
    elif run.aggregate and cfg.get("adaptive_clip_quantile") is not None:
        th.append(
            f"Example-level noise is added on the aggregate: each selected device Poisson-samples its examples "
            f"at rate p = {param(cfg, 'sample_rate')}, clips each example's gradient to the round's C and sends "
            "only the sum of the clipped gradients and its count of examples whose norm was at most C, centred "
            "(each counted as +-1/2, so the count bounds the device's realised sample count: at least twice its "
            "absolute value; no loss, no timing). The server adds Gaussian noise of "
            "standard deviation sigma_g * C once per round to the cohort's sum and of standard deviation sigma_b "
            "to the cohort's count, divides the sum by the expected number of sampled examples (the sum of p n_k "
            "over the cohort, from the public counts), takes a server optimizer step (strategy "
            f"{param(cfg, 'strategy')}), and moves C towards the {param(cfg, 'adaptive_clip_quantile')} quantile of "
            "the examples' gradient norms by the noisy count (adaptive clipping, Andrew et al. 2021). A device's "
            "clipped sum and count carry no noise of their own.")
    elif run.aggregate:
        th.append(
            f"Example-level noise is added on the aggregate: each selected device Poisson-samples its examples "
            f"at rate p = {param(cfg, 'sample_rate')}, clips each example's gradient to C and sends only the sum "
            "of the clipped gradients (no loss, no sample count, no timing). The server adds Gaussian noise of "
            + ("scale sigma * C once per round to the cohort's sum, correlated across rounds (row t of C^-1 z, "
               f"banded matrix factorization with {_bands(cfg)} bands: see the mechanism table; the server keeps the "
               f"last {_bands(cfg) - 1} noise rows secret, in memory only), divides by the expected number of "
               if _correlated(cfg) else
               "standard deviation sigma * C once per round to the cohort's sum, divides by the expected number of ")
            + ("sampled examples of a round averaged over a cycle of the groups ((1/b) sum_k q_k p n_k over all "
               "devices, from the public counts) and takes a server " if _bands(cfg) > 1 else
               "sampled examples (the sum of p n_k over the cohort, from the public counts) and takes a server ")
            + f"optimizer step (strategy {param(cfg, 'strategy')}). A device's clipped sum carries no noise of "
            "its own.")
    else:
        th.append("No example-level noise (dp = false): devices train without DP-SGD. The guarantee comes from "
                  "device-level DP alone.")
    if ex_trust:
        th.append(f"Trust model at example level: {ex_trust.name}. Trusted: {ex_trust.trusted}. "
                  f"The guarantee holds against {ex_trust.holds_against}."
                  + (" Here the server does see the individual clipped sums"
                     + (" and counts" if cfg.get("adaptive_clip_quantile") is not None and not run.device_dp else "")
                     + ": the run assumes it does not look at them." if run.aggregate else "")
                  + (f" Here f = {param(cfg, 'dropout_tolerance')}." if run.secure else ""))
    return th


def _secure_items(cfg: dict[str, Any]) -> list[str]:
    """What each device and the server do under ``--noise-at secure`` (mechanisms/secure.py), and when a
    round is abandoned."""
    k = cfg.get("secagg_neighbours")
    secagg = ("SecAgg+ (Bell et al. 2020): each device shares its secrets with its "
              f"{int(k)} neighbours on a ring (with every other device when the cohort has at most {int(k) + 1})"
              if k is not None else
              "SecAgg (Bonawitz et al. 2017): each device shares its secrets with every other device of the round")
    return [
        "Example-level noise is added on the devices, in shares, and summed under secure aggregation: each "
        "selected device clips the gradient of each of its examples to C (every example: p = 1, no sampling), "
        "rotates it (randomised Hadamard transform), scales it by gamma and rounds it to an integer vector of L2 "
        "norm at most Delta_2 (conditional randomised rounding, Kairouz, Liu & Steinke 2021), sums these, adds its "
        "own share of Skellam noise (variance mu / n_min per coordinate, mu = (sigma Delta_2)^2) and masks the "
        "result with pairwise masks from X25519 key agreement and a self mask, secret-shared (Shamir) so that the "
        f"sum survives drops. {secagg}. Besides public keys and encrypted shares, a device sends only its masked "
        f"vector: b = {param(cfg, 'secure_bits')} bits per coordinate, the sum taken mod 2^b.",
        "The server does not add noise and sees no device's clipped sum: it sees only the masked vectors and "
        "their masked sum. It unmasks the sum of the devices whose masked input arrived, decodes it (centre mod "
        "2^b, divide by gamma, rotate back), divides it by the number of examples the cohort holds (the sum of "
        "n_k over the cohort, from the public counts: the expected number of examples, with p = 1) and takes a server optimizer step (strategy "
        f"{param(cfg, 'strategy')}). A device's masked vector carries only its 1 / n_min share of the noise; "
        "it is hidden by the masks, not by its noise.",
        f"Dropouts: the noise is sized for n_min = n - floor(f n) devices of a round's cohort of n (f = "
        f"{param(cfg, 'dropout_tolerance')}, --dropout-tolerance). With at least n_min devices in the sum it "
        "carries Skellam noise of variance at least mu per coordinate: after decoding, a standard deviation of "
        "at least sigma C. A round in which fewer than n_min devices get their masked input in, or too few "
        "shares come back to unmask the sum, is abandoned: no noisy sum is released, the model is kept, and the "
        "round's privacy events stay in the ledger.",
    ]


def _device_noise_item(s: Setting) -> str:
    """Device-level noise added on the server and its trust model, or what the server sees without it."""
    run = s.facts
    if run.device_dp:
        return (
            ("Device-level noise is added on the server: each device's update is clipped to the round's norm S, "
             "Gaussian noise of standard deviation sigma_g * S is added to the sum and of standard deviation "
             "sigma_b to the count of updates that were not clipped (centred), and the noisy count moves S towards "
             f"the {param(s.config, 'adaptive_clip_quantile')} quantile of the update norms (adaptive clipping, "
             "Andrew et al. 2021). Trust model at device level: "
             if s.config.get("adaptive_clip_quantile") is not None else
             "Device-level noise is added on the server: each device's update is clipped to norm S and "
             + ("Gaussian noise of scale sigma_u * S, correlated across rounds (row t of C^-1 z, banded matrix "
                f"factorization with {_bands(s.config)} bands; the server keeps the last {_bands(s.config) - 1} noise "
                "rows secret, in memory only), is added to the sum. Trust model at device level: "
                if _correlated(s.config) else
                "Gaussian noise of standard deviation sigma_u * S is added to the sum. Trust model at device level: "))
            + f"{(s.trust_model.device or DEVICE_TRUST_MODEL).name}. The server is trusted to add this noise: it sees the individual "
            + ("(example-level-private) updates before aggregation" if run.dp_on
               else "updates before aggregation, which carry no noise of their own")
            + ". The guarantee holds against observers of the released models.")
    if run.secure:
        return ("No device-level noise: the server sees no device's individual update, only masked vectors and "
                "their masked sum, but the noise in the sum is sized for one example, not for all of a device's "
                "data, so a device's data as a whole is not protected.")
    return ("No device-level noise: the server sees each device's individual clipped gradient sum, "
            "which is not protected against it: only the noisy aggregate is (see the trust model)."
            if run.aggregate else "No device-level noise: the server sees each device's individual update, "
            "which is protected only at example level.")


def _head_init_item(cfg: dict[str, Any]) -> str | None:
    """How the intent head started (``head_init`` in config.toml; None for runs that predate it)."""
    how = cfg.get("head_init")
    if how == "label-names":
        source = (f"of the label descriptions in {cfg['label_descriptions']}" if cfg.get("label_descriptions")
                  else "of the label names")
        return (f"Initial model: the intent head started as a prototype classifier built from the pretrained "
                f"encoder's embeddings {source} (--head-init label-names): only the public label schema was "
                "read, no training example.")
    if how == "random":
        return "Initial model: the intent head started from a seeded random initialisation (--head-init random)."
    return None


def _noise_source_item(run: Facts) -> str:
    """Where the noise and the secret sampling decisions came from: the recorded seed (no guarantee) or a secret source."""
    if run.reproducible:
        return ("Noise source: derived from the seed in config.toml (--reproducible-noise), so the noise and "
                "the sampling decisions can be regenerated: no guarantee holds.")
    if run.secure:
        return ("Noise source: the Skellam noise and the rounding draws (on each device), the devices' secure "
                "aggregation keys and masks, and the cohort selection came from a secret source, a ChaCha20 "
                "generator keyed by operating-system entropy, that was never recorded. The seed in config.toml "
                "drives only partitioning, initialisation and data splits.")
    return ("Noise source: the noise and every sampling decision the accountant treats as random ("
            + ("example sampling" if run.aggregate else "Poisson batches" if run.dp_on else "")
            + (", " if run.dp_on else "") + "cohort selection, the Gaussian noise) came from a secret source, "
            "a ChaCha20 generator keyed by operating-system entropy, that was never recorded. The seed in "
            "config.toml drives only partitioning, initialisation and data splits.")


SECTION = Section("setting", Setting, compute, render,
                  keys=("dp", "device_dp", "noise_at", "reproducible_noise", "noise_source", "trust_model", "config"))


def _bands(cfg: dict) -> int:
    """b of correlated noise across rounds (``--bands``; 1: independent noise each round)."""
    return int(cfg.get("bands") or 1)


def _correlated(cfg: dict) -> bool:
    """The server's noise was correlated across rounds (``--bands`` > 1 with ``--bands-noise correlated``)."""
    return _bands(cfg) > 1 and (cfg.get("bands_noise") or "correlated") == "correlated"
