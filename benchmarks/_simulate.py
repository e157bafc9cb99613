"""How the benchmarks run one ``dpfl simulate``: reuse a finished run, resume a stopped one, time a new one."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path


def run_simulate(cmd: list[str], run_dir: Path, *, finished: bool, started: bool) -> tuple[str, float]:
    """Run ``cmd`` (a ``dpfl simulate`` command line) unless ``finished``; ``started`` resumes ``run_dir``.

    Returns (the command as text, wall seconds; NaN when the finished run is reused).

    Raises
    ------
    subprocess.CalledProcessError
        If the run fails.
    """
    text = " ".join(shlex.quote(c) for c in cmd)
    if finished:
        print(f"[reuse] {run_dir} is finished", flush=True)
        return text, float("nan")
    if started:
        cmd = ["dpfl", "simulate", "--resume", str(run_dir), "--no-progress"]
    print(f"[run] {text}", flush=True)
    t0 = time.perf_counter()
    exe = Path(sys.executable).with_name("dpfl")
    subprocess.run([str(exe) if exe.exists() else cmd[0], *cmd[1:]], check=True)
    return text, time.perf_counter() - t0
