"""``dpfl launch`` on a real two-node Ray cluster started on this machine.

The module starts a Ray head and a second raylet (two Ray nodes, one CPU each) in a private
temp dir with free ports, runs ``dpfl launch`` against it in a subprocess, and checks that
devices trained on both nodes and that ledger and metrics are complete. Teardown stops
exactly the processes this module started: every ``ray start`` runs in its own session, so
the daemons it leaves behind (GCS, raylet, agents, workers) share its process group, which
is killed; any leftover process whose command line names the private temp dir is killed
too. ``ray stop`` is never used (it would stop every Ray instance on the machine).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rundir import LedgerReader, config_path, read_metric_lines

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = BIN / "ray"
DPFL = BIN / "dpfl"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_in_groups(pgids: set[int]) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            state, pgid = fields[0], int(fields[2])
        except (OSError, ValueError, IndexError):
            continue
        if pgid in pgids and state != "Z":
            out.append(int(d.name))
    return out


def _pids_naming(text: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            out.append(int(d.name))
    return out


class LocalCluster:
    """A two-node Ray cluster on this machine; :meth:`stop` kills only what it started."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="dpflrc-", dir="/tmp"))  # short: unix socket paths <= 107 chars
        self.pgids: set[int] = set()
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = dict(
            os.environ,
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            RAY_USAGE_STATS_ENABLED="0",
            RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
        )
        self.env.pop("RAY_ADDRESS", None)
        self._stopped = False
        atexit.register(self.stop)

    def _ray_start(self, name: str, args: list[str]) -> None:
        log = open(self.tmp / f"{name}.log", "w")
        proc = subprocess.Popen(
            [str(RAY), "start", *args, "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
             "--object-store-memory", str(100 * 1024 * 1024), "--temp-dir", str(self.tmp / name),
             "--disable-usage-stats", "--dashboard-agent-listen-port", str(_free_port()),
             "--metrics-export-port", str(_free_port())],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.tmp, start_new_session=True,
        )
        self.pgids.add(proc.pid)  # its own session: the daemons it spawns keep this process group
        try:
            rc = proc.wait(timeout=90)
        finally:
            log.close()
        if rc != 0:
            raise RuntimeError(f"ray start ({name}) failed:\n{(self.tmp / f'{name}.log').read_text()[-3000:]}")

    def start(self) -> "LocalCluster":
        try:
            self._ray_start("h", ["--head", "--port", str(self.port), "--include-dashboard", "false",
                                  "--dashboard-port", str(_free_port()), "--ray-client-server-port", str(_free_port())])
            self._ray_start("w", ["--address", self.address])
            self._wait_for_nodes(2)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_nodes(self, n: int, timeout: float = 60.0) -> None:
        code = (
            "import ray,sys; ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False, logging_level='ERROR');"
            "print(sum(1 for x in ray.nodes() if x['Alive'])); ray.shutdown()"
        )
        t0 = time.time()
        while True:
            r = subprocess.run([sys.executable, "-c", code, self.address], capture_output=True, text=True,
                               env=self.env, timeout=60, cwd=self.tmp)
            lines = r.stdout.strip().splitlines()
            if r.returncode == 0 and lines and int(lines[-1]) >= n:
                return
            if time.time() - t0 > timeout:
                raise RuntimeError(f"the cluster has not {n} alive nodes: {r.stdout}{r.stderr[-2000:]}")
            time.sleep(1)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            for pgid in self.pgids:
                try:
                    os.killpg(pgid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            t0 = time.time()
            while _pids_in_groups(self.pgids) and time.time() - t0 < wait:
                time.sleep(0.2)
            if not _pids_in_groups(self.pgids):
                break
        for pid in _pids_naming(str(self.tmp)):  # anything that left the group but runs from our temp dir
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def alive(self) -> list[int]:
        return _pids_in_groups(self.pgids) + _pids_naming(str(self.tmp))


def _run_in_group(cmd: list[str], env: dict, timeout: float, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; kill the whole group on timeout or interrupt."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out = proc.communicate()[0]
        print(out[-5000:])
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


@pytest.fixture(scope="module")
def cluster():
    if not RAY.exists():
        pytest.skip("the ray CLI is not installed next to this Python")
    c = LocalCluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()
    assert not c.alive(), f"processes left behind: {c.alive()}"


@pytest.fixture(scope="module")
def launched(cluster, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("launch") / "run"
    cmd = [
        str(DPFL), "launch", "--address", cluster.address, "--model", "tiny", "--num-devices", "6",
        "--rounds", "2", "--cohort-size", "6", "--client-cpus", "1", "--max-length", "24", "--max-examples", "240",
        "--run-dir", str(run_dir), "--no-progress", "--selection", "uniform",  # q = 1: all six devices each round
        "--noise-at", "device",  # device replies name the Ray node they ran on (aggregate replies hold only the sum)
    ]
    r = _run_in_group(cmd, cluster.env, timeout=150, cwd=REPO)
    print(r.stdout[-4000:])
    assert r.returncode == 0, r.stdout[-4000:]
    return run_dir, r.stdout


def test_devices_trained_on_both_nodes(launched):
    run_dir, out = launched
    metrics = read_metric_lines(run_dir)
    union = {n for m in metrics for n in m["device_nodes"].values()}
    assert len(union) == 2 or any(m["ray_nodes"] == 2 for m in metrics), metrics
    assert "Ray cluster at" in out and "2 node(s)" in out
    assert "devices trained on 2 of 2 Ray node(s)" in out


def test_ledger_and_metrics_complete(launched):
    run_dir, _ = launched
    metrics = read_metric_lines(run_dir)
    assert [m["round"] for m in metrics] == [1, 2]
    ledger = LedgerReader(run_dir / "ledger.sqlite")
    rows = [(e.round, e.device_id) for e in ledger.events()]
    for m in metrics:
        assert m["failures"] == 0
        trained = sorted(d for r, d in rows if r == m["round"])
        assert len(trained) == m["replies"] == m["cohort_size"]
        assert trained == sorted(int(k) for k in m["device_nodes"])
        assert all(m["device_nodes"].values())
    assert len(ledger.rounds()) == 2
    assert config_path(run_dir).is_file()


def test_node_check_names_node_and_missing_path(cluster, tmp_path):
    """A path a node cannot read ends the launch before training, naming node and path."""
    missing = tmp_path / "not-on-the-nodes"
    code = (
        "import sys\n"
        "from settings.config import RunConfig\n"
        "from dpfl.commands.launch import check_cluster, NodeCheckError\n"
        "cfg = RunConfig(model='tiny', data_dir=sys.argv[2], num_devices=4, cohort_size=2, ray_address=sys.argv[1])\n"
        "try:\n"
        "    check_cluster(cfg)\n"
        "except NodeCheckError as e:\n"
        "    print('ERR', e); sys.exit(3)\n"
    )
    r = _run_in_group([sys.executable, "-c", code, cluster.address, str(missing)], cluster.env, timeout=90, cwd=REPO)
    assert r.returncode == 3, r.stdout[-3000:]
    err = r.stdout[r.stdout.index("ERR"):]
    assert err.count(f"--data-dir file {missing}/train.jsonl does not exist") == 2  # once per node
    named = re.findall(r"node (\S+) \((\S+), id ([0-9a-f]{12})\): --data-dir file", err)
    assert len({n[2] for n in named}) == 2, err  # each node is named by its IP, host and id


def test_bad_address_fails_before_training():
    r = subprocess.run([str(DPFL), "launch", "--address", "ray://head:10001", "--model", "tiny"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("dpfl: error: --address ray://head:10001")
