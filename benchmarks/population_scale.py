"""A simulation over a large population: wall time and the server process' peak resident memory.

Runs ``dpfl.commands.simulate.simulate`` (default: 10,000 devices of the built-in data, expected cohort 100,
3 rounds, ``--model tiny``) and samples, every 0.5 s in a thread, the resident set size of this
(server/driver) process and of the ClientApp actor processes under it. Reports the driver's peak
RSS (also ``ru_maxrss``), the actors' peak RSS, start-up (server init, device -> node
assignment) and per-round wall times.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.population_scale --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _descendants(root: int) -> list[int]:
    parent = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    parent[int(name)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, frontier = [], [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--num-devices", type=int, default=10_000)
    p.add_argument("--cohort-size", type=float, default=100.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)

    from dpfl.commands.logs import quiet as _quiet
    from dpfl.commands.simulate import simulate
    from settings.config import RunConfig

    _quiet()
    peak = {"driver": 0, "actors": 0, "actor_count": 0}
    stop = threading.Event()

    def sample():
        me = os.getpid()
        while not stop.is_set():
            peak["driver"] = max(peak["driver"], _rss(me))
            actors = [q for q in _descendants(me) if "ClientAppActor" in _cmdline(q)]
            for q in actors:
                peak["actors"] = max(peak["actors"], _rss(q))
            peak["actor_count"] = max(peak["actor_count"], len(actors))
            stop.wait(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    run_dir = tempfile.mkdtemp(prefix="dpfl-scale-") + "/run"
    cfg = RunConfig(
        model=a.model, num_devices=a.num_devices, cohort_size=a.cohort_size, rounds=a.rounds, data_dir=a.data_dir,
        local_epochs=a.local_epochs, run_dir=run_dir, run_id="scale",
    ).with_defaults().validate()
    t0 = time.perf_counter()
    result = simulate(cfg, progress=False)
    total = time.perf_counter() - t0
    stop.set()
    th.join()
    from rundir import read_metric_lines

    lines = read_metric_lines(run_dir)
    out = {
        "settings": {"model": a.model, "num_devices": a.num_devices, "cohort_size": a.cohort_size, "rounds": a.rounds},
        "total_seconds": total,
        "timings": result.get("timings"),
        "cohorts": [m["cohort_size"] for m in lines],
        "replies": [m["replies"] for m in lines],
        "phase_seconds": [m.get("phase_seconds") for m in lines],
        "driver_peak_rss_mb": peak["driver"] / 2**20,
        "driver_ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "actor_peak_rss_mb": peak["actors"] / 2**20,
        "actors": peak["actor_count"],
        "run_dir": run_dir,
    }
    print(json.dumps(out) if a.json else json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
