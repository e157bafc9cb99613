"""The run-setting flags: one setting group per RunConfig field, choices, one true default, per-command groups."""

import argparse
import dataclasses
import re

import pytest

from dpfl.cli import main
from dpfl.commands.flags import GROUPS, SKIP, add_config_args, config_from_args, default_text
from settings.config import ConfigError, RunConfig

FIELDS = [f for f in dataclasses.fields(RunConfig) if f.name not in SKIP]
#: str fields whose value is free text (paths, names, column names) or a pattern (``topN``), so without choices.
FREE_TEXT = {"run_dir", "data_dir", "dataset", "text_column", "label_column", "device_column", "model", "trainable",
             "lora_targets", "deletions", "baseline_model", "label_descriptions", "oos_label"}


def _flag(name):
    return "--" + name.replace("_", "-")


def _help(monkeypatch, capsys, command):
    monkeypatch.setenv("COLUMNS", "250")  # one line per flag and help: no flag name split by the wrapping
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def _parser(**kw):
    p = argparse.ArgumentParser(prog="dpfl test")
    add_config_args(p, **kw)
    return p


# ----------------------------------------------------------------------------- the fields' metadata
def test_every_field_has_a_known_group():
    unknown = {f.name: f.metadata.get("group") for f in FIELDS if f.metadata.get("group") not in GROUPS}
    assert unknown == {}


def test_choices_are_the_values_validate_accepts():
    """A field's ``choices`` are exactly what validate() lets through: each choice passes, anything else fails."""
    for f in FIELDS:
        for value in f.metadata.get("choices", ()):
            RunConfig(**{f.name: value}).validate()
        if f.metadata.get("choices") or str(f.type).startswith("str") and f.name not in FREE_TEXT:
            with pytest.raises(ConfigError, match=_flag(f.name)):
                RunConfig(**{f.name: "bogus"}).validate()
            assert f.metadata.get("choices"), f"{f.name}: validate() accepts a fixed set; give it choices"


def test_a_none_or_empty_default_is_explained_by_the_help():
    """The help of a field whose default is None or "" says what that means (no bare "(default: none)")."""
    bare = [f.name for f in FIELDS if f.default in (None, "") and default_text(f)]
    assert bare == []


def test_boolean_flags_turn_a_setting_on():
    """A store_true flag can only mean something when its field defaults to off."""
    assert [f.name for f in FIELDS if f.default is True] == []


# ----------------------------------------------------------------------------- the generated flags
def test_every_flag_states_one_true_default():
    p = _parser()
    helps = {a.dest: a.help for a in p._actions}
    for f in FIELDS:
        text = helps[f.name]
        assert text.count("(default:") <= 1, (f.name, text)
        assert re.search(r"[(;,]\s*default\b", text), (f.name, text)
        if f.default not in (None, "") and not isinstance(f.default, bool) and not f.metadata["help"].count("default"):
            assert text.endswith(f"(default: {f.default})"), (f.name, text)
    assert helps["dp"].count("(default:") == 1


def test_no_dp_is_in_the_example_privacy_group():
    p = _parser()
    group = next(g for g in p._action_groups if g.title == GROUPS["example_privacy"][0])
    assert "--no-dp" in [s for a in group._group_actions for s in a.option_strings]
    assert "--no-dp" not in _parser(groups=("data",)).format_help()


def test_groups_take_only_their_fields_and_unset_flags_keep_the_defaults():
    p = _parser(groups=("data",), also=("cohort_size",))
    dests = {a.dest for a in p._actions} - {"help"}
    assert dests == {f.name for f in FIELDS if f.metadata["group"] == "data"} | {"cohort_size"}
    cfg = config_from_args(p.parse_args(["--num-devices", "3", "--cohort-size", "2"]))
    assert cfg.replace(run_id="", run_dir="") == RunConfig(num_devices=3, cohort_size=2)
    with pytest.raises(KeyError):
        add_config_args(argparse.ArgumentParser(), groups=("nonsense",))


# ----------------------------------------------------------------------------- the commands
def test_simulate_help_has_the_groups_in_order_and_the_choices(monkeypatch, capsys):
    out = _help(monkeypatch, capsys, "simulate")
    positions = [out.index("\n" + title + ":\n") for title, _ in GROUPS.values()]
    assert positions == sorted(positions)
    assert "--noise-at {device,aggregate,secure}" in out
    assert "--partitioner {auto,iid,dirichlet,quantity,quantity-label,cluster,natural}" in out
    assert "--fault-kind {mixed,raise,hang,nan,shape}" in out
    for line in out.splitlines():
        assert line.count("(default:") <= 1, line
    assert "(default: --learning-rate) (default:" not in out
    for f in FIELDS:
        assert _flag(f.name) in out


def test_launch_takes_every_setting_group(monkeypatch, capsys):
    out = _help(monkeypatch, capsys, "launch")
    for title, _ in GROUPS.values():
        assert "\n" + title + ":\n" in out
    assert "--address" in out and "--no-dp" in out and "--ray-address" not in out


def test_partitions_help_lists_only_the_data_flags(monkeypatch, capsys):
    out = _help(monkeypatch, capsys, "partitions")
    for flag in ("--num-devices", "--partitioner", "--setting", "--storage-cap", "--seed", "--rounds", "--out"):
        assert flag in out
    for flag in ("--noise-multiplier", "--learning-rate", "--no-dp", "--model", "--strategy", "--device-dp"):
        assert flag not in out
    assert "\n" + GROUPS["data"][0] + ":\n" in out and "\n" + GROUPS["example_privacy"][0] + ":\n" not in out


@pytest.mark.parametrize("argv, flag", [
    (["simulate", "--noise-at", "nowhere"], "--noise-at"),
    (["simulate", "--partitioner", "bogus"], "--partitioner"),
    (["partitions", "--setting", "sometimes"], "--setting"),
    (["launch", "--address", "127.0.0.1:6379", "--accountant", "moments"], "--accountant"),
    (["partitions", "--noise-multiplier", "1"], "--noise-multiplier"),
])
def test_a_bad_choice_or_a_foreign_flag_exits_2_naming_the_flag(argv, flag, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpfl: error: ") and err.count("\n") == 1 and flag in err
    assert f"dpfl {argv[0]} --help" in err
