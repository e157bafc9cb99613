"""Runs that start, stop and fail cleanly (own Ray, exits that never hang, timeouts that fit,
degenerate settings refused, unique run directories, a final summary a user can act on).

The end-to-end tests run ``dpfl`` in a subprocess with ``TMPDIR`` set to a short folder of the
test's own (Ray's Unix socket paths must stay under 107 bytes), so the Ray instance the command
starts (and any current-cluster file Ray would follow) lives there, and the processes a test
kills are only that instance's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import shutil
import tempfile

import pytest

from settings.config import ConfigError, RunConfig

DPFL = str(Path(sys.executable).with_name("dpfl"))
TINY = ["--model", "tiny", "--num-devices", "4", "--cohort-size", "4", "--selection", "uniform",
        "--max-examples", "400", "--no-progress"]


@pytest.fixture
def short_tmp():
    """A short private TMPDIR for one test (removed afterwards)."""
    path = Path(tempfile.mkdtemp(prefix="dpfl-t", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmp), HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
               TOKENIZERS_PARALLELISM="false")
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def _dpfl(args: list[str], env: dict, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run([DPFL, *args], env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def _strict_json_lines(path: Path) -> list[dict]:
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines() if line.strip()]


def _ray_dirs(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("dpfl-ray-*"))


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


# ------------------------------------------------------------------------------------ end to end
def test_own_ray_despite_current_cluster_file_and_ray_address(tmp_path, short_tmp):
    """A stale current-cluster file and RAY_ADDRESS at a dead address are ignored; the summary is
    rounded and names the next command; metrics.jsonl is strict JSON; --resume of the finished
    run starts no Ray; audit without canaries exits 2 and writes nothing."""
    tmp = short_tmp
    (tmp / "ray").mkdir(parents=True)
    (tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")
    env = _env(tmp, RAY_ADDRESS="127.0.0.1:1")
    rd = tmp_path / "run"
    proc, _ = _dpfl(["simulate", *TINY, "--rounds", "2", "--run-dir", str(rd)], env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert f"run directory: {rd}" in out
    assert re.search(r"^accuracy \d\.\d{3}, macro-F1 \d\.\d{3} \(round 2 of 2\)$", out, re.M), out
    assert re.search(r"^example-level epsilon \d+\.\d{2} at delta [0-9.e-]+ \(max over devices\)$", out, re.M), out
    assert out.rstrip().endswith(f"next: dpfl report {rd}")
    rows = _strict_json_lines(rd / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]

    started = _ray_dirs(tmp)
    proc, seconds = _dpfl(["simulate", "--resume", str(rd)], env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"the run in {rd} is complete (2 rounds); nothing to resume" in proc.stdout
    assert "accuracy" in proc.stdout and f"next: dpfl report {rd}" in proc.stdout
    assert _ray_dirs(tmp) == started  # no new Ray instance

    before = _snapshot(rd)
    proc, _ = _dpfl(["audit", str(rd)], env, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpfl: error:") and "--canaries" in lines[0], proc.stderr
    assert _snapshot(rd) == before  # no report/ or audit/ written, nothing touched


def test_client_cpus_beyond_the_machine_exit_2_before_ray(tmp_path, short_tmp):
    tmp = short_tmp
    rd = tmp_path / "run"
    proc, seconds = _dpfl(["simulate", *TINY, "--rounds", "1", "--client-cpus", "64", "--run-dir", str(rd)],
                          _env(tmp), timeout=60)
    assert proc.returncode == 2 and seconds < 30
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpfl: error: --client-cpus 64: this machine has"), proc.stderr
    assert _ray_dirs(tmp) == [] and not rd.exists()


def _kill_raylet(tmp: Path) -> int:
    """SIGKILL the raylet of the Ray instance whose files are under ``tmp``; return how many were killed."""
    killed = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"/raylet") and any(str(tmp).encode() in a for a in argv):
            os.kill(int(pid), signal.SIGKILL)
            killed += 1
    return killed


def _wait_for(cond, proc: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"dpfl ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out waiting")
        time.sleep(0.2)


def test_backend_killed_mid_run_exits_nonzero_within_60s_and_resumes(tmp_path, short_tmp):
    """Ray's raylet killed after round 1: the command ends non-zero within 60 s; --resume (with a new
    --round-timeout, which config.toml then records) completes the run."""
    tmp = short_tmp
    env = _env(tmp)
    rd = tmp_path / "run"
    # local DP-SGD on every parameter: rounds slow enough for the kill to land mid-run
    args = ["simulate", *TINY, "--rounds", "6", "--noise-at", "device", "--trainable", "all",
            "--noise-multiplier", "1.0", "--run-dir", str(rd)]
    proc = subprocess.Popen([DPFL, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = rd / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, proc, timeout=300)
    assert _kill_raylet(tmp) == 1
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("dpfl did not exit within 60 s of its Ray backend failing") from None
    assert proc.returncode not in (0, None) and time.monotonic() - t0 < 60
    assert "Traceback" not in err, err[-3000:]
    if "dpfl: error:" in err:  # (when Ray itself ends the driver first, the exit code is all there is)
        assert f"dpfl simulate --resume {rd}" in err
    assert len(_strict_json_lines(metrics)) < 6

    proc2, _ = _dpfl(["simulate", "--resume", str(rd), "--round-timeout", "120"], env, timeout=400)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert [r["round"] for r in _strict_json_lines(metrics)][-1] == 6
    assert "round_timeout = 120.0" in (rd / "config.toml").read_text()


def _seed_with_one_hang() -> int:
    """A seed whose injected faults (rate 0.25) hang exactly one of 4 devices in round 1 and none in round 2."""
    from client.app import fault_for

    for seed in range(1000):
        r1 = [fault_for(seed, 1, d, 0.25, "hang") for d in range(4)]
        r2 = [fault_for(seed, 2, d, 0.25, "hang") for d in range(4)]
        if r1.count("hang") == 1 and r2.count("hang") == 0:
            return seed
    raise AssertionError("no seed found")


def test_hang_fault_with_default_timeout_finishes_the_round_and_exits(tmp_path, short_tmp):
    """One hung device of four in round 1: with the default (adaptive) deadline the round goes on
    without it long before the old one-hour default, and the command still exits."""
    from settings.config import ROUND_TIMEOUT_CAP

    rd = tmp_path / "run"
    seed = _seed_with_one_hang()
    args = ["simulate", *TINY, "--rounds", "2", "--seed", str(seed), "--fault-rate", "0.25", "--fault-kind", "hang",
            "--run-dir", str(rd)]
    proc, seconds = _dpfl(args, _env(short_tmp), timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _strict_json_lines(rd / "metrics.jsonl")
    assert rows[0]["timeouts"] == 1 and rows[0]["replies"] == 3
    assert rows[0]["seconds"] < 300 < ROUND_TIMEOUT_CAP
    assert rows[1]["timeouts"] == 0 and rows[1]["replies"] == 4
    assert seconds < 400


def _stop_with(proc: subprocess.Popen, signum: int, timeout: float) -> str:
    """Send ``signum`` to a running ``dpfl simulate``; return its stderr once it has ended."""
    proc.send_signal(signum)
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"{signal.Signals(signum).name} did not end the run within {timeout:g} s") from None


def test_first_sigint_abandons_the_waiting_round_and_exits_130(tmp_path, short_tmp):
    rd = tmp_path / "run"
    seed = _seed_with_one_hang()
    args = ["simulate", *TINY, "--rounds", "3", "--seed", str(seed), "--fault-rate", "0.25", "--fault-kind", "hang",
            "--run-dir", str(rd)]
    proc = subprocess.Popen([DPFL, *args], env=_env(short_tmp), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    # round 1 waits on the hung device for at least ROUND_TIMEOUT_FLOOR seconds: interrupt it then
    _wait_for(lambda: (rd / "ledger.sqlite").exists(), proc, timeout=300)
    time.sleep(8)
    assert not (rd / "metrics.jsonl").exists() or not (rd / "metrics.jsonl").read_text().strip()
    err = _stop_with(proc, signal.SIGINT, timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert f"interrupted; the run is resumable: dpfl simulate --resume {rd}" in err
    assert "Traceback" not in err


def test_sigterm_stops_the_run_with_one_line_exit_143_and_a_stopped_report(tmp_path, short_tmp):
    """A scheduler's stop (SIGTERM) ends a run as a first Ctrl-C does: the round in flight is
    abandoned, one dpfl line, exit code 143, no stack dump of Ray's; the report says stopped."""
    from report import build_report

    rd = tmp_path / "run"
    proc = subprocess.Popen([DPFL, "simulate", *TINY, "--rounds", "500", "--run-dir", str(rd)], env=_env(short_tmp),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (rd / "metrics.jsonl").exists() and (rd / "metrics.jsonl").read_text().count("\n") >= 2,
              proc, timeout=300)
    err = _stop_with(proc, signal.SIGTERM, timeout=90)
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == f"dpfl: stopped by SIGTERM; the run is resumable: dpfl simulate --resume {rd}"
    assert "SIGTERM received" not in err and "Traceback" not in err
    assert build_report(rd)["status"] == "stopped"


# ------------------------------------------------------------------------------------ settings
def test_zero_noise_with_dp_is_refused_unless_allowed_and_then_reported_not_private():
    with pytest.raises(ConfigError, match="--noise-multiplier: 0 with DP on .*--allow-zero-noise"):
        RunConfig(noise_multiplier=0.0).validate()
    with pytest.raises(ConfigError, match="--device-noise-multiplier: 0 with --device-dp"):
        RunConfig(dp=False, device_dp=True, device_noise_multiplier=0.0).validate()
    RunConfig(noise_multiplier=0.0, allow_zero_noise=True).validate()
    RunConfig(dp=False, noise_multiplier=0.0).validate()  # no DP: nothing is claimed

    from report.build import not_private_reason

    assert "no differential privacy guarantee" in not_private_reason(True, False, ("example",))
    assert not_private_reason(True, False, ()) is None


def test_local_epochs_zero_and_bad_round_timeout_are_refused():
    with pytest.raises(ConfigError, match="--local-epochs: must be >= 1"):
        RunConfig(local_epochs=0).validate()
    with pytest.raises(ConfigError, match="--round-timeout"):
        RunConfig(round_timeout=0.0).validate()
    assert RunConfig().round_timeout is None  # adaptive by default


def test_run_ids_started_in_one_second_differ_and_directories_are_claimed_once(tmp_path):
    from rundir import RunDirError, claim_run_dir

    ids = {RunConfig().with_defaults().run_id for _ in range(20)}
    assert len(ids) == 20
    assert all(re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", i) for i in ids)

    path = tmp_path / "runs" / "same"
    claim_run_dir(path)
    with pytest.raises(RunDirError, match="already exists"):
        claim_run_dir(path)  # the second run of two given the same directory
    made = tmp_path / "made-by-user"
    made.mkdir()
    claim_run_dir(made)  # an empty folder the user made is accepted
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("x")
    with pytest.raises(RunDirError, match="not empty"):
        claim_run_dir(full)
    with pytest.raises(RunDirError, match="is a file"):
        claim_run_dir(full / "notes.txt")


def test_only_round_timeout_may_change_on_resume():
    from dpfl.commands.flags import reject_settings_on_resume

    ns = SimpleNamespace(resume="r", round_timeout=60.0, rounds=None)
    assert reject_settings_on_resume(ns) == {"round_timeout": 60.0}
    with pytest.raises(ConfigError, match="drop --rounds"):
        reject_settings_on_resume(SimpleNamespace(resume="r", round_timeout=None, rounds=5))


def test_final_summary_is_rounded_and_says_when_nothing_trained():
    from dpfl.commands.simulate import format_summary

    figures = dict(rounds=30, planned=30, trained=120, accuracy=0.19586374695863748, macro_f1=0.1234567,
                   evaluated_round=30, epsilon_example=7.6712345, epsilon_device=None, dp=True, device_dp=False,
                   delta=1e-5)
    text = format_summary("runs/x", figures)
    assert "accuracy 0.196, macro-F1 0.123 (round 30 of 30)" in text
    assert "example-level epsilon 7.67 at delta 1e-05" in text
    assert text.splitlines()[-1] == "next: dpfl report runs/x"
    assert "0.19586" not in text
    nothing = format_summary("runs/x", {**figures, "trained": 0})
    assert "no device trained" in nothing and "accuracy" not in nothing
    joint = format_summary("runs/x", {**figures, "slot_f1": 0.87654})  # a slot task's summary gives its slot F1
    assert "accuracy 0.196, macro-F1 0.123, slot F1 0.877 (round 30 of 30)" in joint


def test_report_command_prints_rounded_figures():
    from dpfl.commands.report import headline

    summary = {"status": "stopped", "rounds_completed": 4, "rounds_planned": 10, "final_accuracy": 0.8234567,
               "final_macro_f1": 0.7111111, "final_slot_f1": 0.90123, "dp": True, "device_dp": True, "delta": 1e-5,
               "epsilon": {"example": {"max": 7.831553352723032}, "device": {"max": 2.9951}}}
    text = headline(summary)
    assert text.splitlines()[0] == "status: stopped (4 of 10 rounds)"
    assert "accuracy 0.823, macro-F1 0.711, slot F1 0.901" in text
    assert "example-level epsilon 7.83 at delta 1e-05" in text and "device-level epsilon 3.00 at delta 1e-05" in text
    assert "7.8315" not in text
    off = headline({**summary, "dp": False, "device_dp": False, "not_private": "DP was off",
                    "epsilon": {"example": {"max": "inf"}, "device": None}})
    assert "NOT PRIVATE: DP was off" in off and "epsilon" not in off


# ------------------------------------------------------------------------------------ the round deadline
class _Grid:
    """Answers the first ``answered`` messages at once and the rest never."""

    def __init__(self, answered: int):
        self.answered = answered
        self.given = False

    def push_messages(self, msgs):
        return [f"m{i}" for i in range(len(msgs))]

    def pull_messages(self, ids):
        if self.given:
            return []
        self.given = True
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{i}")) for i in range(self.answered)]


def test_adaptive_deadline_stops_waiting_for_stragglers(monkeypatch):
    import settings.config as config
    from server.control import receive

    monkeypatch.setattr(config, "ROUND_TIMEOUT_FLOOR", 0.5)
    replies = []
    waited = receive(_Grid(2), [None] * 4, 60.0, lambda r, i: replies.append(i), adaptive=True)
    assert replies == [0, 1] and 0.4 < waited < 5.0
    # a fixed --round-timeout waits its length even once half have replied
    waited = receive(_Grid(2), [None] * 4, 1.5, lambda r, i: None, adaptive=False)
    assert 1.4 < waited < 5.0
    # fewer than half replied: the adaptive deadline never starts, the cap ends the wait
    waited = receive(_Grid(1), [None] * 4, 1.0, lambda r, i: None, adaptive=True)
    assert 0.9 < waited < 5.0


def test_a_failed_backend_check_ends_the_round(monkeypatch):
    from settings.interrupt import BackendLost
    from server.control import RunControl, receive

    control = RunControl(checks=[lambda: "Ray processes died: raylet"], check_seconds=0.0)
    t0 = time.monotonic()
    with pytest.raises(BackendLost, match="raylet"):
        receive(_Grid(1), [None] * 4, 60.0, lambda r, i: None, control=control)
    assert time.monotonic() - t0 < 5


@pytest.fixture(scope="module")
def lamp_data(tmp_path_factory):
    from inprocess import write_lamp_data

    return write_lamp_data(tmp_path_factory.mktemp("cleandata"))


@pytest.mark.usefixtures("task_identity")
def test_target_epsilon_device_calibrates_the_device_noise(tmp_path, lamp_data):
    """--device-dp --target-epsilon-device E without --device-noise-multiplier: sigma_u is the one
    dp-accounting's PLD calibration gives for the largest q_k over every round, config.toml records
    it, and the run's device-level epsilon stays at or below E."""
    import tomllib

    from dp.accounting import calibrate_noise_multiplier
    from inprocess import run_rounds, toy_config

    cfg = toy_config(tmp_path / "run", lamp_data, dp=False, device_dp=True, target_epsilon_device=2.0, rounds=3,
                     cohort_size=2)
    assert cfg.device_noise_multiplier is None
    server, _, _, outs = run_rounds(cfg)
    q_max = 2 / 4  # uniform selection: expected cohort / devices
    expected = calibrate_noise_multiplier(2.0, server.delta, schedule=[(q_max, 3)], accountant="pld")
    assert server.cfg.device_noise_multiplier == pytest.approx(expected, rel=1e-9)
    written = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert written["device_noise_multiplier"] == pytest.approx(expected, rel=1e-9)
    assert 0 < outs[-1].epsilon_device_max <= 2.0 * (1 + 1e-9)
    assert RunConfig(dp=False, device_dp=True).validate().device_noise_multiplier is None  # 1.0 at run start


def test_progress_estimate_leaves_out_the_first_round():
    """The first round starts Ray and encodes features (49 s of a 10-minute run): the remaining
    time comes from the rounds after it, and none is given before there is one."""
    from server.app import _eta

    assert _eta([49.0], 29) == {}
    assert _eta([49.0, 10.0, 12.0], 27) == {"eta": "4:57"}
    assert _eta([49.0, 200.0], 20) == {"eta": "1:06:40"}
    assert _eta([49.0, 10.0], 0) == {}
