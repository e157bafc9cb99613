"""benchmarks/privacy_utility.py builds commands dpfl accepts (its arms, levers included), without running them."""

from pathlib import Path

import pytest

from benchmarks.privacy_utility import DEFAULT_ARMS, arm_command, device_level_sigma, lever_args, parse_arm
from dpfl.cli import build_parser
from dpfl.commands.flags import config_from_args


def _settings(arm: str, tmp_path: Path):
    noise, trainable, eps = parse_arm(arm)
    levers = arm.split(":")[3] if arm.count(":") == 3 else ""
    cmd = arm_command(noise, trainable, eps, tmp_path / "run", "../shared/data/banking77", 0, [], levers)
    assert cmd[:2] == ["dpfl", "simulate"]
    return config_from_args(build_parser().parse_args(cmd[1:]))  # the command's own parser and validation


@pytest.mark.parametrize("arm", DEFAULT_ARMS.split(",") + ["aggregate:head:1:random+cap20", "aggregate:head:3:labels",
                                                      "aggregate:head:1:clip10+adaptive", "device-level:head:3:adaptive",
                                                      "aggregate:head:1:bands4", "device-level:head:3:bands5",
                                                      "secure:head:8"])
def test_every_arm_is_a_valid_dpfl_simulate_command(arm, tmp_path):
    cfg = _settings(arm, tmp_path)
    noise = arm.split(":")[0]
    assert cfg.run_dir == str(tmp_path / "run") and cfg.target_delta == 1e-5
    if noise in ("aggregate", "secure", "device"):
        assert cfg.dp and cfg.noise_at == noise and cfg.target_epsilon == float(arm.split(":")[2])
    if noise == "device-level":
        assert cfg.device_dp and not cfg.dp and cfg.device_noise_multiplier > 0


def test_levers_set_their_flag(tmp_path):
    cfg = _settings("aggregate:head:1:random+cap20", tmp_path)
    assert cfg.head_init == "random" and cfg.participation_cap == 20
    assert _settings("aggregate:head:1", tmp_path).head_init == "auto" and lever_args("") == []
    cfg = _settings("aggregate:head:1:clip10+adaptive", tmp_path)
    assert cfg.adaptive_clip_quantile == 0.5 and cfg.max_grad_norm == 10.0 and cfg.update_clip_norm == 10.0
    assert _settings("aggregate:head:1:adaptive0.2", tmp_path).adaptive_clip_quantile == 0.2
    assert _settings("aggregate:head:1:bands4", tmp_path).bands == 4
    banded = _settings("device-level:head:3:bands5", tmp_path)  # 150 rounds, q 0.1: 30 rounds at q 0.5 per device
    assert banded.bands == 5 and banded.device_noise_multiplier == pytest.approx(device_level_sigma(3.0, 30, 0.5), abs=1e-6)
    with pytest.raises(SystemExit, match="unknown lever 'bands0'"):
        parse_arm("aggregate:head:1:bands0")
    with pytest.raises(SystemExit, match="unknown lever 'adaptive1.5'"):
        parse_arm("aggregate:head:1:adaptive1.5")
    with pytest.raises(SystemExit, match="unknown lever 'clip-1'"):
        parse_arm("aggregate:head:1:clip-1")
    with pytest.raises(SystemExit, match="unknown lever 'nosuch'"):
        parse_arm("aggregate:head:1:nosuch")
    with pytest.raises(SystemExit, match="NOISE:TRAINABLE:EPS"):
        parse_arm("aggregate:head")
