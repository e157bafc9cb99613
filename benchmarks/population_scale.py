"""A simulation over a large population: round time, seconds per device task and peak memory,
beside Flower's own orchestration floor.

One run (default: 10,000 devices of the built-in data, expected cohort 100, 3 rounds, ``--model
tiny``) calls ``dpfl.commands.simulate.simulate`` and samples, every 0.5 s in a thread, the
resident set size of this (server/driver) process, of each ClientApp actor process under it, and
of the whole process tree (driver, actors and Ray's own processes). It reports the peaks, the
start-up (server init, device -> node assignment) and per-round wall times, and
``seconds_per_device_task``: the rounds after the first (which also start the actors and load
the model), in wall seconds, over the device tasks they ran.

``--floor`` runs Flower's simulation of the same cohort size instead, with an empty ClientApp: the
same Ray resources, the same number of SuperNodes, the same server-side wait
(:func:`server.control.receive`), and messages that carry the run's trainable arrays there and
back, but no training, no data and no privacy work: what orchestration alone costs.

``--breakdown`` times a device task's stages in this process, without Flower or Ray (one
thread, 200 devices met for the first time): parsing the settings, generating the device's
records, tokenising, loading the weights, the frozen encoder's features, the mechanism's device
part (the DP-SGD clipped sum), and the reply's arrays.

``--table`` runs, each in a process of its own, the populations of ``--populations`` with the
cohorts of ``--cohorts`` and the floor of each cohort, and prints one table (``--json``: one
line per row): rounds per second, seconds per device task, the ratio to the floor, and the peaks.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.population_scale --json
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.population_scale --floor --cohort-size 1000 --json
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.population_scale --table
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


class _Peaks:
    """Peak RSS (bytes) of this process, of each ClientApp actor under it, and of the whole tree, sampled every 0.5 s."""

    def __init__(self):
        self.driver = self.actors = self.tree = self.actor_count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            mine = _rss(me)
            self.driver = max(self.driver, mine)
            kids = _descendants(me)
            actors = [q for q in kids if "ClientAppActor" in _cmdline(q)]
            for q in actors:
                self.actors = max(self.actors, _rss(q))
            self.tree = max(self.tree, mine + sum(_rss(q) for q in kids))
            self.actor_count = max(self.actor_count, len(actors))
            self._stop.wait(0.5)

    def __enter__(self) -> "_Peaks":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def as_dict(self) -> dict:
        return {
            "driver_peak_rss_mb": self.driver / 2**20,
            "driver_ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "actor_peak_rss_mb": self.actors / 2**20,
            "tree_peak_rss_mb": self.tree / 2**20,
            "actors": self.actor_count,
        }


def _per_task(walls: list[float], tasks: list[int]) -> float | None:
    """Wall seconds per device task over the rounds after the first (None with one round)."""
    if len(walls) < 2 or sum(tasks[1:]) == 0:
        return None
    return sum(walls[1:]) / sum(tasks[1:])


def _config(a):
    from settings.config import RunConfig

    run_dir = tempfile.mkdtemp(prefix="dpfl-scale-") + "/run"
    return RunConfig(
        model=a.model, num_devices=a.num_devices, cohort_size=a.cohort_size, rounds=a.rounds, data_dir=a.data_dir,
        local_epochs=a.local_epochs, run_dir=run_dir, run_id="scale",
    ).with_defaults().validate()


def run_dpfl(a) -> dict:
    """One ``simulate`` run of the settings in ``a``: timings and memory peaks."""
    from dpfl.commands.simulate import simulate
    from rundir import read_metric_lines

    cfg = _config(a)
    with _Peaks() as peaks:
        t0 = time.perf_counter()
        result = simulate(cfg, progress=False)
        total = time.perf_counter() - t0
    lines = read_metric_lines(cfg.run_dir)
    walls = (result.get("timings") or {}).get("rounds") or [m["seconds"] for m in lines]
    tasks = [m["replies"] + m["failures"] + m["rejected"] for m in lines]
    return {
        "kind": "dpfl",
        "settings": {"model": a.model, "num_devices": a.num_devices, "cohort_size": a.cohort_size, "rounds": a.rounds,
                     "supernodes": cfg.supernodes()},
        "total_seconds": total,
        "timings": result.get("timings"),
        "cohorts": [m["cohort_size"] for m in lines],
        "replies": [m["replies"] for m in lines],
        "phase_seconds": [m.get("phase_seconds") for m in lines],
        "seconds_per_device_task": _per_task(walls, tasks),
        **peaks.as_dict(),
        "run_dir": cfg.run_dir,
    }


def run_floor(a) -> dict:
    """Flower's simulation of ``a.cohort_size`` messages a round to an empty ClientApp (see the module docstring)."""
    from flwr.app import ArrayRecord, Message, MessageType, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from dpfl.commands.simulate import _kill_local_ray, _run_until_server_done, ray_temp_dir
    from nlu.model import set_trainable, trainable_state
    from nlu.tasks import task_for_data
    from partitions.population import build_population
    from protocol.arrays import record_from_state
    from server.app import map_nodes_to_devices
    from server.control import receive

    cfg = _config(a)
    task = task_for_data(cfg.task, build_population(cfg).data, cfg.slot_loss_weight, pooling=cfg.pooling)
    arrays = record_from_state(trainable_state(set_trainable(task.build_model(cfg.model, seed=cfg.seed), cfg.trainable)))
    cohort, nodes = int(round(a.cohort_size)), cfg.supernodes()
    extra = {}
    if a.floor_settings:  # what else a dpfl message carries: the device's settings and its id
        from flwr.app import ConfigRecord

        extra = {"run": ConfigRecord(cfg.device_settings()), "device": ConfigRecord({"device-id": 0})}
    out: dict = {"rounds": []}
    server_app, client_app = ServerApp(), ClientApp()

    @client_app.train()
    def _train(msg, context):  # the empty ClientApp: the arrays go back as they came
        return Message(RecordDict({"arrays": msg.content["arrays"]}), reply_to=msg)

    @server_app.main()
    def _main(grid, context):
        try:
            node_of = map_nodes_to_devices(grid, cohort, nodes=nodes)
            for _ in range(a.rounds):
                msgs = [Message(RecordDict({"arrays": ArrayRecord(dict(arrays.items())), **extra}),
                                dst_node_id=int(node_of[i]), message_type=MessageType.TRAIN) for i in range(cohort)]
                got = []
                t0 = time.perf_counter()
                receive(grid, msgs, 3600.0, lambda r, i: got.append(i))
                out["rounds"].append(time.perf_counter() - t0)
                out.setdefault("replies", []).append(len(got))
        finally:
            out["done"] = True

    backend = {"client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": cfg.client_gpus},
               "init_args": {"include_dashboard": False, "logging_level": 40, "log_to_driver": False,
                             "address": "local", "_temp_dir": ray_temp_dir()}}
    os.environ.pop("RAY_ADDRESS", None)
    with _Peaks() as peaks:
        t0 = time.perf_counter()
        _run_until_server_done(lambda: run_simulation(server_app=server_app, client_app=client_app,
                                                      num_supernodes=nodes, backend_config=backend),
                               out, local=True)
        total = time.perf_counter() - t0
    _kill_local_ray()
    return {
        "kind": "floor",
        "settings": {"model": a.model, "cohort_size": cohort, "rounds": a.rounds, "supernodes": nodes},
        "total_seconds": total,
        "timings": {"rounds": out["rounds"]},
        "replies": out.get("replies", []),
        "seconds_per_device_task": _per_task(out["rounds"], out.get("replies", [])),
        **peaks.as_dict(),
    }


def run_breakdown(a, devices: int = 200) -> dict:
    """Where a device task's time goes, measured in this process without Flower or Ray (one thread, as an
    actor with one CPU): the ClientApp's stages for ``devices`` devices drawn at random (seeded), each
    met for the first time. Milliseconds per device task, by stage."""
    import numpy as np
    import torch

    from client.app import model_of, run_config_from, task_of
    from dp.secure_random import NoiseSource
    from flwr.app import ConfigRecord
    from mechanisms import DeviceWork, mechanism_for
    from nlu.features import warm_feature_cache
    from nlu.model import load_tokenizer, trainable_state
    from partitions.population import build_population
    from protocol.arrays import load_into, record_from_state

    torch.set_num_threads(1)
    cfg = _config(a)
    pop = build_population(cfg)
    task, mech = task_of(cfg), mechanism_for(cfg)
    model = model_of(cfg, task)
    tok = load_tokenizer(cfg.model)
    record = ConfigRecord(cfg.device_settings())
    weights = record_from_state({k: v.detach().clone() for k, v in trainable_state(model).items()})
    round_cfg = {"server-round": 1, **mech.round_params()}
    ids = np.random.default_rng(0).choice(pop.num_devices, size=min(devices, pop.num_devices), replace=False)
    stages = {"settings": 0.0, "records": 0.0, "tokenise": 0.0, "load_weights": 0.0, "features": 0.0, "device_part": 0.0,
              "reply": 0.0}
    for d in ids:
        t = [time.perf_counter()]
        run_config_from(record)
        t.append(time.perf_counter())
        cols = pop.data.train_records(pop.held(int(d)))
        t.append(time.perf_counter())
        data = task.encode(cols, tok, cfg.max_length)
        t.append(time.perf_counter())
        load_into(model, weights, partial=True)
        t.append(time.perf_counter())
        warm_feature_cache(model, data, task.collate)
        t.append(time.perf_counter())
        reply = mech.device_part(DeviceWork(model, data, task, NoiseSource(), round_cfg, int(d), 1, None, t[0]))
        t.append(time.perf_counter())
        record_from_state(reply.arrays)
        t.append(time.perf_counter())
        for name, t0, t1 in zip(stages, t, t[1:]):
            stages[name] += t1 - t0
    per = {k: 1000 * v / len(ids) for k, v in stages.items()}
    return {"kind": "breakdown", "settings": {"model": a.model, "num_devices": a.num_devices, "devices": len(ids)},
            "ms_per_device_task": per, "ms_total": sum(per.values()),
            "examples_per_device": float(np.mean([len(pop.held(int(d))) for d in ids]))}


def _child(args: list[str]) -> dict:
    """Run this benchmark with ``args`` in a process of its own; its last JSON line."""
    import subprocess

    cmd = [sys.executable, "-m", "benchmarks.population_scale", *args, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def run_table(a) -> list[dict]:
    """Every population x cohort of ``a`` and the floor of each cohort, one process each; rows of the table."""
    common = ["--model", a.model, "--rounds", str(a.rounds), "--local-epochs", str(a.local_epochs)]
    floors = {c: _child(["--floor", "--cohort-size", str(c), "--num-devices", str(max(a.populations)), *common])
              for c in a.cohorts}
    rows = []
    for n in a.populations:
        for c in a.cohorts:
            r = _child(["--num-devices", str(n), "--cohort-size", str(c), *common])
            f = floors[c]
            walls = r["timings"]["rounds"]
            later = walls[1:] or walls
            rows.append({
                "num_devices": n, "cohort_size": c, "supernodes": r["settings"]["supernodes"],
                "first_round_seconds": walls[0], "round_seconds": sum(later) / len(later),
                "rounds_per_second": len(later) / sum(later),
                "seconds_per_device_task": r["seconds_per_device_task"],
                "floor_seconds_per_device_task": f["seconds_per_device_task"],
                "over_floor": (r["seconds_per_device_task"] / f["seconds_per_device_task"]
                               if r["seconds_per_device_task"] and f["seconds_per_device_task"] else None),
                "driver_peak_rss_mb": r["driver_peak_rss_mb"], "actor_peak_rss_mb": r["actor_peak_rss_mb"],
                "tree_peak_rss_mb": r["tree_peak_rss_mb"], "floor_tree_peak_rss_mb": f["tree_peak_rss_mb"],
                "server_init_seconds": r["timings"]["server_init"],
            })
    return rows


def _print_table(rows: list[dict]) -> None:
    head = ("devices", "cohort", "round s", "rounds/s", "s/task", "floor s/task", "x floor",
            "driver MB", "actor MB", "tree MB", "1st round s")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        fmt = lambda x, d=3: "n/a" if x is None else f"{x:.{d}f}"  # noqa: E731
        print(" | ".join([f"{r['num_devices']:,}", f"{r['cohort_size']:,}", fmt(r["round_seconds"], 1),
                          fmt(r["rounds_per_second"]), fmt(r["seconds_per_device_task"], 4),
                          fmt(r["floor_seconds_per_device_task"], 4), fmt(r["over_floor"], 2),
                          f"{r['driver_peak_rss_mb']:.0f}", f"{r['actor_peak_rss_mb']:.0f}",
                          f"{r['tree_peak_rss_mb']:.0f}", fmt(r["first_round_seconds"], 1)]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--num-devices", type=int, default=10_000)
    p.add_argument("--cohort-size", type=float, default=100.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--floor", action="store_true", help="Flower's simulation with an empty ClientApp instead")
    p.add_argument("--table", action="store_true", help="every --populations x --cohorts, and the floors")
    p.add_argument("--floor-settings", action="store_true",
                   help="with --floor: the messages also carry the device settings record a dpfl message carries")
    p.add_argument("--breakdown", action="store_true", help="a device task's stages in this process (no Flower)")
    p.add_argument("--populations", type=lambda s: [int(x) for x in s.split(",")], default=[10_000, 100_000, 1_000_000])
    p.add_argument("--cohorts", type=lambda s: [int(x) for x in s.split(",")], default=[100, 1000])
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)

    from dpfl.commands.logs import quiet as _quiet

    _quiet()
    if a.table:
        rows = run_table(a)
        if a.json:
            for r in rows:
                print(json.dumps(r))
        else:
            _print_table(rows)
        return 0
    out = run_floor(a) if a.floor else run_breakdown(a) if a.breakdown else run_dpfl(a)
    print(json.dumps(out) if a.json else json.dumps(out, indent=1))
    sys.stdout.flush()
    if a.floor:
        os._exit(0)  # Flower's simulation threads outlive the server app; the Ray instance is gone
    return 0


if __name__ == "__main__":
    sys.exit(main())
