"""The one typed run configuration (RunConfig) and its validation.

Every way of starting a run maps into :class:`RunConfig`: the ``dpfl`` CLI (``dpfl simulate``),
Flower's own runner (``flwr run .`` reads ``[tool.flwr.app.config]`` from pyproject.toml, whose
keys are the field names with dashes), and a resumed run (``config.toml`` in the run
directory). Nothing else holds run settings.
"""

from __future__ import annotations

import dataclasses
import math
import time
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import tomli_w

SELECTIONS = ("uniform", "activity")
STRATEGIES = ("fedavg", "fedprox", "fedadam")
PARTITIONERS = ("auto", "iid", "dirichlet", "quantity", "quantity-label", "cluster", "natural")
ACCOUNTANTS = ("pld", "rdp")
DP_ENGINES = ("dpfl", "opacus")
OPTIMIZERS = ("sgd", "adamw")
TASKS = ("intent", "slots", "joint")
SETTINGS = ("static", "continual")
FAULT_KINDS = ("mixed", "raise", "hang", "nan", "shape")


class ConfigError(ValueError):
    """A run setting is invalid; the message names the setting (as its CLI flag) and a fix."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class RunConfig:
    """All settings of one run.

    Units: ``learning_rate`` per optimizer step; ``batch_size`` is the *expected* Poisson
    batch size (examples); ``target_delta`` is the delta at which every epsilon is stated
    (``None``: chosen from the data set size, see :meth:`resolve_delta`); epsilons are at
    that delta. ``cohort_size`` is the *expected* number of devices per round.
    """

    # run
    run_id: str = ""
    run_dir: str = ""
    seed: int = 0
    rounds: int = 5
    eval_every: int = 1
    # data and devices
    data_dir: str | None = None
    dataset: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    max_examples: int | None = None
    num_devices: int = 20
    partitioner: str = "auto"  # natural (device column) when the data has one, else iid
    dirichlet_alpha: float = 0.5
    quantity_beta: float = 1.5
    device_column: str = "device"
    num_clusters: int = 10
    setting: str = "static"
    storage_cap: int | None = None
    # selection
    cohort_size: float = 5.0
    selection: str = "activity"
    activity_exponent: float = 1.0
    selection_constant: float | None = None
    # model
    task: str = "intent"
    slot_loss_weight: float = 1.0
    model: str = "minilm"
    max_length: int = 32
    pooling: str = "mean"
    trainable: str = "all"
    # local training
    local_epochs: int = 1
    batch_size: int = 32
    physical_batch_size: int = 64
    optimizer: str = "adamw"
    learning_rate: float = 1e-4
    head_learning_rate: float | None = 1e-2
    # example-level DP (DP-SGD on the device)
    dp: bool = True
    dp_engine: str = "dpfl"
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    target_epsilon: float | None = None
    target_delta: float | None = None
    accountant: str = "pld"
    # device-level DP (DP-FedAvg on the server) and budgets
    device_dp: bool = False
    update_clip_norm: float = 1.0
    device_noise_multiplier: float = 1.0
    target_epsilon_device: float | None = None
    max_epsilon: float | None = None
    # privacy audit: canaries inserted into devices' training data (dp.audit, partitions.population)
    canaries: int = 0
    canary_repeats: int = 1
    # aggregation
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.01
    # simulation resources
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    ray_address: str | None = None
    # reliability: round deadline and injected device faults (testing)
    round_timeout: float = 3600.0
    fault_rate: float = 0.0
    fault_kind: str = "mixed"
    extra: dict[str, Any] = field(default_factory=dict)

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
        need(self.setting in SETTINGS, "setting", f"must be one of {SETTINGS}")
        need(self.storage_cap is None or self.storage_cap >= 1, "storage_cap", "must be >= 1")
        need(
            self.storage_cap is None or self.setting == "continual",
            "storage_cap",
            "applies to --setting continual only",
        )
        need(self.num_clusters >= 1, "num_clusters", "must be >= 1")
        need(self.pooling in ("mean", "cls"), "pooling", "must be 'mean' or 'cls'")
        try:
            from nlu.model import parse_trainable

            parse_trainable(self.trainable)
        except ValueError as exc:
            need(False, "trainable", str(exc))
        need(self.noise_multiplier >= 0, "noise_multiplier", f"must be >= 0, got {self.noise_multiplier}")
        need(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.physical_batch_size >= 1, "physical_batch_size", "must be >= 1")
        need(self.local_epochs >= 0, "local_epochs", "must be >= 0")
        need(self.learning_rate > 0, "learning_rate", "must be > 0")
        need(self.head_learning_rate is None or self.head_learning_rate > 0, "head_learning_rate", "must be > 0")
        need(self.max_length >= 4, "max_length", "must be >= 4")
        need(self.eval_every >= 1, "eval_every", "must be >= 1")
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
        need(self.update_clip_norm > 0, "update_clip_norm", "must be > 0")
        need(self.device_noise_multiplier >= 0, "device_noise_multiplier", "must be >= 0")
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
        need(self.canaries >= 0, "canaries", f"must be >= 0, got {self.canaries}")
        need(1 <= self.canary_repeats < 1_000_000, "canary_repeats", f"must be in [1, 1000000), got {self.canary_repeats}")
        need(self.round_timeout > 0, "round_timeout", f"must be > 0 seconds, got {self.round_timeout}")
        need(0 <= self.fault_rate <= 1, "fault_rate", f"must be in [0, 1], got {self.fault_rate}")
        need(self.fault_kind in FAULT_KINDS, "fault_kind", f"must be one of {FAULT_KINDS}")
        need(self.client_cpus > 0, "client_cpus", "must be > 0")
        need(self.client_gpus >= 0, "client_gpus", "must be >= 0")
        return self

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
        """Fill run_id and run_dir when empty (``runs/<timestamp>``)."""
        if not self.run_id:
            self.run_id = time.strftime("%Y%m%d-%H%M%S")
        if not self.run_dir:
            self.run_dir = str(Path("runs") / self.run_id)
        return self

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
        with open(path, "rb") as fh:
            return cls.from_mapping(tomllib.load(fh))

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)


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
