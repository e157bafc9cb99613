"""``dpfl simulate``: the federated DP run on one machine (a local Ray instance).

Bad input (settings, data files, model paths, run directories) ends with one line
``dpfl: error: ...`` on stderr and exit code 2, before any training starts (:func:`preflight`);
Ctrl-C stops the run at a safe point with exit code 130, its run directory resumable
(``dpfl simulate --resume RUN_DIR``). See :mod:`dpfl.commands.errors`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from dpfl.commands.errors import exits
from dpfl.commands.flags import add_config_args, config_from_args, reject_settings_on_resume
from settings.config import ConfigError, RunConfig, parse_trainable
from settings.interrupt import BackendLost, Interrupted

__all__ = ["add_parser", "finished", "format_summary", "preflight", "print_result", "resume_config", "round_figure", "run",
           "run_figures", "simulate"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``dpfl simulate`` on ``subparsers`` (every setting group's flags and its own); return its parser."""
    p = subparsers.add_parser("simulate", help="run a federated DP simulation (Flower + Ray)")
    add_config_args(p)  # every setting group
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--resume", metavar="RUN_DIR", default=None,
        help="continue the run in RUN_DIR from its last complete round, with its own settings (config.toml)",
    )
    return p


def local_cpus() -> int:
    """CPUs this process may use (its affinity mask where the platform has one), as Ray counts them locally."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def check_local_resources(client_cpus: float, client_gpus: float) -> None:
    """Refuse client resources this machine cannot give one simulated device (before Ray starts).

    Ray would otherwise start, find no worker that fits, and fail with "ActorPool is empty"
    tracebacks.

    Raises
    ------
    ConfigError
        ``client_cpus`` above the machine's CPUs, or ``client_gpus`` > 0 with fewer GPUs.
    """
    cpus = local_cpus()
    if client_cpus > cpus:
        raise ConfigError(f"--client-cpus {client_cpus:g}: this machine has {cpus} CPU{'s' if cpus != 1 else ''}, "
                          f"so no simulated device would fit; use at most {cpus} (fractions such as 0.5 are allowed)")
    if client_gpus > 0:
        import torch

        gpus = torch.cuda.device_count()
        if client_gpus > gpus:
            raise ConfigError(f"--client-gpus {client_gpus:g}: this machine has {gpus} GPU{'s' if gpus != 1 else ''}; "
                              f"use at most {gpus}" + (" (0 trains on the CPU)" if gpus == 0 else ""))


def preflight(cfg: RunConfig, resume: bool = False) -> None:
    """Check everything that can be checked before Ray starts (data, partition, model, run dir, calibration).

    Raises the same errors the run would raise (ConfigError, DataError, ModelError,
    RunDirError, ValueError), so bad input ends before any process is started.
    """
    from nlu.model import check_hub_model, load_tokenizer, num_encoder_layers, resolve_model_path, set_trainable, uses_lora
    from nlu.tasks import task_for_data
    from partitions.population import build_population
    from rundir import RunDirError, config_path
    from server.deletions import load_deletions
    from server.plan import resolve
    from server.state import load_baseline_model

    if not cfg.ray_address:
        check_local_resources(cfg.client_cpus, cfg.client_gpus)
    if resume:
        if not config_path(cfg.run_dir).exists():
            raise RunDirError(f"--resume {cfg.run_dir}: no run there (config.toml is missing)")
    elif config_path(cfg.run_dir).exists():
        raise RunDirError(f"--run-dir {cfg.run_dir} already holds a run; choose a new --run-dir (or --resume it)")
    if cfg.baseline_model and not Path(cfg.baseline_model).is_file():
        raise ConfigError(f"--baseline-model {cfg.baseline_model}: file not found (give a state dict .pt of the "
                          "run's model, e.g. RUN_DIR/checkpoints/global.pt of another run)")
    resolve_model_path(cfg.model)
    check_hub_model(cfg.model)
    load_tokenizer(cfg.model)
    pop = build_population(cfg)
    task = task_for_data(cfg.task, pop.data, cfg.slot_loss_weight, pooling=cfg.pooling, pc_weight=cfg.pc_weight)
    if pop.num_devices != cfg.num_devices:
        raise ValueError(f"--num-devices: the partition has {pop.num_devices} devices, expected {cfg.num_devices}")
    if cfg.deletions and not resume:  # a resume reads the run's own copy, checked when it was made
        load_deletions(cfg.deletions, pop.num_devices)
    top = None if uses_lora(cfg.trainable) else parse_trainable(cfg.trainable)
    if top and top > num_encoder_layers(cfg.model):
        raise ConfigError(f"--trainable {cfg.trainable}: {cfg.model} has {num_encoder_layers(cfg.model)} "
                          "transformer layers; choose a smaller N")
    if uses_lora(cfg.trainable):  # the adapters the server will build (--lora-targets must match modules)
        set_trainable(task.build_model(cfg.model, seed=cfg.seed), cfg.trainable, **cfg.lora_options())
    if cfg.baseline_model:
        load_baseline_model(task, cfg)
    resolve(cfg, pop)  # the server's own resolution: selection constant and calibration (the default target included)


def resume_config(run_dir: str, flag: str = "--resume") -> RunConfig:
    """The RunConfig of the run in ``run_dir`` (its ``config.toml``), pointed at ``run_dir``;
    ``flag`` is what the error names (the option or command that gave ``run_dir``).

    Raises
    ------
    RunDirError
        If ``run_dir`` holds no run.
    """
    from rundir import RunDirError, config_path

    path = config_path(run_dir)
    if not path.exists():
        raise RunDirError(f"{flag} {run_dir}: no run there (config.toml is missing)")
    return RunConfig.from_toml(path).replace(run_dir=str(run_dir)).validate()


#: Longest temp folder Ray's session files fit under: its socket paths add about 70 characters
#: and a Unix socket path is at most 107 bytes.
RAY_TEMP_MAX_CHARS = 36


def ray_temp_dir() -> str:
    """A new private folder for this run's Ray instance, under the temp dir (``TMPDIR``), or
    under ``/tmp`` when that path is too long for Ray's Unix sockets."""
    base = tempfile.gettempdir()
    if len(base) > RAY_TEMP_MAX_CHARS and os.path.isdir("/tmp"):
        base = "/tmp"
    return tempfile.mkdtemp(prefix="dpfl-ray-", dir=base)


def _local_ray_node():
    """The Ray node (its process table) that ``ray.init`` started in this process, or None."""
    import ray._private.worker as ray_worker

    return getattr(ray_worker, "_global_node", None)


#: Seconds the process may take to stop once its Ray backend has failed before it exits regardless.
BACKEND_EXIT_SECONDS = 20.0


def local_ray_check(run_dir: str, bound: dict):
    """A backend check (see :class:`server.control.RunControl`) for the Ray instance this process started.

    Returns None while every Ray process of the instance is alive (or before Ray has started);
    else the reason, e.g. ``"Ray processes died: gcs_server, raylet"``. On the first failure
    it arms a daemon timer: if the process has not ended :data:`BACKEND_EXIT_SECONDS` later
    (Flower or Ray hanging in shutdown), it prints the error line (unless already printed)
    and exits with code 1, so a failed backend never leaves the command hanging.
    """
    armed = threading.Event()

    def hard_exit(reason: str) -> None:
        if not bound.get("reported"):
            print(f"dpfl: error: the Ray backend failed ({reason}); the run is resumable: "
                  f"dpfl simulate --resume {run_dir}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)

    def check() -> str | None:
        node = _local_ray_node()
        if node is None:
            return None
        try:
            dead = node.dead_processes()
        except Exception:  # pragma: no cover - a Ray internal changed: do not fail the run on it
            return None
        if not dead:
            return None
        reason = "Ray processes died: " + ", ".join(sorted({str(kind) for kind, _ in dead}))
        if not armed.is_set():
            armed.set()
            timer = threading.Timer(BACKEND_EXIT_SECONDS, hard_exit, args=(reason,))
            timer.daemon = True
            timer.start()
        return reason

    return check


#: Seconds Flower and Ray may take to stop after the server's last round before the run moves on.
BACKEND_STOP_SECONDS = 15.0
#: Set when the backend did not stop in time (a device task still hung): the ``dpfl`` command
#: then ends its process with ``os._exit`` instead of waiting for the hung threads.
STUCK = threading.Event()


def _kill_local_ray() -> None:
    """Kill the processes of the Ray instance this process started (raylet, GCS; workers die with them)."""
    try:
        node = _local_ray_node()
        if node is not None:
            node.kill_all_processes(check_alive=False, allow_graceful=False)
    except Exception:  # pragma: no cover - best effort: the process is about to end anyway
        pass


def _run_until_server_done(run_simulation, bound: dict, local: bool, handlers: dict | None = None) -> None:
    """Run ``run_simulation()`` in a daemon thread; return when it returns, or when the server is
    done (``bound["done"]``) and the backend has not stopped :data:`BACKEND_STOP_SECONDS` later.

    A device task that never returns (a hung device) keeps Flower's worker pool, and so
    ``run_simulation``, waiting forever after the last round; this returns anyway (killing
    this process's own Ray instance when ``local``) and sets :data:`STUCK`. Exceptions of
    ``run_simulation`` are re-raised here. The main thread stays free for Ctrl-C.

    ``handlers`` (signal -> Python handler) are installed again once Ray has started: Ray's core
    installs a C-level failure handler for SIGTERM that prints a stack dump and aborts.
    """
    holder: dict = {}

    def target() -> None:
        try:
            run_simulation()
        except BaseException as exc:  # re-raised in the caller's thread
            holder["error"] = exc

    STUCK.clear()
    sim = threading.Thread(target=target, name="dpfl-simulation", daemon=True)
    sim.start()
    done_at = None
    reinstalled = not handlers
    while sim.is_alive():
        sim.join(0.2)
        if not reinstalled and getattr(sys.modules.get("ray"), "is_initialized", lambda: False)():
            time.sleep(1.0)  # Ray's core installs its handler as it connects
            for signum, handler in (handlers or {}).items():
                signal.signal(signum, handler)
            reinstalled = True
        if done_at is None and bound.get("done"):
            done_at = time.monotonic()
        if done_at is not None and sim.is_alive() and time.monotonic() - done_at > BACKEND_STOP_SECONDS:
            STUCK.set()
            if local:
                _kill_local_ray()
            break
    if "error" in holder:
        raise holder["error"]


def simulate(cfg: RunConfig, progress: bool = True, resume: bool = False) -> dict:
    """Run the federated simulation of ``cfg`` on a local Ray instance (or ``cfg.ray_address``).

    ``resume`` continues the run in ``cfg.run_dir`` from its last complete round. Ctrl-C
    (SIGINT, from the main thread) stops the run at the next safe point, shuts Ray down and
    raises :class:`~settings.interrupt.Interrupted`; the run directory stays resumable. A second
    Ctrl-C aborts.

    Returns
    -------
    dict
        ``run_dir``, ``delta`` and the last round's outcome.
    """
    preflight(cfg, resume=resume)  # before the heavy imports: bad input fails fast
    if not resume:
        from rundir import claim_run_dir

        claim_run_dir(cfg.run_dir)  # atomic: two runs never share a directory

    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import make_server_app
    from server.control import RunControl

    init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
    if cfg.ray_address:
        init_args["address"] = cfg.ray_address
    else:
        # A Ray instance of this run's own: never the machine's current cluster
        # (/tmp/ray/ray_current_cluster) nor RAY_ADDRESS, which would ship the devices' data to
        # a cluster the user did not name (dpfl launch --address attaches to the one it names).
        os.environ.pop("RAY_ADDRESS", None)
        init_args["address"] = "local"
        init_args["_temp_dir"] = ray_temp_dir()
    backend_config = {
        "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": cfg.client_gpus},
        "init_args": init_args,
    }
    control = RunControl()  # this run's stop flag, backend checks and outcome
    if not cfg.ray_address:
        control.checks.append(local_ray_check(cfg.run_dir, control.outcome))

    def lost() -> BackendLost | None:
        info = control.outcome.get("backend_lost")
        if not info:
            return None
        info["reported"] = control.outcome["reported"] = True
        return BackendLost(f"the Ray backend failed during the run ({info['reason']}); the run is resumable: "
                           f"dpfl simulate --resume {cfg.run_dir}")

    def stopped() -> Interrupted:
        signum = control.outcome.get("signal", signal.SIGINT)
        how = "stopped by SIGTERM" if signum == signal.SIGTERM else "interrupted"
        return Interrupted(f"{how}; the run is resumable: dpfl simulate --resume {cfg.run_dir}", exit_code=128 + int(signum))

    old_handlers: dict = {}
    ours: dict = {}
    if threading.current_thread() is threading.main_thread():

        def _on_sigint(signum, frame):
            if control.stop.is_set():  # second Ctrl-C: abort now
                signal.signal(signal.SIGINT, signal.default_int_handler)
                STUCK.set()  # do not wait for Flower's threads on the way out
                if not cfg.ray_address:
                    _kill_local_ray()
                raise KeyboardInterrupt
            print("\ndpfl: stopping after the round in flight is abandoned (Ctrl-C again to abort)", file=sys.stderr)
            control.stop.set()

        def _on_sigterm(signum, frame):  # a scheduler's or `kill`'s stop: as the first Ctrl-C, with exit code 143
            if control.stop.is_set():  # a second one: abort now
                STUCK.set()
                if not cfg.ray_address:
                    _kill_local_ray()
                print("dpfl: stopped by a second SIGTERM; the run is resumable: "
                      f"dpfl simulate --resume {cfg.run_dir}", file=sys.stderr, flush=True)
                os._exit(128 + int(signal.SIGTERM))
            print("\ndpfl: SIGTERM: stopping after the round in flight is abandoned", file=sys.stderr, flush=True)
            control.outcome["signal"] = signal.SIGTERM
            control.stop.set()

        ours = {signal.SIGINT: _on_sigint, signal.SIGTERM: _on_sigterm}
        old_handlers = {signum: signal.signal(signum, handler) for signum, handler in ours.items()}
    try:
        _run_until_server_done(lambda: run_simulation(
            server_app=make_server_app(cfg, control, progress=progress, resume=resume),
            client_app=client_app,
            num_supernodes=cfg.supernodes(),  # devices take the nodes in turn (server.app.map_nodes_to_devices)
            backend_config=backend_config,
        ), control.outcome, local=not cfg.ray_address, handlers=ours)
    except Exception:
        if control.stop.is_set():
            raise stopped() from None
        exc = lost()
        if exc is not None:
            raise exc from None
        raise
    finally:
        for signum, handler in old_handlers.items():
            signal.signal(signum, handler)
    result = control.outcome.get("result")
    if result is None:
        exc = lost()
        if exc is not None:
            raise exc
        if control.stop.is_set():
            raise stopped()
        raise RuntimeError("the simulation ended without finishing its rounds (see the log above)")
    return result


def round_figure(x: Any, digits: int = 3) -> str:
    """A figure for the terminal: ``digits`` decimals, ``n/a`` for None, the infinity sign for inf."""
    if x is None:
        return "n/a"
    x = float(x)
    return "∞ (infinity)" if x == float("inf") else f"{x:.{digits}f}"


def run_figures(run_dir: str) -> dict[str, Any]:
    """What the final summary says of the run in ``run_dir``, read from its files (no Ray).

    Returns
    -------
    dict
        ``rounds`` (last complete round), ``planned`` (config.toml's rounds), ``trained``
        (accepted replies over all rounds), ``accuracy`` / ``macro_f1`` / ``slot_f1`` (the last
        evaluated round's, or None; slot F1 only for a slot task), ``evaluated_round``, ``epsilon_example`` / ``epsilon_device`` (max over
        devices, None where that level is off) and ``delta`` (the ledger's target delta).
    """
    import tomllib

    from rundir import LedgerReader, config_path, read_metrics

    rows = read_metrics(run_dir)[0]
    cfg = tomllib.loads(config_path(run_dir).read_text())
    delta = cfg.get("target_delta")
    try:
        with LedgerReader(run_dir) as ledger:
            runs = ledger.runs()
        if runs and runs[-1].target_delta is not None:
            delta = runs[-1].target_delta
    except Exception:  # an unreadable ledger leaves the config's delta (or none)
        pass
    evaluated = [r for r in rows if r.get("accuracy") is not None]
    last = rows[-1] if rows else {}
    return {
        "rounds": int(last.get("round", 0)),
        "planned": int(cfg.get("rounds", 0)),
        "trained": sum(int(r.get("replies") or 0) for r in rows),
        "accuracy": evaluated[-1]["accuracy"] if evaluated else None,
        "macro_f1": evaluated[-1].get("macro_f1") if evaluated else None,
        "slot_f1": evaluated[-1].get("slot_f1") if evaluated else None,
        "evaluated_round": evaluated[-1]["round"] if evaluated else None,
        "epsilon_example": last.get("epsilon_example_max"),
        "epsilon_device": last.get("epsilon_device_max"),
        "dp": bool(cfg.get("dp", True)),
        "device_dp": bool(cfg.get("device_dp", False)),
        "delta": delta,
    }


def format_summary(run_dir: str, figures: dict[str, Any]) -> str:
    """The final summary: rounded figures, the run directory and the next command to run."""
    f = figures
    lines = [f"run directory: {run_dir}"]
    if f["trained"] == 0:
        lines.append(f"no device trained in any of the {f['rounds']} rounds (every selected device was skipped, "
                     "failed or over its privacy budget): the model is the initial one, so no figures are given")
        return "\n".join(lines)
    if f["accuracy"] is None:
        lines.append(f"rounds: {f['rounds']} of {f['planned']}; no round was evaluated")
    else:
        slot = f", slot F1 {round_figure(f['slot_f1'])}" if f.get("slot_f1") is not None else ""
        lines.append(f"accuracy {round_figure(f['accuracy'])}, macro-F1 {round_figure(f['macro_f1'])}{slot} "
                     f"(round {f['evaluated_round']} of {f['planned']})")
    at = f"at delta {f['delta']:g}" if f["delta"] is not None else "(no delta recorded)"
    if f["dp"]:
        lines.append(f"example-level epsilon {round_figure(f['epsilon_example'], 2)} {at} (max over devices)")
    if f["device_dp"]:
        lines.append(f"device-level epsilon {round_figure(f['epsilon_device'], 2)} {at} (max over devices)")
    if not (f["dp"] or f["device_dp"]):
        lines.append("not private: DP was off (--no-dp)")
    lines.append(f"next: dpfl report {run_dir}")
    return "\n".join(lines)


def print_result(result: dict, figures: dict[str, Any] | None = None) -> int:
    """Print a finished run's summary (stdout) from its run directory (or ``figures`` already read
    by :func:`run_figures`); return the exit code.

    1 when no device trained in any round (the figures would describe the initial model), else 0.
    """
    figures = figures or run_figures(result["run_dir"])
    print(format_summary(result["run_dir"], figures))
    return 1 if figures["trained"] == 0 else 0


def finished(run_dir: str) -> dict[str, Any] | None:
    """``run_dir``'s :func:`run_figures` when its metrics hold its last planned round, else None."""
    try:
        f = run_figures(run_dir)
    except Exception:
        return None
    return f if f["planned"] > 0 and f["rounds"] >= f["planned"] else None


@exits
def run(ns: argparse.Namespace) -> int:
    """``dpfl simulate``: a new run from the flags, or ``--resume RUN_DIR``; return the exit code."""
    if ns.resume:
        changes = reject_settings_on_resume(ns)
        cfg = resume_config(ns.resume).replace(**changes).validate()
        figures = finished(cfg.run_dir)
        if figures is not None and cfg.holdout_per_device > 0:
            from rundir import read_holdout

            if read_holdout(cfg.run_dir) is None:  # stopped after its last round, before the holdout evaluation
                figures = None
        if figures is not None:
            print(f"the run in {cfg.run_dir} is complete ({cfg.rounds} rounds); nothing to resume")
            return print_result({"run_dir": cfg.run_dir}, figures)
    else:
        cfg = config_from_args(ns)
    result = simulate(cfg, progress=not ns.no_progress, resume=bool(ns.resume))
    return print_result(result)
