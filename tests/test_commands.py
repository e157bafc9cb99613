"""Every command maps errors the same way (dpfl/commands/errors.py): bad input -> 2, Ctrl-C -> 130."""

from pathlib import Path

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


def test_information_is_not_logged_as_a_warning():
    """Noise calibration, resume and deletions in effect are information: ``dpfl: ...``; a
    warning says so (``dpfl: warning: ...``); other libraries keep their level and name."""
    import logging

    from dpfl.commands.logs import DpflFormatter

    fmt = DpflFormatter("%(levelname)s %(name)s: %(message)s")

    def line(name, level, msg):
        return fmt.format(logging.LogRecord(name, level, __file__, 1, msg, None, None))

    assert line("dpfl.server", logging.INFO, "target epsilon 8: noise multiplier calibrated to 0.85") == \
        "dpfl: target epsilon 8: noise multiplier calibrated to 0.85"
    assert line("dpfl.server", logging.WARNING, "round 3: device 2 failed") == "dpfl: warning: round 3: device 2 failed"
    assert line("ray", logging.WARNING, "x") == "WARNING ray: x"


def test_calibration_and_resume_are_logged_as_information(tmp_path, caplog):
    import logging

    from inprocess import toy_config, write_lamp_data
    from server.state import Server

    cfg = toy_config(tmp_path / "run", write_lamp_data(tmp_path), noise_at="aggregate", trainable="head",
                     target_epsilon=8.0, noise_multiplier=None)
    with caplog.at_level(logging.INFO, logger="dpfl"):
        Server(cfg).ledger.close()
        Server(cfg, resume=True).ledger.close()
    said = {r.getMessage().split(":")[0].split(" ")[0]: r.levelno for r in caplog.records if r.name.startswith("dpfl")}
    assert said.get("target") == logging.INFO and said.get("resuming") == logging.INFO, said
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("dpfl")]


def test_partitions_without_out_writes_a_new_folder_not_the_current_directory(tmp_path, monkeypatch, capsys):
    from dpfl.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["partitions", "--num-devices", "4", "--cohort-size", "2", "--max-examples", "200"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]
    (folder,) = (tmp_path / "runs").iterdir()
    assert folder.name.startswith("partitions-") and (folder / "partition_stats.json").is_file()
    assert str(Path("runs") / folder.name) in capsys.readouterr().out


@pytest.mark.parametrize("command", ["", "simulate", "retrain", "report", "launch", "partitions", "audit", "export", "predict"])
def test_help_imports_nothing_heavy(command):
    """`dpfl --help` and each subcommand's help print without torch, transformers, Ray, Flower
    or datasets (those imports took 10-17 s before anything was printed)."""
    import subprocess
    import sys

    code = ("import sys\nfrom dpfl.cli import main\ntry:\n    main([" + (f"{command!r}, " if command else "")
            + "'--help'])\nexcept SystemExit:\n    pass\nheavy = [m for m in ('torch', 'transformers', 'ray', 'flwr', "
            "'datasets', 'matplotlib', 'peft') if m in sys.modules]\nprint('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert "usage: dpfl" in out.stdout, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "HEAVY []", out.stdout[-500:]
