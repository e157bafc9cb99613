"""The ServerApp entry points: ``dpfl simulate`` (:func:`make_server_app`) and ``flwr run .`` (``app``).

Both run :func:`run_server`: build the run's :class:`server.state.Server`, map devices to
Flower nodes, then call :func:`server.round.run_round` once per round (select ->
commit_events -> dispatch -> collect -> aggregate, then the hooks: evaluate, checkpoint,
metrics line). Where each piece lives:

* server/state.py: the run's collaborators (population, selector, ledger, privacy book,
  noise source, model, strategy, the run's mechanism and its aggregator) and resume;
* server/round.py: the round's stages, which ask the mechanism (mechanisms/: FedAvg, local
  DP-SGD, noise on the aggregate, DP-FedAvg) what to send, accept and account;
* server/aggregation.py: the strategy's server step and the released model average;
* server/hooks.py: evaluation, checkpoint, metrics line;
* server/selection.py, server/privacy.py, server/strategies.py: selection, privacy
  bookkeeping and budgets, Flower strategies.

Costs kept off the round (see benchmarks/round_overhead.py): devices are assigned to nodes
without a query round-trip (:func:`map_nodes_to_devices`); only trainable parameters travel;
replies are validated on views of their bytes and folded into the aggregator as they arrive,
so the server holds about two copies of the trainable weights whatever the cohort size. Each
round's ``phase_seconds`` in metrics.jsonl says where its time went.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from rundir import release_run_lock
from settings.config import RunConfig
from settings.interrupt import BackendLost, Interrupted
from server.control import RunControl
from server.holdout import evaluate_holdout
from server.out_of_scope import evaluate_out_of_scope
from server.state import Server

log = logging.getLogger("dpfl.server")

__all__ = ["DeviceNodes", "Interrupted", "RunControl", "Server", "app", "make_server_app", "map_nodes_to_devices", "run_server"]


def _quiet_flower() -> None:
    for name in ("flwr", "flower", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)


class DeviceNodes(Mapping):
    """Device id -> node id when the nodes take the devices in turn: device k is ``node_ids[k mod m]``.

    Holds the m node ids, not an entry per device (a million devices would be a dict of 100 MB).
    """

    def __init__(self, node_ids: list[int], num_devices: int):
        self.node_ids = [int(n) for n in node_ids]
        self.num_devices = int(num_devices)

    def __getitem__(self, device: int) -> int:
        d = int(device)
        if not 0 <= d < self.num_devices:
            raise KeyError(device)
        return self.node_ids[d % len(self.node_ids)]

    def __len__(self) -> int:
        return self.num_devices

    def __iter__(self):
        return iter(range(self.num_devices))


def map_nodes_to_devices(grid: Grid, num_devices: int, timeout: float = 600.0, query: bool = False,
                         settle: float = 5.0, nodes: int | None = None) -> Mapping[int, int]:
    """Device id -> node id.

    Default: device k is the k-th node in node-id order, and every training message names its
    device (``"device"`` record), so no message needs to travel before round 1. (Asking each
    node costs a round-trip per node, and Flower's in-memory link state scans every stored
    message for every node, which grows with the square of the population.) With fewer nodes
    than devices (``flwr run .`` simulates the federation's ``num-supernodes``, 2 by default in
    Flower 1.41), the nodes take the devices in turn: device k is node ``k mod m``'s, once no new
    node has connected for ``settle`` seconds; a node then trains each device its messages name.
    ``nodes``: the number of nodes the simulation runs (``dpfl simulate``), so the map is made as
    soon as that many have connected. ``query=True``: ask every node which device it is (its
    ``partition-id``); every device must have a node of its own.

    Raises
    ------
    RuntimeError
        If no node connects within ``timeout`` seconds, or (``query=True``) if fewer than
        ``num_devices`` nodes connect or answer within ``timeout`` seconds.
    """
    t0 = last_change = time.time()
    seen = 0
    enough = num_devices if query or nodes is None else min(int(nodes), num_devices)
    while len(node_ids := sorted(int(n) for n in grid.get_node_ids())) < enough:
        now = time.time()
        if len(node_ids) != seen:
            seen, last_change = len(node_ids), now
        if node_ids and not query and now - last_change >= settle:
            break
        if now - t0 > timeout:
            raise RuntimeError(f"only {len(node_ids)} of {num_devices} device nodes connected")
        time.sleep(0.5)
    if not query:
        if len(node_ids) < num_devices and nodes is None:
            log.info("%d devices on %d Flower nodes: each node trains the devices its messages name",
                     num_devices, len(node_ids))
        return DeviceNodes(node_ids, num_devices)
    msgs = [Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=nid) for nid in node_ids]
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            continue
        mapping[int(reply.content["device"]["device-id"])] = reply.metadata.src_node_id
    missing = set(range(num_devices)) - set(mapping)
    if missing:
        raise RuntimeError(f"{len(missing)} device nodes did not report their device id (e.g. {sorted(missing)[:5]})")
    return mapping


def _progress_postfix(last) -> dict:
    post = {"cohort": last.cohort_size}
    if last.accuracy is not None:
        post["acc"] = f"{last.accuracy:.3f}"
    if last.epsilon_example_max is not None:
        post["eps"] = f"{last.epsilon_example_max:.2f}"
    if last.epsilon_device_max is not None:
        post["eps_dev"] = f"{last.epsilon_device_max:.2f}"
    if last.failures or last.timeouts or last.rejected:
        post["lost"] = last.failures + last.timeouts + last.rejected
    return post


def _eta(seconds: list[float], remaining: int) -> dict:
    """``{"eta": "m:ss"}`` for ``remaining`` rounds at the mean length of the rounds after this
    process's first (which starts Ray and encodes features); ``{}`` before there is one."""
    later = seconds[1:]
    if remaining <= 0 or not later:
        return {}
    left = int(round(sum(later) / len(later) * remaining))
    return {"eta": f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}" if left >= 3600 else f"{left // 60}:{left % 60:02d}"}


def run_server(grid: Grid, cfg: RunConfig, progress: bool = True, resume: bool = False,
               control: RunControl | None = None, nodes: int | None = None) -> dict:
    """Run every round of ``cfg`` on ``grid``; return a small summary dict. ``nodes``: how many Flower
    nodes the grid will have (known to ``dpfl simulate``; None: wait until no new node connects).

    Raises
    ------
    settings.config.ConfigError, partitions.errors.DataError, nlu.model.ModelError
        On bad settings or data (before any round runs).
    settings.interrupt.Interrupted
        When ``control.stop`` is set (Ctrl-C); the run directory stays resumable.
    """
    from tqdm.auto import tqdm

    _quiet_flower()
    t0 = time.perf_counter()
    control = control if control is not None else RunControl()
    server = Server(cfg, resume=resume, control=control)
    timings: dict = {"server_init": time.perf_counter() - t0, "rounds": []}
    try:
        t0 = time.perf_counter()
        node_of = map_nodes_to_devices(grid, cfg.num_devices, nodes=nodes)
        timings["node_mapping"] = time.perf_counter() - t0
        arrays = server.arrays
        # tqdm's own estimate would extrapolate the first round (Ray start, feature encoding): the
        # remaining time is estimated from the rounds after it (_eta)
        bar = tqdm(
            range(server.start_round, cfg.rounds + 1), desc="rounds", unit="round", disable=not progress,
            dynamic_ncols=True, initial=server.start_round - 1, total=cfg.rounds,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
        )
        last = None
        post: dict = {}
        for t in bar:
            if control.stop.is_set():
                raise Interrupted(f"interrupted before round {t}")
            first = t == server.start_round
            note = " (devices load the model and encode their features the first time)" if first else ""

            shown = [0.0]

            def replies(done: int, sent: int, t=t, note=note, shown=shown) -> None:
                now = time.monotonic()  # at most a redraw every half second: cohorts of thousands reply
                if done == sent or now - shown[0] >= 0.5:
                    shown[0] = now
                    bar.set_postfix({**post, "round": f"{t}: {done}/{sent} replies{note if done < sent else ''}"})

            control.progress = replies if progress else None
            bar.set_postfix({**post, "round": f"{t}: training{note}"})
            t0 = time.perf_counter()
            arrays, last = server.run_round(grid, t, arrays, node_of)
            timings["rounds"].append(time.perf_counter() - t0)  # with checkpoint and ledger completion
            post = {**_progress_postfix(last), **_eta(timings["rounds"], cfg.rounds - t)}
            bar.set_postfix(post)
        control.progress = None
        bar.close()
        evaluate_holdout(server, grid, node_of)  # --holdout-per-device: accuracy by activity quartile
        evaluate_out_of_scope(server)  # --oos-label / --oos-holdout-intents: the threshold's test figures
    finally:
        server.ledger.close()
        release_run_lock(server.rundir.path)
    return {"run_dir": str(server.rundir.path), "final": last.__dict__ if last else None, "delta": server.delta, "timings": timings}


def make_server_app(cfg: RunConfig, control: RunControl, progress: bool = True, resume: bool = False) -> ServerApp:
    """A ServerApp bound to ``cfg`` and ``control`` (used by ``dpfl simulate``; ``resume`` continues its
    run directory). It leaves the run's summary (or the backend failure) in ``control.outcome``."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            control.outcome["result"] = run_server(grid, cfg, progress=progress, resume=resume, control=control,
                                                   nodes=cfg.supernodes())
        except BackendLost as exc:  # Flower re-raises it wrapped, or not at all: keep the reason
            control.outcome["backend_lost"] = {"reason": str(exc)}
            raise
        finally:
            control.outcome["done"] = True  # dpfl simulate stops waiting for a backend that does not stop

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: settings from ``[tool.flwr.app.config]``."""
    cfg = RunConfig.from_mapping(dict(context.run_config)).with_defaults().validate()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_server(grid, cfg)
