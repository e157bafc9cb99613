"""The one typed run configuration (RunConfig) and its validation.

Every way of starting a run maps into :class:`RunConfig`: the ``dpfl`` CLI (``dpfl simulate``),
Flower's own runner (``flwr run .`` reads ``[tool.flwr.app.config]`` from pyproject.toml, whose
keys are the field names with dashes and whose values are RunConfig's defaults, checked by
tests/test_config.py), and a resumed run (``config.toml`` in the run directory). Nothing else
holds run settings.

Each field carries in its metadata its help text, its setting group (one of
:data:`dpfl.commands.flags.GROUPS`) and, when its valid values are a fixed set, their choices
(``field(..., metadata={"help": ..., "group": ..., "choices": ...})``); the CLI flags are generated
from the fields, group by group (:func:`dpfl.commands.flags.add_config_args`).

This is the bottom layer: it imports nothing of the project.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import tomli_w

SELECTIONS = ("uniform", "activity")
STRATEGIES = ("auto", "fedavg", "fedprox", "fedadam")
#: The example-level target when neither --noise-multiplier nor --target-epsilon is given.
DEFAULT_TARGET_EPSILON = 8.0
#: The adaptive round deadline (``round_timeout`` unset): the longest any round waits, in seconds ...
ROUND_TIMEOUT_CAP = 3600.0
#: ... the stragglers' allowance once half the cohort has replied, as a multiple of the time that took ...
ROUND_TIMEOUT_FACTOR = 10.0
#: ... and never less than this many seconds.
ROUND_TIMEOUT_FLOOR = 30.0
#: ``dpfl audit``'s sampled candidates per canary for exposure (here, so that ``dpfl audit --help``
#: needs no heavy import): with all-MiniLM-L6-v2 on 2 busy CPU cores about 5 s per canary (20
#: canaries: under 2 minutes); resolves exposures up to ~log2(10**4/1000) = 3.3 bits reliably
#: (beyond that the estimate saturates at log2 N).
AUDIT_EXPOSURE_SAMPLES = 1000

PARTITIONERS = ("auto", "iid", "dirichlet", "quantity", "quantity-label", "cluster", "natural")
ACCOUNTANTS = ("pld", "rdp")
DP_ENGINES = ("dpfl", "opacus")
OPTIMIZERS = ("sgd", "adamw")
TASKS = ("intent", "slots", "joint")
SETTINGS = ("static", "continual")
NOISE_PLACEMENTS = ("device", "aggregate", "secure")
FAULT_KINDS = ("mixed", "raise", "hang", "nan", "shape")
HEAD_INITS = ("auto", "label-names", "random")


class ConfigError(ValueError):
    """A run setting is invalid; the message names the setting (as its CLI flag) and a fix."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_trainable(spec: str) -> int | None:
    """Parse a ``--trainable`` setting into the number of top encoder layers that train.

    Returns ``None`` for ``"all"`` (every parameter, embeddings included), ``0`` for ``"head"``
    (task heads only, the encoder frozen: a private linear probe on the pretrained features),
    and ``N`` for ``"topN"`` (the heads and the last N transformer layers). Whether the model
    has N layers is checked where the model is known (``dpfl simulate``'s preflight).

    Raises
    ------
    ValueError
        If ``spec`` is none of these.
    """
    s = str(spec).strip().lower()
    if s == "all":
        return None
    if s == "head":
        return 0
    if s.startswith("top") and s[3:].isdigit() and int(s[3:]) >= 1:
        return int(s[3:])
    raise ValueError(f"must be 'all', 'head' or 'topN' (N >= 1 top encoder layers), got {spec!r}")


#: Settings only the server reads; a device's messages carry every other field
#: (:meth:`RunConfig.device_settings`), so a device is not sent the run directory, the budget and
#: target settings, the selection rule, the deletion requests or the server optimizer (it does get
#: the calibrated noise multiplier, sample rate, rounds and delta its mechanism needs).
SERVER_ONLY = frozenset({
    "run_id", "run_dir", "eval_every", "extra",
    "release_every", "baseline_model", "deletions", "round_checkpoints", "holdout_noise_multiplier",
    "oos_threshold", "oos_quantile",
    "cohort_size", "selection", "activity_exponent", "selection_constant",
    "target_epsilon", "max_epsilon", "target_epsilon_device",
    "strategy", "server_learning_rate", "server_ema", "server_lr_schedule",
    "ray_address", "simulation_nodes", "bands", "bands_noise",
})

#: Flower SuperNodes a simulation runs by default (at most one per device). Flower's simulation
#: engine keeps a context per node and scans every node for messages ten times a second, so one
#: node per device costs memory and time in proportion to the population (0.29 s per device task
#: at 100,000 devices); a few dozen nodes keep every actor busy (benchmarks/population_scale.py).
SIMULATION_NODES = 32


@dataclass(frozen=True)
class RunConfig:
    """All settings of one run, as the user gave them (frozen: nothing changes them in place).

    The values derived from them (delta, a calibrated noise multiplier, the server learning rate)
    are resolved once into a new RunConfig by :func:`server.plan.resolve`; each field belongs to
    one setting group (:meth:`group`).

    Units: ``learning_rate`` per optimizer step; ``batch_size`` is the *expected* Poisson
    batch size (examples); ``target_delta`` is the delta at which every epsilon is stated
    (``None``: chosen from the data set size, see :meth:`resolve_delta`); epsilons are at
    that delta. ``cohort_size`` is the *expected* number of devices per round.
    """

    # run
    run_id: str = field(default="", metadata={"help": "name of the run (default: a timestamp)", "group": "run"})
    run_dir: str = field(default="", metadata={"help": "run directory (default: runs/<timestamp>)", "group": "run"})
    seed: int = field(
        default=0,
        metadata={"help": "seed of partitioning, initialization and splits (never of the noise or the sampling)",
                  "group": "run"},
    )
    rounds: int = field(default=30, metadata={"help": "number of federated rounds", "group": "run"})
    eval_every: int = field(
        default=1,
        metadata={"help": "evaluate the global model every N rounds (and after the last)", "group": "run"},
    )
    release_every: int | None = field(
        default=None,
        metadata={"help": "mark every R-th round's model (and the last) as a release, evaluated with its negative "
                          "and positive flip rates against the previous release (default: the evaluation rounds)",
                  "group": "audit"},
    )
    baseline_model: str | None = field(
        default=None,
        metadata={"help": "a model the user already ships (a state dict .pt of the run's model, e.g. another run's "
                          "checkpoints/global.pt): every release's flip rates are also given against it "
                          "(default: none)",
                  "group": "audit"},
    )
    # data and devices
    data_dir: str | None = field(
        default=None,
        metadata={"help": "folder with train.jsonl and test.jsonl of {text, label} (default: the built-in synthetic "
                          "home-assistant set, unless --dataset is given)", "group": "data"},
    )
    dataset: str | None = field(default=None, metadata={"help": "Hugging Face hub dataset name, needs network "
                                                                "(default: none; see --data-dir)",
                                                        "group": "data"})
    text_column: str = field(default="text", metadata={"help": "column holding the utterance text", "group": "data"})
    label_column: str = field(default="label", metadata={"help": "column holding the intent label", "group": "data"})
    max_examples: int | None = field(
        default=None,
        metadata={"help": "cap the training set at K examples (quick runs) (default: no cap)", "group": "data"},
    )
    num_devices: int = field(default=20, metadata={"help": "number of simulated devices", "group": "data"})
    partitioner: str = field(
        default="auto",
        metadata={"help": "auto (natural device column if present, else iid) | iid | dirichlet (label skew) | "
                          "quantity (power-law sizes) | quantity-label (both) | cluster (feature skew) | natural",
                  "group": "data", "choices": PARTITIONERS},
    )
    dirichlet_alpha: float = field(
        default=0.5,
        metadata={"help": "Dirichlet concentration for label skew (smaller = more skew)", "group": "data"},
    )
    quantity_beta: float = field(
        default=1.5,
        metadata={"help": "Pareto tail index of device sizes for --partitioner quantity / quantity-label (smaller = "
                          "heavier tail)", "group": "data"},
    )
    device_column: str = field(
        default="device",
        metadata={"help": "column holding the device/user id for --partitioner natural", "group": "data"},
    )
    num_clusters: int = field(
        default=10,
        metadata={"help": "k-means clusters of sentence embeddings for --partitioner cluster", "group": "data"},
    )
    setting: str = field(
        default="static",
        metadata={"help": "static (all data at once) | continual (examples arrive over rounds)",
                  "group": "data", "choices": SETTINGS},
    )
    storage_cap: int | None = field(
        default=None,
        metadata={"help": "continual: a device keeps at most this many examples, deleting its oldest first "
                          "(default: no cap)",
                  "group": "data"},
    )
    oos_label: str | None = field(
        default=None,
        metadata={"help": "the label that marks out-of-scope utterances (e.g. CLINC150's oos): its test utterances "
                          "are scored as out of scope, and where the training data has it, it is a class the model "
                          "learns (oos-train) (default: none)", "group": "data"},
    )
    oos_holdout_intents: float = field(
        default=0.0,
        metadata={"help": "hold out this fraction of the intents as out of scope (Zhang et al. 2021): their "
                          "training utterances are dropped and their test utterances scored as out of scope; which "
                          "intents is fixed by --oos-split-seed", "group": "data"},
    )
    oos_split_seed: int = field(
        default=0,
        metadata={"help": "seed of the choice of held-out intents (--oos-holdout-intents; public, apart from --seed "
                          "so that every run of a benchmark holds out the same intents)", "group": "data"},
    )
    # selection
    cohort_size: float = field(default=5.0, metadata={"help": "expected number of devices per round",
                                                      "group": "selection"})
    selection: str = field(
        default="activity",
        metadata={"help": "uniform | activity (Poisson with q_k = min(1, c a_k^alpha))",
                  "group": "selection", "choices": SELECTIONS},
    )
    activity_exponent: float = field(default=1.0, metadata={"help": "alpha in q_k = min(1, c a_k^alpha)",
                                                            "group": "selection"})
    selection_constant: float | None = field(
        default=None,
        metadata={"help": "set c directly (default: calibrated from --cohort-size)", "group": "selection"},
    )
    # model
    task: str = field(
        default="intent",
        metadata={"help": "intent | slots (BIO slot filling) | joint (intent + slots, one encoder)",
                  "group": "model", "choices": TASKS},
    )
    slot_loss_weight: float = field(default=1.0, metadata={"help": "joint loss = intent loss + w * slot loss",
                                                           "group": "model"})
    pc_weight: float = field(
        default=0.0,
        metadata={"help": "positive-congruent training: weight of the focal distillation term towards the previous "
                          "release on the examples it got right (Yan et al. 2021), inside the per-example loss "
                          "that DP-SGD clips (0: off; intent and joint tasks)", "group": "audit"},
    )
    model: str = field(
        default="minilm",
        metadata={"help": "'minilm' (all-MiniLM-L6-v2, offline), 'tiny' (random small BERT) or a HF name/path",
                  "group": "model"},
    )
    max_length: int = field(default=32, metadata={"help": "maximum tokens per utterance", "group": "model"})
    pooling: str = field(
        default="mean",
        metadata={"help": "mean (mean-pooled token states) | cls (transformers' classification head)",
                  "group": "model", "choices": ("mean", "cls")},
    )
    head_init: str = field(
        default="auto",
        metadata={"help": "how the intent head starts: label-names (a prototype classifier from the encoder's "
                          "embeddings of the label names, or of --label-descriptions: the public label schema "
                          "only, no training example) | random (seeded) | auto (label-names when the labels are "
                          "text, the task is intent and --pooling mean; else random)",
                  "group": "model", "choices": HEAD_INITS},
    )
    label_descriptions: str | None = field(
        default=None,
        metadata={"help": "a JSON file {label: public description} that --head-init label-names embeds instead of "
                          "the label names (default: none, the names themselves)", "group": "model"},
    )
    trainable: str = field(
        default="head",
        metadata={"help": "which parameters train: all (embeddings included) | head (frozen encoder) | topN (head + "
                          "last N layers) | lora (LoRA adapters + head, through peft)", "group": "model"},
    )
    lora_rank: int = field(default=8, metadata={"help": "--trainable lora: rank r of each adapter", "group": "model"})
    lora_alpha: float = field(default=16.0, metadata={"help": "--trainable lora: scaling alpha (the update is alpha/r * B A)",
                                                      "group": "model"})
    lora_targets: str = field(
        default="",
        metadata={"help": "--trainable lora: comma-separated module names to adapt (default: the attention query and value)",
                  "group": "model"},
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "--trainable lora: dropout on the adapter input",
                                                       "group": "model"})
    # local training
    local_epochs: int = field(
        default=1,
        metadata={"help": "local epochs per round (expected passes under Poisson sampling)", "group": "local_training"},
    )
    batch_size: int = field(default=32, metadata={"help": "expected (Poisson) batch size", "group": "local_training"})
    physical_batch_size: int = field(default=64, metadata={"help": "largest micro-batch held in memory at once",
                                                           "group": "local_training"})
    optimizer: str = field(default="adamw", metadata={"help": "local optimizer: sgd | adamw",
                                                      "group": "local_training", "choices": OPTIMIZERS})
    learning_rate: float = field(
        default=1e-4,
        metadata={"help": "local optimizer step size of the encoder (the head's is --head-learning-rate)",
                  "group": "local_training"},
    )
    head_learning_rate: float | None = field(
        default=1e-2,
        metadata={"help": "local optimizer step size of the freshly initialised classification head",
                  "group": "local_training"},
    )
    # example-level DP (DP-SGD on the device, or noise on the aggregate)
    dp: bool = field(
        default=True,
        metadata={"help": "example-level DP (--no-dp trains without it: the non-private baseline)",
                  "group": "example_privacy"},
    )
    noise_at: str = field(
        default="aggregate",
        metadata={"help": "where the example-level noise is added: device (local DP-SGD at every step; trusts nobody) | "
                          "aggregate (each device sends its clipped gradient sum, the server adds the noise once per "
                          "round to the cohort's sum; trusts the aggregator) | secure (each device quantises its "
                          "clipped gradients, adds its share of Skellam noise and masks the result with secure "
                          "aggregation, SecAgg+; the server sees only the masked sum)",
                  "group": "example_privacy", "choices": NOISE_PLACEMENTS},
    )
    sample_rate: float = field(
        default=1.0,
        metadata={"help": "--noise-at aggregate: probability p with which a selected device includes each of its "
                          "examples in the round's clipped sum (Poisson)", "group": "example_privacy"},
    )
    reproducible_noise: bool = field(
        default=False,
        metadata={"help": "derive the noise and the secret sampling from --seed (tests and debugging): the run is "
                          "NOT private and its report says so; replies are summed in device order", "group": "run"},
    )
    dp_engine: str = field(default="dpfl", metadata={"help": "opacus | dpfl",
                                                     "group": "example_privacy", "choices": DP_ENGINES})
    noise_multiplier: float | None = field(
        default=None,
        metadata={"help": "sigma: noise std / max_grad_norm (default: calibrated for --target-epsilon, which is "
                          f"{DEFAULT_TARGET_EPSILON:g} when neither is given)", "group": "example_privacy"},
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "C: per-example clipping norm",
                                                        "group": "example_privacy"})
    target_epsilon: float | None = field(
        default=None,
        metadata={"help": "calibrate --noise-multiplier so that no device's example-level epsilon can exceed this "
                          f"(default: {DEFAULT_TARGET_EPSILON:g} when --noise-multiplier is not given)",
                  "group": "example_privacy"},
    )
    target_delta: float | None = field(
        default=None,
        metadata={"help": "delta for every epsilon (default: power of ten <= 1/(10 N))", "group": "example_privacy"},
    )
    accountant: str = field(default="pld", metadata={"help": "pld (tight) | rdp",
                                                     "group": "example_privacy", "choices": ACCOUNTANTS})
    # device-level DP (DP-FedAvg on the server) and budgets
    device_dp: bool = field(
        default=False,
        metadata={"help": "device-level DP: clip each device's update and add noise on the server (DP-FedAvg)",
                  "group": "device_privacy"},
    )
    update_clip_norm: float = field(
        default=1.0,
        metadata={"help": "S: L2 bound on each device's update (device-level DP)", "group": "device_privacy"},
    )
    device_noise_multiplier: float | None = field(
        default=None,
        metadata={"help": "sigma_u: server noise std / S (device-level DP; default: calibrated for "
                          "--target-epsilon-device when it is given, else 1.0)", "group": "device_privacy"},
    )
    allow_zero_noise: bool = field(
        default=False,
        metadata={"help": "testing only: accept a noise multiplier of 0 with DP on (clipping without noise); the "
                          "run is NOT private (epsilon infinity) and its report says so first",
                  "group": "example_privacy"},
    )
    target_epsilon_device: float | None = field(
        default=None,
        metadata={"help": "device-level epsilon budget per device (needs --device-dp) (default: none: no device-level "
                          "budget, the noise is --device-noise-multiplier)", "group": "device_privacy"},
    )
    participation_cap: int | None = field(
        default=None,
        metadata={"help": "rounds a device may join: the example-level noise is calibrated for this many of a "
                          "device's rounds instead of --rounds, and each device stops joining once its next round "
                          "would pass its budget (an individual privacy filter: after this many rounds for the device "
                          "that needs the most noise; default: none, calibrated for a device that joins every round)",
                  "group": "example_privacy"},
    )
    secure_bits: int = field(
        default=20,
        metadata={"help": "--noise-at secure: bits b per coordinate on the wire (the sum is taken mod 2^b; 8 to 32)",
                  "group": "example_privacy"},
    )
    dropout_tolerance: float = field(
        default=0.1,
        metadata={"help": "--noise-at secure: the fraction f of a round's cohort that may drop out (or collude with "
                          "the server) with the noise still at its calibrated variance: each device adds the noise "
                          "share of n - floor(f n) devices; a round with more drops is abandoned (in [0, 0.5))",
                  "group": "example_privacy"},
    )
    secagg_neighbours: int | None = field(
        default=None,
        metadata={"help": "--noise-at secure: each device shares its secrets and masks with this many neighbours on "
                          "a ring (SecAgg+, Bell et al. 2020; even, >= 2), raised each round to at least twice the "
                          "tolerated drops, floor(f n), so that drops never split the survivors; default: with every "
                          "other device of the round (SecAgg)", "group": "example_privacy"},
    )
    bands: int = field(
        default=1,
        metadata={"help": "correlated noise across rounds: banded matrix factorization (BandMF) with this many bands "
                          "b (Choquette-Choo et al. 2023; the strategy and its accounting from jax-privacy), for the "
                          "server's noise (--noise-at aggregate, or --device-dp's): each round's noise is row t of "
                          "C^-1 z for the optimised b-banded Toeplitz strategy C, and selection is cyclic: device k "
                          "may join only the rounds of its group, one round in b (b groups of about equal data, "
                          "ranked by examples held and dealt in snake order; so a device joins at most "
                          "ceil(rounds / b) rounds and is accounted for those); 1 (default): independent noise each "
                          "round (DP-SGD)", "group": "example_privacy"},
    )
    bands_noise: str = field(
        default="correlated",
        metadata={"help": "with --bands: 'correlated' (banded matrix factorization) or 'independent' (the cyclic "
                          "selection and its accounting with a fresh Gaussian each round: the ablation of the "
                          "correlation)", "group": "example_privacy", "choices": ("correlated", "independent")},
    )
    adaptive_clip_quantile: float | None = field(
        default=None,
        metadata={"help": "adaptive clipping: move the clip norm each round towards this quantile gamma of the norms "
                          "it clips (C of each example's gradient: on the aggregate, or after every local step on each "
                          "device; S of each device's update with --device-dp), from --max-grad-norm / "
                          "--update-clip-norm, by a noised count of the "
                          "unclipped norms that is accounted in the same event (Andrew et al. 2021; default: none, a "
                          "fixed clip norm)", "group": "example_privacy"},
    )
    adaptive_clip_lr: float = field(
        default=0.2,
        metadata={"help": "adaptive clipping: eta_C of the geometric update C <- C exp(-eta_C (b - gamma)), b the "
                          "noised fraction of unclipped norms", "group": "example_privacy"},
    )
    clipped_count_stddev: float | None = field(
        default=None,
        metadata={"help": "adaptive clipping: sigma_b, std of the Gaussian noise on the count of unclipped norms "
                          "(each counted as +-1/2); the clipped sum's noise multiplier becomes "
                          "(sigma^-2 - (2 sigma_b)^-2)^-1/2 so that the round's event stays the one of sigma "
                          "(default: 5 sigma, so that (2 sigma_b)^-2 is a hundredth of sigma^-2)", "group": "example_privacy"},
    )
    max_epsilon: float | None = field(
        default=None,
        metadata={"help": "example-level epsilon budget per device: a device is not selected once its next round "
                          "would exceed it (default: --target-epsilon when given, else none)",
                  "group": "example_privacy"},
    )
    # privacy audit: canaries inserted into devices' training data (audit, partitions.population)
    canaries: int = field(
        default=0,
        metadata={"help": "privacy audit: insert M canary utterances (secret digits), each included with probability "
                          "1/2", "group": "audit"},
    )
    canary_repeats: int = field(default=1, metadata={"help": "copies of each included canary (all on one device)",
                                                     "group": "audit"})
    deletions: str | None = field(
        default=None,
        metadata={"help": "deletion requests: a text file of lines 'DEVICE_ID ROUND'; from that round the device's "
                          "data is gone and it is never selected again (the ledger records each request; turns on "
                          "--round-checkpoints so that `dpfl retrain` can remove it exactly) (default: none)",
                  "group": "audit"},
    )
    round_checkpoints: bool = field(
        default=False,
        metadata={"help": "keep every round's trainable parameters and server state (checkpoints/rounds/), "
                          "which `dpfl retrain --from-round T` starts from", "group": "audit"},
    )
    holdout_per_device: float = field(
        default=0.0,
        metadata={"help": "keep each example out of training with probability F (per example, seeded); after the "
                          "last round every device evaluates the final model on its held-out examples and accuracy is "
                          "reported by activity quartile (the correct counts are noised and accounted)",
                  "group": "audit"},
    )
    holdout_noise_multiplier: float = field(
        default=2.0,
        metadata={"help": "std of the Gaussian noise on each released holdout correct count, in units of its "
                          "sensitivity (one example changes a count by 1); on each device's count with the noise on "
                          "the device, once on each quartile's sum with the noise on the aggregate", "group": "audit"},
    )
    oos_threshold: float | None = field(
        default=None,
        metadata={"help": "out-of-scope detection: reject an utterance whose max-softmax confidence is below this "
                          "public threshold (default: chosen from the devices' holdout examples, see --oos-quantile; "
                          "needs --holdout-per-device)", "group": "audit"},
    )
    oos_quantile: float = field(
        default=0.05,
        metadata={"help": "out-of-scope detection: the threshold is the Q-quantile of the holdout examples' "
                          "confidences, released as a histogram with Gaussian noise of std --holdout-noise-multiplier "
                          "per bin and accounted with the holdout (about Q of in-scope utterances are rejected)",
                  "group": "audit"},
    )
    # aggregation
    strategy: str = field(
        default="auto",
        metadata={"help": "auto (fedadam with --noise-at aggregate, else fedavg) | fedavg | fedprox | fedadam",
                  "group": "server_optimizer", "choices": STRATEGIES},
    )
    proximal_mu: float = field(
        default=0.01,
        metadata={"help": "mu of FedProx's proximal term (mu/2 ||w - w_global||^2 in the local loss)",
                  "group": "server_optimizer"},
    )
    server_learning_rate: float | None = field(
        default=None,
        metadata={"help": "server step size: FedAdam's eta (default 0.2); with fedavg, the SGD step on the noisy mean "
                          "gradient of --noise-at aggregate (default 0.2) or on the noisy mean update of --device-dp "
                          "(default 1.0: plain FedAvg)", "group": "server_optimizer"},
    )
    server_ema: float = field(
        default=0.9,
        metadata={"help": "release the exponential moving average of the global models with this decay (0: off; "
                          "post-processing, no privacy cost)", "group": "server_optimizer"},
    )
    server_lr_schedule: str = field(
        default="constant",
        metadata={"help": "server learning-rate schedule over the rounds: constant | cosine (decays towards 0)",
                  "group": "server_optimizer", "choices": ("constant", "cosine")},
    )
    # simulation resources
    client_cpus: float = field(
        default=1.0,
        metadata={"help": "CPUs per simulated device (Ray resources; fractions allowed)", "group": "resources"},
    )
    client_gpus: float = field(default=0.0, metadata={"help": "GPUs per simulated device (fractions allowed)",
                                                      "group": "resources"})
    ray_address: str | None = field(
        default=None,
        metadata={"help": "address of an existing Ray cluster to run on (set by dpfl launch --address)",
                  "group": "resources"},
    )
    simulation_nodes: int | None = field(
        default=None,
        metadata={"help": "Flower SuperNodes of the simulation; the devices take them in turn, so a node trains "
                          "whichever device a message names (default: min(num_devices, "
                          f"{SIMULATION_NODES})); memory and message-routing time grow with it, not with the "
                          "population", "group": "resources"},
    )
    # reliability: round deadline and injected device faults (testing)
    round_timeout: float | None = field(
        default=None,
        metadata={"help": "seconds a round waits for the cohort's replies before it goes on without the missing "
                          "ones (default: adaptive: once half the cohort has replied, the rest get 10 times as long "
                          "as that took, at least 30 s, at most an hour); changeable on --resume",
                  "group": "reliability"},
    )
    fault_rate: float = field(
        default=0.0,
        metadata={"help": "testing: probability that a selected device fails its round with an injected fault",
                  "group": "reliability"},
    )
    fault_kind: str = field(
        default="mixed",
        metadata={"help": "testing: the injected fault: mixed | raise | hang | nan | shape",
                  "group": "reliability", "choices": FAULT_KINDS},
    )
    extra: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "settings of extensions (not a CLI flag)", "group": "run"},
    )

    # ------------------------------------------------------------------ validation
    def validate(self) -> "RunConfig":
        """Check every setting; raise :class:`ConfigError` naming the flag to change."""

        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{_flag(name)}: {msg}")

        need(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        need(self.num_devices >= 1, "num_devices", f"must be >= 1, got {self.num_devices}")
        need(self.cohort_size > 0, "cohort_size", f"must be > 0, got {self.cohort_size}")
        need(
            self.cohort_size <= self.num_devices,
            "cohort_size",
            f"expected cohort size {self.cohort_size:g} exceeds the number of devices "
            f"{self.num_devices}; lower --cohort-size or raise --num-devices",
        )
        need(self.selection in SELECTIONS, "selection", f"must be one of {SELECTIONS}")
        need(self.activity_exponent >= 0, "activity_exponent", "alpha must be >= 0")
        need(
            self.selection_constant is None or self.selection_constant > 0,
            "selection_constant",
            "must be > 0",
        )
        need(self.partitioner in PARTITIONERS, "partitioner", f"must be one of {PARTITIONERS}")
        need(self.dirichlet_alpha > 0, "dirichlet_alpha", "must be > 0")
        need(self.strategy in STRATEGIES, "strategy", f"must be one of {STRATEGIES}")
        need(self.accountant in ACCOUNTANTS, "accountant", f"must be one of {ACCOUNTANTS}")
        need(self.dp_engine in DP_ENGINES, "dp_engine", f"must be one of {DP_ENGINES}")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}")
        need(self.task in TASKS, "task", f"must be one of {TASKS}")
        need(self.slot_loss_weight >= 0, "slot_loss_weight", f"must be >= 0, got {self.slot_loss_weight}")
        need(self.pc_weight >= 0 and math.isfinite(self.pc_weight), "pc_weight",
             f"must be a finite number >= 0, got {self.pc_weight}")
        need(not (self.pc_weight > 0 and self.task == "slots"), "pc_weight",
             "the slots task has no intent prediction to keep congruent; use --task joint or intent, or drop --pc-weight")
        need(self.setting in SETTINGS, "setting", f"must be one of {SETTINGS}")
        need(self.storage_cap is None or self.storage_cap >= 1, "storage_cap", "must be >= 1")
        need(
            self.storage_cap is None or self.setting == "continual",
            "storage_cap",
            "applies to --setting continual only",
        )
        need(self.num_clusters >= 1, "num_clusters", "must be >= 1")
        need(self.pooling in ("mean", "cls"), "pooling", "must be 'mean' or 'cls'")
        need(self.head_init in HEAD_INITS, "head_init", f"must be one of {HEAD_INITS}")
        need(self.dp or self.device_dp or self.noise_at != "aggregate" or self.dp_engine == "dpfl", "dp_engine",
             "--no-dp with the aggregate placement sums unclipped gradients with the dpfl engine; use --dp-engine dpfl "
             "(or --noise-at device)")
        need(self.participation_cap is None or self.participation_cap >= 1, "participation_cap", "must be >= 1")
        need(self.participation_cap is None or (self.dp and self.resolved_target_epsilon() is not None),
             "participation_cap", "calibrates the example-level noise for a target: needs example-level DP and "
             "--target-epsilon (or its default, without --noise-multiplier)")
        need(self.head_init != "label-names" or (self.pooling == "mean" and self.task == "intent"), "head_init",
             "label-names initialises the intent head on mean-pooled features: needs --task intent and --pooling mean "
             "(or use --head-init random)")
        need(self.label_descriptions is None or self.head_init != "random", "label_descriptions",
             "is read only by --head-init label-names (or auto)")
        if self.trainable.strip().lower() != "lora":
            try:
                parse_trainable(self.trainable)
            except ValueError as exc:
                need(False, "trainable", str(exc).replace("or 'topN'", "'topN'") + " (or 'lora')")
        need(self.noise_multiplier is None or self.noise_multiplier >= 0, "noise_multiplier",
             f"must be >= 0, got {self.noise_multiplier}")
        need(not (self.dp and self.noise_multiplier == 0 and not self.allow_zero_noise), "noise_multiplier",
             "0 with DP on adds no noise and gives no privacy (epsilon infinity): give a value > 0 or "
             "--target-epsilon, train without DP (--no-dp), or pass --allow-zero-noise for a clipped, "
             "non-private run")
        need(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.physical_batch_size >= 1, "physical_batch_size", "must be >= 1")
        need(self.local_epochs >= 1, "local_epochs",
             f"must be >= 1, got {self.local_epochs} (with 0 no device would train)")
        need(self.learning_rate > 0, "learning_rate", "must be > 0")
        need(self.head_learning_rate is None or self.head_learning_rate > 0, "head_learning_rate", "must be > 0")
        need(self.max_length >= 4, "max_length", "must be >= 4")
        need(self.eval_every >= 1, "eval_every", "must be >= 1")
        need(self.release_every is None or self.release_every >= 1, "release_every", "must be >= 1")
        need(0 <= self.holdout_per_device < 1, "holdout_per_device", f"must be in [0, 1), got {self.holdout_per_device}")
        need(self.holdout_noise_multiplier > 0 or (self.holdout_noise_multiplier == 0 and (not self.dp or self.allow_zero_noise)),
             "holdout_noise_multiplier", f"must be > 0 in a private run, got {self.holdout_noise_multiplier}")
        need(not (self.holdout_per_device > 0 and self.device_dp), "holdout_per_device",
             "is not built for --device-dp: a device-level guarantee would need noise scaled to a whole device's "
             "holdout; use example-level DP (--noise-at device or aggregate) or drop --holdout-per-device")
        need(0 <= self.oos_holdout_intents < 1, "oos_holdout_intents", f"must be in [0, 1), got {self.oos_holdout_intents}")
        need(0 < self.oos_quantile < 1, "oos_quantile", f"must be in (0, 1), got {self.oos_quantile}")
        need(self.oos_threshold is None or 0 <= self.oos_threshold <= 1, "oos_threshold",
             f"must be a max-softmax confidence in [0, 1], got {self.oos_threshold}")
        if self.out_of_scope:
            need(self.task == "intent", "oos_label" if self.oos_label else "oos_holdout_intents",
                 f"out-of-scope detection is built for --task intent, not {self.task!r}")
            need(self.oos_holdout_intents == 0 or self.data_dir is not None or self.dataset is not None,
                 "oos_holdout_intents", "holds out intents of a real data set: give --data-dir or --dataset (the "
                 "built-in set is generated device by device)")
            need(self.oos_threshold is not None or self.holdout_per_device > 0, "oos_threshold",
                 "is chosen from the devices' holdout examples by default: set --holdout-per-device F (e.g. 0.1) "
                 "or give a public threshold --oos-threshold T")
        else:
            need(self.oos_threshold is None, "oos_threshold",
                 "needs out-of-scope test utterances: name their label (--oos-label) or hold out intents "
                 "(--oos-holdout-intents F)")
        need(self.max_examples is None or self.max_examples >= 1, "max_examples", "must be >= 1")
        need(
            self.target_delta is None or 0 < self.target_delta < 1,
            "target_delta",
            f"must be in (0, 1), got {self.target_delta}",
        )
        need(
            self.target_epsilon is None or self.target_epsilon > 0,
            "target_epsilon",
            "must be > 0",
        )
        need(
            not (self.data_dir and self.dataset),
            "data_dir",
            "give either --data-dir or --dataset, not both",
        )
        need(self.noise_at in NOISE_PLACEMENTS, "noise_at", f"must be one of {NOISE_PLACEMENTS}")
        need(self.server_lr_schedule in ("constant", "cosine"), "server_lr_schedule", "must be 'constant' or 'cosine'")
        need(0 <= self.server_ema < 1, "server_ema", f"must be in [0, 1), got {self.server_ema}")
        need(0 < self.sample_rate <= 1, "sample_rate", f"must be in (0, 1], got {self.sample_rate}")
        need(
            not (self.dp and self.noise_at == "aggregate" and self.device_dp),
            "noise_at",
            "noise on the aggregate and --device-dp are two different releases: for device-level DP alone add "
            "--no-dp, for both units add --noise-at device",
        )
        need(self.lora_rank >= 1, "lora_rank", f"must be >= 1, got {self.lora_rank}")
        need(self.lora_alpha > 0, "lora_alpha", f"must be > 0, got {self.lora_alpha}")
        need(0 <= self.lora_dropout < 1, "lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        need(self.update_clip_norm > 0, "update_clip_norm", "must be > 0")
        need(self.device_noise_multiplier is None or self.device_noise_multiplier >= 0, "device_noise_multiplier",
             "must be >= 0")
        need(not (self.device_dp and self.device_noise_multiplier == 0 and not self.allow_zero_noise),
             "device_noise_multiplier",
             "0 with --device-dp adds no noise and gives no device-level privacy (epsilon infinity): give a "
             "value > 0, drop --device-dp, or pass --allow-zero-noise for a clipped, non-private run")
        need(not self.allow_zero_noise or (self.dp and self.noise_multiplier == 0)
             or (self.device_dp and self.device_noise_multiplier == 0)
             or (self.holdout_per_device > 0 and self.holdout_noise_multiplier == 0), "allow_zero_noise",
             "accepts a noise multiplier of 0 and does nothing else: no noise multiplier of this run is 0 "
             "(--noise-multiplier, --device-noise-multiplier, --holdout-noise-multiplier), so drop it")
        need(
            self.target_epsilon_device is None or self.target_epsilon_device > 0,
            "target_epsilon_device",
            "must be > 0",
        )
        need(self.max_epsilon is None or self.max_epsilon > 0, "max_epsilon", "must be > 0")
        need(
            self.target_epsilon_device is None or self.device_dp,
            "target_epsilon_device",
            "a device-level budget needs device-level DP: add --device-dp",
        )
        if self.noise_at == "secure":
            need(self.dp, "noise_at", "secure aggregation without noise is not built: drop --no-dp or use "
                 "--noise-at aggregate")
            need(not self.device_dp, "noise_at", "secure aggregation of DP-FedAvg's updates (device level) is not "
                 "built yet: drop --device-dp, or use --noise-at device for both units")
            need(self.sample_rate == 1, "sample_rate", "--noise-at secure accounts no amplification by example "
                 "sampling yet: drop --sample-rate (1)")
            need(self.bands == 1, "bands", "correlated noise needs the server's noise: drop --bands with --noise-at secure")
            need(self.adaptive_clip_quantile is None, "adaptive_clip_quantile",
                 "is not built with --noise-at secure yet: drop it")
            need(not self.reproducible_noise, "reproducible_noise",
                 "would derive secure aggregation's keys from --seed: drop it with --noise-at secure")
            need(self.holdout_per_device == 0, "holdout_per_device", "is not built with --noise-at secure yet: drop it")
            need(self.dp_engine == "dpfl", "dp_engine", "--noise-at secure clips with the dpfl engine: drop --dp-engine")
        need(8 <= self.secure_bits <= 32, "secure_bits", f"must be in [8, 32], got {self.secure_bits}")
        need(0 <= self.dropout_tolerance < 0.5, "dropout_tolerance", f"must be in [0, 0.5), got {self.dropout_tolerance}")
        need(self.secagg_neighbours is None or (self.secagg_neighbours >= 2 and self.secagg_neighbours % 2 == 0),
             "secagg_neighbours", f"must be even and >= 2, got {self.secagg_neighbours}")
        need(self.bands >= 1, "bands", f"must be >= 1, got {self.bands}")
        need(self.bands_noise in ("correlated", "independent"), "bands_noise", "must be 'correlated' or 'independent'")
        if self.bands > 1:
            need(self.bands <= self.rounds, "bands", f"{self.bands} bands need at least as many rounds; lower --bands "
                 f"or raise --rounds (got {self.rounds})")
            need(self.device_dp or (self.dp and self.noise_at == "aggregate"), "bands",
                 "correlates the server's noise across rounds: needs the noise on the aggregate (--noise-at aggregate "
                 "with DP) or device-level DP (--device-dp)")
            need(self.adaptive_clip_quantile is None, "bands",
                 "is not built with adaptive clipping yet: drop --adaptive-clip-quantile or use --bands 1")
            need(self.selection_constant is None, "bands",
                 "calibrates the selection constant for its device groups: drop --selection-constant")
            joinable = -(-self.rounds // self.bands)
            need(self.participation_cap is None or self.participation_cap < joinable, "participation_cap",
                 f"{self.participation_cap} does nothing with --bands {self.bands}: a device can join at most "
                 f"ceil({self.rounds} / {self.bands}) = {joinable} rounds; give a cap below that or drop it")
        if self.adaptive_clip_quantile is not None:
            need(0 < self.adaptive_clip_quantile < 1, "adaptive_clip_quantile",
                 f"must be in (0, 1), got {self.adaptive_clip_quantile}")
            need(self.dp or self.device_dp, "adaptive_clip_quantile",
                 "--no-dp clips nothing: drop --adaptive-clip-quantile (or add --device-dp to adapt S)")
            need(self.device_dp or self.noise_at == "aggregate" or self.dp_engine == "dpfl", "adaptive_clip_quantile",
                 "adapting the clip norm of local DP-SGD (--noise-at device) needs --dp-engine dpfl")
        need(self.adaptive_clip_lr > 0, "adaptive_clip_lr", f"must be > 0, got {self.adaptive_clip_lr}")
        need(self.clipped_count_stddev is None or self.clipped_count_stddev > 0, "clipped_count_stddev",
             f"must be > 0, got {self.clipped_count_stddev}")
        need(self.canaries >= 0, "canaries", f"must be >= 0, got {self.canaries}")
        need(1 <= self.canary_repeats < 1_000_000, "canary_repeats", f"must be in [1, 1000000), got {self.canary_repeats}")
        need(self.round_timeout is None or self.round_timeout > 0, "round_timeout",
             f"must be > 0 seconds, got {self.round_timeout}")
        need(0 <= self.fault_rate <= 1, "fault_rate", f"must be in [0, 1], got {self.fault_rate}")
        need(self.fault_kind in FAULT_KINDS, "fault_kind", f"must be one of {FAULT_KINDS}")
        need(self.server_learning_rate is None or self.server_learning_rate > 0, "server_learning_rate", "must be > 0")
        need(self.client_cpus > 0, "client_cpus", "must be > 0")
        need(self.simulation_nodes is None or self.simulation_nodes >= 1, "simulation_nodes", "must be >= 1")
        need(self.client_gpus >= 0, "client_gpus", "must be >= 0")
        return self

    def resolved_target_epsilon(self) -> float | None:
        """The example-level target the noise is calibrated for (None: the given --noise-multiplier is used).

        ``--target-epsilon`` when given; else, with DP on and no ``--noise-multiplier``, the
        default :data:`DEFAULT_TARGET_EPSILON`. The target is also every device's budget.
        """
        if self.target_epsilon is not None:
            return self.target_epsilon
        return DEFAULT_TARGET_EPSILON if self.dp and self.noise_multiplier is None else None

    def resolved_strategy(self) -> str:
        """``--strategy``, with ``auto`` resolved: fedadam (server Adam) for the aggregate placement (with or
        without DP: ``--no-dp`` runs the same algorithm without clipping and noise), else fedavg."""
        if self.strategy != "auto":
            return self.strategy
        return "fedadam" if not self.device_dp and self.noise_at in ("aggregate", "secure") else "fedavg"

    def resolved_server_learning_rate(self) -> float:
        """``--server-learning-rate``, or its default for the run's mode.

        1.0 for device-level DP with FedAvg/FedProx (the server adds the mean of the clipped,
        noised updates, as FedAvg does; McMahan et al. 2018, "Learning differentially private
        recurrent language models", Algorithm 1 with server learning rate 1); 0.1 for FedAdam when
        the head starts from the label names (``head_init = "label-names"``: a head already at the
        right scale, which Adam's steps of about eta per coordinate would walk away from under
        strong noise); 0.2 otherwise (FedAdam's eta, or server SGD on the aggregate placement's
        noisy mean gradient). Measured on the BANKING77 privacy-utility setting (head prior, FedAdam):
        eta 0.2 / 0.1 / 0.05 gave 0.52 / 0.62 / 0.68 at epsilon 1 and 0.83 / 0.84 / 0.81 at epsilon 8.
        """
        if self.server_learning_rate is not None:
            return float(self.server_learning_rate)
        if self.device_dp and self.resolved_strategy() in ("fedavg", "fedprox"):
            return 1.0
        if self.head_init == "label-names" and self.resolved_strategy() == "fedadam":
            return 0.1
        return 0.2

    def round_deadline_seconds(self) -> float:
        """The longest a round waits: ``--round-timeout``, or :data:`ROUND_TIMEOUT_CAP` when it is adaptive."""
        return float(self.round_timeout) if self.round_timeout is not None else ROUND_TIMEOUT_CAP

    def lora_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`nlu.model.set_trainable` for the LoRA settings (and the seed)."""
        targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip()) or None
        return {"lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha, "lora_targets": targets,
                "lora_dropout": self.lora_dropout, "seed": self.seed}

    # ------------------------------------------------------------------ derived values
    def resolve_delta(self, num_units: int) -> float:
        """Return ``target_delta``, or when unset the largest power of ten <= 1/(10 N).

        ``N`` is the number of privacy units (training examples), so delta is at least ten
        times below 1/N, the level at which releasing one unit's data outright would be allowed.
        """
        if self.target_delta is not None:
            return self.target_delta
        n = max(int(num_units), 1)
        return 10.0 ** math.floor(math.log10(1.0 / (10.0 * n)))

    def with_defaults(self) -> "RunConfig":
        """Fill run_id and run_dir when empty (``runs/<timestamp>-<6 random hex digits>``).

        The random suffix keeps runs started in the same second apart; the directory itself is
        created atomically when the run starts (:func:`rundir.claim_run_dir`).
        """
        run_id = self.run_id or time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        return self.replace(run_id=run_id, run_dir=self.run_dir or str(Path("runs") / run_id))

    def group(self, name: str) -> tuple[tuple[str, Any], ...]:
        """The settings of one group (a field's ``metadata["group"]``) as ``((field, value), ...)``.

        Hashable (except the ``run`` group, which holds ``extra``): the caches of what a group
        determines are keyed by it (e.g. :func:`partitions.population.population_key`).

        Raises
        ------
        KeyError
            For a name no field carries.
        """
        out = tuple((f.name, getattr(self, f.name)) for f in fields(self) if f.metadata.get("group") == name)
        if not out:
            raise KeyError(f"no setting group {name!r}")
        return out

    @property
    def out_of_scope(self) -> bool:
        """True when the run evaluates out-of-scope detection (``--oos-label`` or ``--oos-holdout-intents``)."""
        return bool(self.oos_label) or self.oos_holdout_intents > 0

    def supernodes(self) -> int:
        """Flower SuperNodes ``dpfl simulate`` runs: ``simulation_nodes``, else
        ``min(num_devices, SIMULATION_NODES)``, never more than the devices."""
        n = self.simulation_nodes if self.simulation_nodes is not None else SIMULATION_NODES
        return max(1, min(int(self.num_devices), int(n)))

    def device_settings(self) -> dict[str, Any]:
        """What a device's message carries: every scalar setting except :data:`SERVER_ONLY` ones."""
        return {k: v for k, v in self.to_dict_flat().items() if k not in SERVER_ONLY}

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """A TOML/JSON-friendly dict (``None`` values dropped, TOML has no null)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None or (f.name == "extra" and not v):
                continue
            out[f.name] = v
        return out

    def to_dict_flat(self) -> dict[str, Any]:
        """Scalars only (for a Flower ConfigRecord sent to the devices)."""
        d = self.to_dict()
        d.pop("extra", None)
        return d

    def to_toml(self) -> str:
        """The settings as TOML (the run directory's ``config.toml``)."""
        return tomli_w.dumps(self.to_dict())

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> "RunConfig":
        """Build from a mapping whose keys may use dashes (Flower run config) or underscores.

        Raises
        ------
        ConfigError
            For an unknown key or a value of the wrong type.
        """
        hints = get_type_hints(cls)
        names = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in names:
                raise ConfigError(f"unknown setting {key!r}")
            kwargs[name] = _coerce(name, value, hints[name])
        return cls(**kwargs)

    @classmethod
    def from_toml(cls, path: str | Path) -> "RunConfig":
        """Read a run directory's ``config.toml`` (see :meth:`from_mapping` for the errors).

        A ``config.toml`` without ``head_init`` was written before 2026-12-02 (every later one
        records it): its run started from a random head, and its ``--no-dp`` meant FedAvg of local
        training, so it is read as ``head_init = "random"`` and, without DP, ``noise_at = "device"``:
        a resumed or retrained run goes on with the algorithm it started with.
        """
        with open(path, "rb") as fh:
            return cls.from_mapping(as_recorded(tomllib.load(fh)))

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with ``changes`` applied (not validated; the RunConfig itself is frozen)."""
        return dataclasses.replace(self, **changes)


def as_recorded(values: dict[str, Any]) -> dict[str, Any]:
    """A run directory's ``config.toml`` values with what a file written before 2026-12-02 meant:
    one without ``head_init`` started from a random head, and its ``--no-dp`` (no DP at all) was
    FedAvg of local training (``noise_at = "device"``). Later files are returned as they are (a copy)."""
    out = dict(values)
    if "head_init" not in out:
        out["head_init"] = "random"
        if not out.get("dp", True) and not out.get("device_dp", False):
            out["noise_at"] = "device"
    return out


def _coerce(name: str, value: Any, hint: Any) -> Any:
    text = str(hint)
    if value is None or value == "" and "None" in text:
        return None
    try:
        if text.startswith("dict"):
            return dict(value)
        if "bool" in text:
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if "int" in text and "float" not in text:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if "float" in text:
            return float(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{_flag(name)}: invalid value {value!r}") from exc
