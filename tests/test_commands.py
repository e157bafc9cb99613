"""Every command maps errors the same way (dpfl/commands/errors.py): bad input -> 2, Ctrl-C -> 130."""

import pytest

from dpfl.cli import main
from dpfl.commands import launch
from settings.interrupt import Interrupted


@pytest.fixture
def fake_cluster(monkeypatch):
    """``dpfl launch`` with the preflight and the cluster checks stubbed out (no Ray)."""
    monkeypatch.setattr(launch, "preflight", lambda cfg: None)
    monkeypatch.setattr(launch, "check_cluster", lambda cfg, run_probe=True: {})


def test_ctrl_c_during_launch_exits_130(fake_cluster, monkeypatch, capsys):
    def interrupted(cfg, progress=True):
        raise Interrupted(f"interrupted; the run is resumable: dpfl simulate --resume {cfg.run_dir}")

    monkeypatch.setattr(launch, "simulate", interrupted)
    code = main(["launch", "--address", "127.0.0.1:6379", "--model", "tiny", "--run-dir", "r"])
    err = capsys.readouterr().err
    assert code == 130
    assert err.startswith("dpfl: interrupted; the run is resumable") and "Traceback" not in err


def test_second_ctrl_c_during_launch_exits_130(fake_cluster, monkeypatch, capsys):
    def aborted(cfg, progress=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "simulate", aborted)
    assert main(["launch", "--address", "127.0.0.1:6379", "--model", "tiny"]) == 130
    assert capsys.readouterr().err == "dpfl: interrupted\n"


@pytest.mark.parametrize("argv", [["launch", "--address", "ray://h:1"], ["simulate", "--rounds", "0"],
                                  ["partitions", "--num-devices", "0"], ["report", "/nonexistent/run"]])
def test_bad_input_is_one_line_and_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpfl: error: ") and err.count("\n") == 1


def test_preflight_accepts_lora_and_rejects_too_many_top_layers():
    """`dpfl simulate --trainable lora` passes the preflight (it once rejected 'lora' as not all/head/topN)."""
    from dpfl.commands.simulate import preflight
    from settings.config import ConfigError, RunConfig

    preflight(RunConfig(model="tiny", trainable="lora", num_devices=4, cohort_size=2, max_examples=100).validate())
    import pytest

    with pytest.raises(ConfigError, match="transformer layers"):
        preflight(RunConfig(model="tiny", trainable="top99", num_devices=4, cohort_size=2, max_examples=100).validate())
