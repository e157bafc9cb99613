"""The run-setting flags, generated from :class:`settings.config.RunConfig`.

One ``--flag-name`` per RunConfig field: its help text is the field's ``metadata["help"]``, its
setting group ``metadata["group"]`` (one of :data:`GROUPS`) and, for a field whose valid values
are a fixed set, ``metadata["choices"]`` (argparse rejects anything else, exit code 2).
:func:`add_config_args` adds the flags of the groups a command takes, one argparse group per
setting group: ``dpfl simulate`` and ``dpfl launch`` take every group, ``dpfl partitions`` the data
group and the few run settings that shape the population. :func:`config_from_args` maps parsed
flags back into a validated RunConfig; a flag a command lacks keeps RunConfig's default.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Iterable
from typing import Any, get_type_hints

from settings.config import ConfigError, RunConfig

__all__ = [
    "GROUPS", "RESUMABLE_SETTINGS", "SKIP", "add_config_args", "config_from_args", "default_text", "given_settings",
    "reject_settings_on_resume",
]

#: Fields without a flag of their own: set from elsewhere (``--no-dp``, ``dpfl launch --address``)
#: or not settable from the command line.
SKIP = {"extra", "run_id", "ray_address", "dp"}

#: The setting groups (a field's ``metadata["group"]``) in the order ``--help`` lists them:
#: name -> (title, description).
GROUPS: dict[str, tuple[str, str]] = {
    "data": ("data and devices",
             "the data set, how it is partitioned over the simulated devices and, with --setting continual, "
             "when the examples arrive"),
    "selection": ("device selection", "which devices take part in a round"),
    "model": ("model and task", "the task, the model and which of its parameters train"),
    "local_training": ("local training", "what a selected device runs on its examples"),
    "example_privacy": ("example-level privacy",
                        "DP for each training example (DP-SGD on the device or noise on the aggregate) and its "
                        "budget"),
    "device_privacy": ("device-level privacy", "DP for each device's whole data (DP-FedAvg on the server)"),
    "server_optimizer": ("server optimizer", "how the server turns the cohort's replies into the next global model"),
    "resources": ("resources", "what one simulated device may use"),
    "reliability": ("reliability", "the round deadline and injected device faults (testing)"),
    "audit": ("audit and releases",
              "releases and their flip rates, privacy-audit canaries, deletion requests, the per-device holdout"),
    "run": ("run", "the run directory, its length, seed and evaluation; reproducible noise for tests"),
}

#: A help text that already states its default: "(default: ...)", "(default 0.2)", "(...; default: ...)".
_STATES_DEFAULT = re.compile(r"[(;,]\s*default\b")


def default_text(f: dataclasses.Field) -> str:
    """The ``(default: ...)`` suffix of ``f``'s flag help: empty when its help already states the default.

    Booleans read ``on`` / ``off``; a ``None`` or empty default whose help does not explain it
    reads ``none`` / ``empty`` (tests/test_cli_flags.py asks every such help to explain it).
    """
    help_ = f.metadata.get("help", "")
    if _STATES_DEFAULT.search(help_):
        return ""
    default = f.default if f.default is not dataclasses.MISSING else None
    if isinstance(default, bool):
        shown = "on" if default else "off"
    elif default is None:
        shown = "none"
    elif default == "":
        shown = "empty"
    else:
        shown = str(default)
    return f"(default: {shown})"


def _add_flag(group: Any, f: dataclasses.Field, hint: Any) -> None:
    """Add ``f``'s flag to ``group`` (every default ``None``: an unset flag keeps RunConfig's default)."""
    text = str(hint)
    help_ = " ".join(s for s in (f.metadata.get("help", ""), default_text(f)) if s).replace("%", "%%")
    flag = "--" + f.name.replace("_", "-")
    if "bool" in text:
        group.add_argument(flag, dest=f.name, action="store_true", default=None, help=help_)
        return
    typ: Any = str
    if "int" in text and "float" not in text:
        typ = int
    elif "float" in text:
        typ = float
    choices = f.metadata.get("choices")
    group.add_argument(flag, dest=f.name, type=typ, default=None, choices=list(choices) if choices else None,
                       help=help_)


def add_config_args(p: argparse.ArgumentParser, groups: Iterable[str] | None = None,
                    also: Iterable[str] = ()) -> None:
    """Add the RunConfig flags of the setting ``groups`` to ``p``, one argparse group per setting group.

    Parameters
    ----------
    p
        The command's parser.
    groups
        Names of :data:`GROUPS` whose flags to add (``None``: every group); the argparse groups
        always come in :data:`GROUPS` order. ``--no-dp`` belongs to ``example_privacy``.
    also
        Single fields of other groups to add too (listed under their own group's title), e.g.
        the ``seed`` and ``rounds`` that shape ``dpfl partitions``' population.

    Raises
    ------
    KeyError
        For an unknown group or field name (a programming error).
    """
    wanted = set(GROUPS) if groups is None else set(groups)
    extra = set(also)
    hints = get_type_hints(RunConfig)
    known = {f.name for f in dataclasses.fields(RunConfig)}
    if wanted - set(GROUPS) or extra - known:
        raise KeyError(f"unknown setting groups or fields: {sorted((wanted - set(GROUPS)) | (extra - known))}")
    chosen: dict[str, list[dataclasses.Field]] = {g: [] for g in GROUPS}
    for f in dataclasses.fields(RunConfig):
        if f.name not in SKIP and (f.metadata["group"] in wanted or f.name in extra):
            chosen[f.metadata["group"]].append(f)
    no_dp = "example_privacy" in wanted or "dp" in extra
    for name, (title, description) in GROUPS.items():
        if not chosen[name] and not (name == "example_privacy" and no_dp):
            continue
        group = p.add_argument_group(title, description if name in wanted else None)
        if name == "example_privacy" and no_dp:
            group.add_argument("--no-dp", dest="dp", action="store_false", default=None,
                               help="train without example-level DP: the --noise-at algorithm with neither clipping "
                                    "nor noise, the non-private reference (aggregate: FedSGD with the same server "
                                    "step; device: FedAvg of local training) (default: example-level DP on)")
        for f in chosen[name]:
            _add_flag(group, f, hints[f.name])


def given_settings(ns: argparse.Namespace) -> dict[str, Any]:
    """The RunConfig fields set on the command line (flags left unset, or absent from the parser, are absent)."""
    names = {f.name for f in dataclasses.fields(RunConfig)}
    return {k: v for k, v in vars(ns).items() if k in names and v is not None}


def config_from_args(ns: argparse.Namespace) -> RunConfig:
    """A validated RunConfig from parsed arguments (unset flags keep RunConfig's defaults).

    Raises
    ------
    ConfigError
        If a setting is invalid (the message names its flag).
    """
    return RunConfig.from_mapping(given_settings(ns)).with_defaults().validate()


#: Settings ``--resume`` may change: they shape how long the server waits, never what is trained or accounted.
RESUMABLE_SETTINGS = ("round_timeout",)


def reject_settings_on_resume(ns: argparse.Namespace) -> dict[str, Any]:
    """``--resume`` continues a run with its own settings: refuse any run-setting flag beside it
    except :data:`RESUMABLE_SETTINGS` (``--round-timeout``), which are returned to apply.

    Raises
    ------
    ConfigError
        Naming the flags to drop.
    """
    settings = given_settings(ns)
    given = sorted("--" + k.replace("_", "-") for k in settings if k not in RESUMABLE_SETTINGS)
    if given:
        raise ConfigError(f"--resume continues a run with its own settings (config.toml); drop {', '.join(given)} "
                          "(only --round-timeout may change on resume)")
    return {k: v for k, v in settings.items() if k in RESUMABLE_SETTINGS}
