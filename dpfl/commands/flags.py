"""The run-setting flags, generated from :class:`dpfl.config.RunConfig`.

One ``--flag-name`` per RunConfig field (its help text is the field's ``metadata["help"]``),
shared by ``dpfl simulate``, ``dpfl launch`` and ``dpfl partitions``; :func:`config_from_args`
maps parsed flags back into a validated RunConfig.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, get_type_hints

from dpfl.config import ConfigError, RunConfig

__all__ = ["RESUMABLE_SETTINGS", "SKIP", "add_config_args", "config_from_args", "given_settings", "reject_settings_on_resume"]

#: Fields without a flag of their own: set from elsewhere (``--no-dp``, ``dpfl launch --address``)
#: or not settable from the command line.
SKIP = {"extra", "run_id", "ray_address", "dp"}


def add_config_args(p: argparse.ArgumentParser) -> None:
    """Add one flag per RunConfig field to ``p`` (every default ``None``: unset keeps RunConfig's)."""
    hints = get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if f.name in SKIP:
            continue
        text = str(hints[f.name])
        help_ = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if "bool" in text:
            p.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                action="store_true",
                default=None,
                help=f"{help_} (default: off)".strip(),
            )
            continue
        typ: Any = str
        if "int" in text and "float" not in text:
            typ = int
        elif "float" in text:
            typ = float
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=typ,
            default=None,
            help=f"{help_} (default: {default})".strip(),
        )
    p.add_argument("--no-dp", dest="dp", action="store_false", default=None, help="train without DP-SGD (baseline)")


def given_settings(ns: argparse.Namespace) -> dict[str, Any]:
    """The RunConfig fields set on the command line (flags left unset are absent)."""
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
