"""One RunConfig: every field has a help text, the CLI flags and `flwr run .` come from it."""

import argparse
import dataclasses
import tomllib
from pathlib import Path

from dpfl.commands.flags import SKIP, add_config_args
from settings.config import RunConfig

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_every_field_has_help():
    missing = [f.name for f in dataclasses.fields(RunConfig) if not f.metadata.get("help")]
    assert missing == []


def test_flags_read_help_from_the_fields():
    p = argparse.ArgumentParser()
    add_config_args(p)
    helps = {a.dest: a.help for a in p._actions}
    for f in dataclasses.fields(RunConfig):
        if f.name not in SKIP:
            assert helps[f.name].startswith(f.metadata["help"]), f.name


def test_flower_app_config_carries_runconfig_defaults():
    """`[tool.flwr.app.config]` (what `flwr run .` reads) holds RunConfig's defaults, except the quick-run cap."""
    app = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    defaults = RunConfig()
    own = {"max_examples": 2000}  # `flwr run .` is a quick run on at most 2000 examples
    for key, value in app.items():
        name = key.replace("-", "_")
        expected = own.get(name, getattr(defaults, name))
        assert value == expected, f"[tool.flwr.app.config] {key} = {value!r}, RunConfig default {expected!r}"
    assert RunConfig.from_mapping(app).replace(max_examples=None) == RunConfig()
