"""`flwr run .` (the README's Flower-app path) trains to the end, writes the run directory that
`dpfl simulate` writes, and leaves none of this run's processes behind but Flower's own local
SuperLink, which the test then stops."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from rundir import LedgerReader

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SUPERLINK_PORT = 39091  # Flower 1.41's managed local SuperLink (flwr.cli.local_superlink)


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _ours(home: str) -> list[psutil.Process]:
    """Processes whose command line names this test's FLWR_HOME (the SuperLink, its SuperExec and
    what they start), with their children."""
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if home in " ".join(p.info["cmdline"] or []):
                for q in [p, *p.children(recursive=True)]:
                    found[q.pid] = q
        except psutil.Error:
            continue
    return list(found.values())


def _live(home: str) -> list[psutil.Process]:
    """:func:`_ours` less the exited (zombie) ones."""
    live = []
    for p in _ours(home):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                live.append(p)
        except psutil.Error:
            continue
    return live


def _names(procs: list[psutil.Process]) -> set[str]:
    names = set()
    for p in procs:
        try:
            names.add(" ".join(p.cmdline()[:2]))
        except psutil.Error:
            continue
    return names


def _daemons(names: set[str]) -> bool:
    """Only Flower's local SuperLink and its SuperExec (which it keeps for the next run)."""
    return all("flower-superlink" in n or "flower-superexec" in n for n in names)


def _stop(home: str) -> None:
    procs = _ours(home)
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=30)


@pytest.mark.slow
def test_flwr_run_trains_to_the_end_and_writes_the_run_directory(tmp_path):
    if _port_taken(LOCAL_SUPERLINK_PORT):
        pytest.skip(f"a Flower SuperLink already listens on 127.0.0.1:{LOCAL_SUPERLINK_PORT}: not this test's to use")
    home = str(tmp_path / "flwr-home")
    run_dir = tmp_path / "run"
    bin_dir = str(Path(sys.executable).parent)  # flwr starts `flower-superlink` from PATH: this environment's
    env = dict(os.environ, FLWR_HOME=home, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", HF_HUB_OFFLINE="1",
               PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    flwr = str(Path(bin_dir) / "flwr")
    config = f'rounds=2 model="tiny" num-devices=6 cohort-size=3.0 run-dir="{run_dir}"'
    try:
        done = subprocess.run([flwr, "run", str(ROOT), "--run-config", config, "--stream"], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=480)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [x["round"] for x in lines] == [1, 2]
        assert all(x["replies"] == x["cohort_size"] for x in lines)  # 6 devices on Flower's 2 SuperNodes
        assert (run_dir / "config.toml").is_file() and (run_dir / "checkpoints" / "global.pt").is_file()
        with LedgerReader(run_dir / "ledger.sqlite") as ledger:
            assert ledger.events_by_device("example")  # every round's privacy events, accounted
        # nothing of the run is left but Flower's local SuperLink (a daemon for the next `flwr run`)
        deadline = time.monotonic() + 60  # the simulation process shuts its Ray instance down first
        while (names := _names(_live(home))) and not _daemons(names) and time.monotonic() < deadline:
            time.sleep(1)
        assert _daemons(names), names
    finally:
        _stop(home)
    assert _live(home) == []
