"""Settings are frozen and resolved once (server/plan.py): the preflight and the server resolve
alike, nothing changes the user's settings, devices get only the settings they read, and the
caches are keyed by setting groups."""

import dataclasses
import tomllib

import pytest

from partitions.population import build_population, population_key
from rundir import config_path
from server.plan import resolve
from settings.config import DEFAULT_TARGET_EPSILON, SERVER_ONLY, RunConfig
from tests.inprocess import run_rounds, toy_config, write_lamp_data

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture
def lamp(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    return write_lamp_data(d)


def test_run_config_is_frozen():
    cfg = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.noise_multiplier = 1.0
    filled = cfg.with_defaults()
    assert cfg.run_id == "" and filled.run_id and filled.run_dir.endswith(filled.run_id)


def test_resolve_fills_the_derived_values_and_leaves_the_settings(tmp_path, lamp):
    cfg = toy_config(tmp_path / "run", lamp, noise_at="device", strategy="fedavg")
    before = cfg.to_dict()
    plan = resolve(cfg, build_population(cfg))
    assert cfg.to_dict() == before  # nothing changed in place
    s = plan.settings
    assert cfg.noise_multiplier is None and s.noise_multiplier > 0  # calibrated for the default target ...
    assert s.target_epsilon == DEFAULT_TARGET_EPSILON  # ... which is recorded with it
    assert s.target_delta == plan.delta == cfg.resolve_delta(24)  # 24 training examples
    assert s.server_learning_rate == cfg.resolved_server_learning_rate()
    assert plan.mechanism.cfg is s and plan.selection_constant == plan.selector.c
    # the same resolution again (the preflight's, a resume's) gives the same values
    again = resolve(cfg, build_population(cfg))
    assert again.settings == s
    assert resolve(s, build_population(s)).settings == s  # resolving resolved settings changes nothing


def test_the_server_runs_on_the_resolved_copy_and_records_it(tmp_path, lamp):
    cfg = toy_config(tmp_path / "run", lamp, noise_at="device", strategy="fedavg", rounds=1)
    server, *_ = run_rounds(cfg)
    assert cfg.noise_multiplier is None  # the caller's settings as given
    assert server.cfg == server.plan.settings
    with open(config_path(cfg.run_dir), "rb") as fh:
        recorded = tomllib.load(fh)
    assert recorded["noise_multiplier"] == server.cfg.noise_multiplier
    assert recorded["target_delta"] == server.delta


@pytest.mark.parametrize("noise_at", ["device", "aggregate"])
def test_devices_receive_no_server_only_setting(tmp_path, lamp, noise_at):
    cfg = toy_config(tmp_path / "run", lamp, noise_at=noise_at, rounds=1, holdout_per_device=0.25,
                     max_epsilon=9.0, selection="activity")
    server, grid, *_ = run_rounds(cfg)
    assert grid.sent
    for m in grid.sent:  # training and holdout messages alike
        sent = dict(m.content["run"])
        assert not SERVER_ONLY & set(sent), SERVER_ONLY & set(sent)
        assert sent == server.cfg.device_settings()
        # what the device does read is there: its mechanism's calibrated noise, its data and model settings
        assert sent["noise_multiplier"] == server.cfg.noise_multiplier and sent["model"] == "tiny"
    assert "run_dir" not in server.cfg.device_settings() and "max_epsilon" not in server.cfg.device_settings()


def test_population_key_is_the_data_group_and_what_shapes_the_population():
    cfg = RunConfig(num_devices=7)
    assert population_key(cfg)[0] == cfg.group("data")
    assert population_key(cfg) == population_key(cfg.replace(learning_rate=0.5, model="tiny", target_epsilon=1.0))
    for change in ({"num_devices": 8}, {"partitioner": "dirichlet"}, {"seed": 3}, {"canaries": 2},
                   {"holdout_per_device": 0.1}, {"rounds": 5}):
        assert population_key(cfg) != population_key(cfg.replace(**change)), change
    hash(population_key(cfg))
    with pytest.raises(KeyError, match="no setting group"):
        cfg.group("nonsense")
