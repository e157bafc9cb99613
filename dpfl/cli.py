"""The ``dpfl`` command: ``simulate`` (the main job), ``report`` and ``audit`` (dpfl/audit_cmd.py).

Bad input (settings, data files, model paths, run directories) ends with one line
``dpfl: error: ...`` on stderr and exit code 2, before any training starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, get_type_hints

from dpfl.config import RunConfig

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

HELP = {
    "run_dir": "run directory (default runs/<timestamp>)",
    "rounds": "number of federated rounds",
    "eval_every": "evaluate the global model every N rounds (and after the last)",
    "data_dir": "folder with train.jsonl and test.jsonl of {text, label}",
    "dataset": "Hugging Face hub dataset name (needs network)",
    "max_examples": "cap the training set at K examples (quick runs)",
    "num_devices": "number of simulated devices",
    "partitioner": "auto (natural device column if present, else iid) | iid | dirichlet (label skew) | quantity (power-law sizes) | quantity-label (both) | cluster (feature skew) | natural",
    "dirichlet_alpha": "Dirichlet concentration for label skew (smaller = more skew)",
    "cohort_size": "expected number of devices per round",
    "selection": "uniform | activity (Poisson with q_k = min(1, c a_k^alpha))",
    "activity_exponent": "alpha in q_k = min(1, c a_k^alpha)",
    "selection_constant": "set c directly instead of calibrating it from --cohort-size",
    "model": "'minilm' (all-MiniLM-L6-v2, offline), 'tiny' (random small BERT) or a HF name/path",
    "max_length": "maximum tokens per utterance",
    "task": "intent | slots (BIO slot filling) | joint (intent + slots, one encoder)",
    "slot_loss_weight": "joint loss = intent loss + w * slot loss",
    "setting": "static (all data at once) | continual (examples arrive over rounds)",
    "storage_cap": "continual: a device keeps at most this many examples, deleting its oldest first",
    "device_column": "column holding the device/user id for --partitioner natural",
    "num_clusters": "k-means clusters of sentence embeddings for --partitioner cluster",
    "local_epochs": "local epochs per round (expected passes under Poisson sampling)",
    "batch_size": "expected (Poisson) batch size",
    "physical_batch_size": "largest micro-batch held in memory at once",
    "noise_multiplier": "sigma: DP-SGD noise std / max_grad_norm",
    "max_grad_norm": "C: per-example clipping norm",
    "target_delta": "delta for every epsilon (default: power of ten <= 1/(10 N))",
    "accountant": "pld (tight) | rdp",
    "dp_engine": "opacus | dpfl",
    "strategy": "fedavg | fedprox | fedadam",
    "client_cpus": "CPUs per simulated device (Ray resources; fractions allowed)",
    "client_gpus": "GPUs per simulated device (fractions allowed)",
    "device_dp": "device-level DP: clip each device's update and add noise on the server (DP-FedAvg)",
    "update_clip_norm": "S: L2 bound on each device's update (device-level DP)",
    "device_noise_multiplier": "sigma_u: server noise std / S (device-level DP)",
    "target_epsilon_device": "device-level epsilon budget per device (needs --device-dp)",
    "max_epsilon": "example-level epsilon budget per device: a device is not selected once its next round would exceed it",
    "target_epsilon": "calibrate --noise-multiplier so that no device's example-level epsilon can exceed this",
    "learning_rate": "local optimizer step size (the encoder's, when --head-learning-rate is set)",
    "head_learning_rate": "step size of the freshly initialised classification head (default: --learning-rate)",
    "trainable": "which parameters train: all (embeddings included) | head (frozen encoder) | topN (head + last N layers)",
    "pooling": "mean (mean-pooled token states) | cls (transformers' classification head)",
    "canaries": "privacy audit: insert M canary utterances (secret digits), each included with probability 1/2",
    "canary_repeats": "copies of each included canary (all on one device)",
}

SKIP = {"extra", "run_id", "ray_address", "dp"}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    hints = get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if f.name in SKIP:
            continue
        text = str(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        if "bool" in text:
            p.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                action="store_true",
                default=None,
                help=f"{HELP.get(f.name, '')} (default: off)".strip(),
            )
            continue
        typ: Any = str
        if "int" in text and "float" not in text:
            typ = int
        elif "float" in text:
            typ = float
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=typ,
            default=None,
            help=f"{HELP.get(f.name, '')} (default: {default})".strip(),
        )
    p.add_argument("--no-dp", dest="dp", action="store_false", default=None, help="train without DP-SGD (baseline)")


def config_from_args(ns: argparse.Namespace) -> RunConfig:
    """A validated RunConfig from parsed arguments (unset flags keep RunConfig's defaults)."""
    names = {f.name for f in dataclasses.fields(RunConfig)}
    values = {k: v for k, v in vars(ns).items() if k in names and v is not None}
    return RunConfig.from_mapping(values).with_defaults().validate()


def _quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    warnings.filterwarnings("ignore", module="opacus")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("flwr", "flower", "ray", "opacus", "transformers", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
    flwr_log = logging.getLogger("flwr")
    flwr_log.propagate = False  # Flower has its own console handler
    flwr_log.addFilter(_DropFlowerNoise())


class _DropFlowerNoise(logging.Filter):
    """Drop Flower's messages that do not concern a dpfl user (deprecations, debug chatter)."""

    NOISE = ("DEPRECATED FEATURE", "fraction_evaluate is set to 0.0", "deprecated feature", "injected fault")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return record.levelno >= logging.INFO and not any(n in msg for n in self.NOISE)


def preflight(cfg: RunConfig, resume: bool = False) -> None:
    """Check everything that can be checked before Ray starts (data, partition, model, run dir, calibration).

    Raises the same errors the run would raise (ConfigError, DataError, ModelError,
    RunDirError, ValueError), so bad input ends before any process is started.
    """
    from dpfl.config import ConfigError
    from nlu.model import load_tokenizer, num_encoder_layers, parse_trainable, resolve_model_path
    from partitions.population import build_population
    from server.privacy import calibrate_example_noise
    from rundir import RunDirError
    from server.selection import calibrate_constant

    if resume:
        if not (Path(cfg.run_dir) / "config.toml").exists():
            raise RunDirError(f"--resume {cfg.run_dir}: no run there (config.toml is missing)")
    elif (Path(cfg.run_dir) / "config.toml").exists():
        raise RunDirError(f"--run-dir {cfg.run_dir} already holds a run; choose a new --run-dir (or --resume it)")
    resolve_model_path(cfg.model)
    load_tokenizer(cfg.model)
    pop = build_population(cfg)
    from nlu.tasks import task_for_data

    task_for_data(cfg.task, pop.data, cfg.slot_loss_weight)
    if pop.num_devices != cfg.num_devices:
        raise ValueError(f"--num-devices: the partition has {pop.num_devices} devices, expected {cfg.num_devices}")
    top = parse_trainable(cfg.trainable)
    if top and top > num_encoder_layers(cfg.model):
        raise ConfigError(f"--trainable {cfg.trainable}: {cfg.model} has {num_encoder_layers(cfg.model)} "
                          "transformer layers; choose a smaller N")
    alpha = cfg.activity_exponent if cfg.selection == "activity" else 0.0
    # the same planned activities the server calibrates on: [T, K] (continual) or [K]
    planned = pop.planned_activity(cfg.rounds)
    if cfg.selection_constant is None:
        calibrate_constant(planned, alpha, cfg.cohort_size)
    if cfg.dp and cfg.target_epsilon is not None:
        calibrate_example_noise(cfg, planned.ravel(), cfg.resolve_delta(len(pop.data.train)))


def resume_config(run_dir: str) -> RunConfig:
    """The RunConfig of the run in ``run_dir`` (its ``config.toml``), pointed at ``run_dir``.

    Raises
    ------
    RunDirError
        If ``run_dir`` holds no run.
    """
    from rundir import RunDirError

    path = Path(run_dir) / "config.toml"
    if not path.exists():
        raise RunDirError(f"--resume {run_dir}: no run there (config.toml is missing)")
    cfg = RunConfig.from_toml(path)
    cfg.run_dir = str(run_dir)
    return cfg.validate()


class Interrupted(Exception):
    """Ctrl-C stopped the run; its directory is resumable."""


def simulate(cfg: RunConfig, progress: bool = True, resume: bool = False) -> dict:
    """Run the federated simulation of ``cfg`` on a local Ray instance (or ``cfg.ray_address``).

    ``resume`` continues the run in ``cfg.run_dir`` from its last complete round. Ctrl-C
    (SIGINT, from the main thread) stops the run at the next safe point, shuts Ray down and
    raises :class:`Interrupted`; the run directory stays resumable. A second Ctrl-C aborts.

    Returns
    -------
    dict
        ``run_dir``, ``delta`` and the last round's outcome.
    """
    import threading

    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import _BOUND, STOP, make_server_app

    preflight(cfg, resume=resume)
    init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
    if cfg.ray_address:
        init_args["address"] = cfg.ray_address
    backend_config = {
        "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": cfg.client_gpus},
        "init_args": init_args,
    }
    _BOUND.pop("result", None)
    STOP.clear()
    old_handler = None
    if threading.current_thread() is threading.main_thread():

        def _on_sigint(signum, frame):
            if STOP.is_set():  # second Ctrl-C: abort now
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            print("\ndpfl: stopping after the round in flight is abandoned (Ctrl-C again to abort)", file=sys.stderr)
            STOP.set()

        old_handler = signal.signal(signal.SIGINT, _on_sigint)
    try:
        run_simulation(
            server_app=make_server_app(cfg, progress=progress, resume=resume),
            client_app=client_app,
            num_supernodes=cfg.num_devices,
            backend_config=backend_config,
        )
    except Exception:
        if STOP.is_set():
            raise Interrupted(f"interrupted; the run is resumable: dpfl simulate --resume {cfg.run_dir}") from None
        raise
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
    result = _BOUND.pop("result", None)
    if result is None:
        if STOP.is_set():
            raise Interrupted(f"interrupted; the run is resumable: dpfl simulate --resume {cfg.run_dir}")
        raise RuntimeError("the simulation ended without finishing its rounds (see the log above)")
    return result


def _bad_input_types() -> tuple[type[BaseException], ...]:
    from dpfl.config import ConfigError
    from nlu.model import ModelError
    from partitions.errors import DataError
    from rundir import RunDirError

    return (ConfigError, DataError, ModelError, RunDirError, ValueError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``dpfl``)."""
    parser = argparse.ArgumentParser(prog="dpfl", description="Federated NLU training with differential privacy")
    sub = parser.add_subparsers(dest="command", required=True)
    p_sim = sub.add_parser("simulate", help="run a federated DP simulation (Flower + Ray)")
    _add_config_args(p_sim)
    p_sim.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_sim.add_argument(
        "--resume", metavar="RUN_DIR", default=None,
        help="continue the run in RUN_DIR from its last complete round, with its own settings (config.toml)",
    )
    p_rep = sub.add_parser("report", help="write the privacy budget report of a run directory")
    p_rep.add_argument("run_dir")
    p_rep.add_argument("--baseline", default=None, help="a non-private run directory to compare utility with")
    from dpfl.launch import add_launch_parser, run_launch
    add_launch_parser(sub, _add_config_args)
    from dpfl.partitions_cmd import add_partitions_parser, run_partitions

    add_partitions_parser(sub, _add_config_args)
    from dpfl.audit_cmd import add_audit_parser, run_audit

    add_audit_parser(sub)
    ns = parser.parse_args(argv)
    _quiet()
    if ns.command == "launch":
        return run_launch(ns)
    if ns.command == "partitions":
        return run_partitions(ns)
    if ns.command == "audit":
        return run_audit(ns)
    bad = _bad_input_types()
    try:
        if ns.command == "simulate":
            if ns.resume:
                names = {f.name for f in dataclasses.fields(RunConfig)}
                given = sorted("--" + k.replace("_", "-") for k, v in vars(ns).items() if k in names and v is not None)
                if given:
                    from dpfl.config import ConfigError

                    raise ConfigError(f"--resume continues a run with its own settings (config.toml); drop {', '.join(given)}")
                cfg = resume_config(ns.resume)
            else:
                cfg = config_from_args(ns)
            result = simulate(cfg, progress=not ns.no_progress, resume=bool(ns.resume))
            final = result.get("final") or {}
            print(
                f"run directory: {result['run_dir']}\n"
                f"final accuracy: {final.get('accuracy')}  macro-F1: {final.get('macro_f1')}\n"
                f"example-level epsilon (max over devices): {final.get('epsilon_example_max')} at delta={result['delta']:g}"
            )
        elif ns.command == "report":
            from dp.report import build_report

            summary = build_report(Path(ns.run_dir), Path(ns.baseline) if ns.baseline else None)
            print(f"report written to {Path(ns.run_dir) / 'report'}")
            print(f"example-level epsilon max: {summary.get('epsilon', {}).get('example', {}).get('max')}")
    except Interrupted as exc:
        print(f"dpfl: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except bad as exc:
        print(f"dpfl: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
