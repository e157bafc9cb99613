"""The ServerApp: the round loop.

Each round: compute every device's inclusion probability from its activity, Poisson-sample
the cohort, send it the global weights (messages built by the Flower strategy), collect the
replies, write the round's privacy events to the ledger in one transaction, aggregate with
the strategy, evaluate the global model on the test split, append the round to
``metrics.jsonl`` and checkpoint the model.

``dpfl simulate`` runs :func:`make_server_app` bound to its RunConfig; ``flwr run .`` runs
the module-level ``app``, which reads the same settings from the Flower run config.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from dp.accounting import SubsampledGaussianEvent
from dpfl.config import RunConfig
from nlu.model import load_tokenizer
from nlu.tasks import task_for_data
from partitions.population import Population, build_population
from server.ledger import EventRow, Ledger
from server.rundir import RunDir
from server.device_dp import DeviceDPStrategy
from server.privacy import PrivacyBook, calibrate_example_noise, local_mechanism
from server.selection import ActivitySelector, poisson_cohort
from server.strategies import CohortGrid, make_strategy

log = logging.getLogger("dpfl.server")


def _quiet_flower() -> None:
    for name in ("flwr", "flower", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)


def map_nodes_to_devices(grid: Grid, num_devices: int, timeout: float = 600.0) -> dict[int, int]:
    """Ask every node which device it is; return device id -> node id.

    Raises
    ------
    RuntimeError
        If fewer than ``num_devices`` nodes connect or answer within ``timeout`` seconds.
    """
    t0 = time.time()
    while len(node_ids := list(grid.get_node_ids())) < num_devices:
        if time.time() - t0 > timeout:
            raise RuntimeError(f"only {len(node_ids)} of {num_devices} device nodes connected")
        time.sleep(0.5)
    msgs = [
        Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=nid) for nid in node_ids
    ]
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            continue
        mapping[int(reply.content["device"]["device-id"])] = reply.metadata.src_node_id
    missing = set(range(num_devices)) - set(mapping)
    if missing:
        raise RuntimeError(f"{len(missing)} device nodes did not report their device id (e.g. {sorted(missing)[:5]})")
    return mapping


@dataclass
class RoundOutcome:
    """What happened in one round (one line of metrics.jsonl)."""

    round: int
    cohort_size: int
    replies: int = 0
    failures: int = 0
    skipped: bool = False
    train_loss: float | None = None
    accuracy: float | None = None
    macro_f1: float | None = None
    test_loss: float | None = None
    epsilon_example_max: float = 0.0
    epsilon_device_max: float | None = None
    seconds: float = 0.0
    train_seconds_mean: float | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        return json.dumps(d, allow_nan=True)


class Server:
    """State of one run on the server side (population, selector, ledger, privacy book, model, strategy)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.rundir = RunDir(Path(cfg.run_dir))
        self.pop: Population = build_population(cfg)
        self.delta = cfg.resolve_delta(len(self.pop.data.train))
        self.cfg.target_delta = self.delta
        self.num_labels = len(self.pop.data.label_names)
        self.activity = self.pop.activity(1)  # a_k(1); updated each round in the continual setting
        empty = int((self.activity == 0).sum())
        if empty:
            log.warning("%d devices hold no examples after partitioning; they are never selected", empty)
        if cfg.dp and cfg.target_epsilon is not None:
            every = np.concatenate([self.pop.activity(t) for t in range(1, cfg.rounds + 1)]) if self.pop.stream else self.activity
            cfg.noise_multiplier = calibrate_example_noise(cfg, every, self.delta)
            log.warning("--target-epsilon %g: noise multiplier calibrated to %.4f", cfg.target_epsilon, cfg.noise_multiplier)
        alpha = cfg.activity_exponent if cfg.selection == "activity" else 0.0
        self.selector = ActivitySelector(self.activity, alpha, cfg.cohort_size, cfg.selection_constant)
        self.rng = np.random.default_rng([cfg.seed, 1])
        self.ledger = Ledger(self.rundir.ledger_path, cfg.run_id)
        note = (
            "c was calibrated once, before round 1, from the devices' starting activities "
            f"(sum of a_k^alpha) so that the expected cohort size is {cfg.cohort_size:g}; "
            "this one calibration read the activity total, which the guarantee does not cover."
            if self.selector.calibrated
            else "c was set directly by the user (--selection-constant)."
        )
        self.ledger.start_run(
            target_delta=self.delta, accountant=cfg.accountant, selection_constant=self.selector.c, calibration_note=note
        )
        self.ledger.record_devices(self.activity, self.selector.probabilities(self.activity))
        self.rundir.write_config(cfg)
        self.task = task_for_data(cfg.task, self.pop.data, cfg.slot_loss_weight, pooling=cfg.pooling)
        self.model = self.task.build_model(cfg.model, seed=cfg.seed)
        self.test_enc = self.task.encode(self.pop.data.test, load_tokenizer(cfg.model), cfg.max_length)
        self.strategy = make_strategy(cfg)
        if cfg.device_dp:
            self.strategy = DeviceDPStrategy(self.strategy, cfg.update_clip_norm, cfg.device_noise_multiplier, cfg.seed)
            self.strategy.expected_cohort = float(cfg.cohort_size)
        self.book = PrivacyBook(
            self.delta,
            cfg.accountant,
            max_epsilon=cfg.max_epsilon if cfg.dp else None,
            max_epsilon_device=cfg.target_epsilon_device if cfg.device_dp else None,
        )

    # ------------------------------------------------------------------ per round
    def probabilities(self) -> tuple[np.ndarray, list[tuple[int, str, float]]]:
        """q_k(t) after removing devices whose next round would exceed a budget (and those hits)."""
        cfg = self.cfg
        q = self.selector.probabilities(self.activity, excluded=np.array(sorted(self.book.exhausted), dtype=np.int64))
        hits: list[tuple[int, str, float]] = []
        cand = np.flatnonzero(q > 0)
        if cfg.dp and cfg.max_epsilon is not None:
            nxt = {}
            for d in cand:
                sr, steps = local_mechanism(int(self.activity[d]), cfg.batch_size, cfg.local_epochs)
                nxt[int(d)] = SubsampledGaussianEvent(cfg.noise_multiplier, sr, steps)
            hits += self.book.over_budget("example", nxt)
        if cfg.device_dp and cfg.target_epsilon_device is not None:
            nxt = {int(d): SubsampledGaussianEvent(cfg.device_noise_multiplier, float(q[d]), 1) for d in cand}
            hits += self.book.over_budget("device", nxt)
        if hits:
            q[np.array([d for d, _, _ in hits], dtype=np.int64)] = 0.0
            log.warning("%d devices reached their privacy budget and will not be selected again", len(hits))
        return q, hits

    def evaluate(self, arrays: ArrayRecord) -> dict[str, float]:
        self.model.load_state_dict(arrays.to_torch_state_dict())
        return self.task.evaluate(self.model, self.test_enc)

    def run_round(self, grid: Grid, t: int, arrays: ArrayRecord, node_of: dict[int, int]) -> tuple[ArrayRecord, RoundOutcome]:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.activity = self.pop.activity(t)
        q, budget_hits = self.probabilities()
        cohort = poisson_cohort(q, self.rng)
        out = RoundOutcome(round=t, cohort_size=len(cohort))
        events: list[EventRow] = []
        epsilons: dict[tuple[int, str], float] = {}
        ok: list[Message] = []
        if cfg.device_dp:
            # Every device that could have been selected took part in this round's mechanism.
            dev_events = {int(d): SubsampledGaussianEvent(cfg.device_noise_multiplier, float(q[d]), 1) for d in np.flatnonzero(q > 0)}
            events += [EventRow(d, "device", e.noise_multiplier, e.sample_rate, 1, cfg.update_clip_norm) for d, e in dev_events.items()]
            epsilons.update(self.book.add("device", dev_events))
        if len(cohort) == 0:
            log.warning("round %d: the Poisson-sampled cohort is empty; %s", t, "noise-only update" if cfg.device_dp else "round skipped")
            out.skipped = not cfg.device_dp
            if cfg.device_dp:
                self.strategy.current = {k: v.numpy() for k, v in arrays.items()}
        else:
            round_cfg = ConfigRecord({"num-labels": self.num_labels, "target-delta": self.delta})
            run_record = ConfigRecord(cfg.to_dict_flat())
            msgs = list(
                self.strategy.configure_train(t, arrays, round_cfg, CohortGrid(grid, [node_of[int(k)] for k in cohort]))
            )
            for m in msgs:
                m.content["run"] = run_record
            replies = list(grid.send_and_receive(msgs, timeout=3600))
            ok = [r for r in replies if not r.has_error()]
            for r in replies:
                if r.has_error():
                    log.warning("round %d: a device failed: %s", t, r.error.reason.splitlines()[0][:300])
            out.replies, out.failures = len(ok), len(replies) - len(ok)
            nodes = {str(r.content["info"]["ray-node"]) for r in ok if "info" in r.content}
            out.extra["ray_nodes"] = len(nodes - {""})
            out.extra["device_nodes"] = {
                int(r.content["info"]["device-id"]): str(r.content["info"]["ray-node"]) for r in ok if "info" in r.content
            }
            if cfg.dp:
                ex_events = {}
                for r in ok:
                    p = r.content["privacy"]
                    d = int(p["device-id"])
                    ev = SubsampledGaussianEvent(float(p["noise_multiplier"]), float(p["sample_rate"]), int(p["steps"]))
                    ex_events[d] = ev
                    events.append(EventRow(d, "example", ev.noise_multiplier, ev.sample_rate, ev.steps, float(p["max_grad_norm"])))
                epsilons.update(self.book.add("example", ex_events))
            losses = [float(r.content["metrics"]["train_loss"]) for r in ok]
            weights = [float(r.content["metrics"]["num-examples"]) for r in ok]
            if ok:
                out.train_loss = float(np.average(losses, weights=weights))
                out.train_seconds_mean = float(np.mean([float(r.content["metrics"]["train_seconds"]) for r in ok]))
        holdings = []
        if cfg.dp and self.pop.stream is not None:
            for r in ok:
                d = int(r.content["privacy"]["device-id"])
                holdings += [(d, int(u)) for u in self.pop.uids(self.pop.held(d, t))]
        # The round's privacy events are durable before its model is released.
        self.ledger.commit_round(t, len(cohort), events, epsilons, self.delta, budget_hits, holdings)
        if ok or (cfg.device_dp and len(cohort) == 0):
            new_arrays, _ = self.strategy.aggregate_train(t, ok)
            if new_arrays is not None:
                arrays = new_arrays
        out.epsilon_example_max = self.book.max_epsilon("example") if cfg.dp else float("inf")
        out.epsilon_device_max = self.book.max_epsilon("device") if cfg.device_dp else None
        out.extra["devices_over_budget"] = len(self.book.exhausted)
        if self.pop.stream is not None:
            out.extra["activity_total"] = int(self.activity.sum())
        if t % cfg.eval_every == 0 or t == cfg.rounds:
            m = self.evaluate(arrays)
            out.accuracy, out.macro_f1, out.test_loss = m["accuracy"], m["macro_f1"], m["test_loss"]
            for k in ("slot_f1", "sentence_accuracy"):
                if k in m:
                    out.extra[k] = m[k]
        self.rundir.save_checkpoint(arrays, t)
        out.seconds = time.perf_counter() - t0
        self.rundir.append_metrics(out.to_json())
        return arrays, out


def run_server(grid: Grid, cfg: RunConfig, progress: bool = True) -> dict:
    """Run every round of ``cfg`` on ``grid``; return a small summary dict.

    Raises
    ------
    dpfl.config.ConfigError, partitions.errors.DataError, nlu.model.ModelError
        On bad settings or data (before any round runs).
    """
    from tqdm.auto import tqdm

    _quiet_flower()
    server = Server(cfg)
    node_of = map_nodes_to_devices(grid, cfg.num_devices)
    arrays = ArrayRecord(server.model.state_dict())
    bar = tqdm(range(1, cfg.rounds + 1), desc="rounds", unit="round", disable=not progress, dynamic_ncols=True)
    last = None
    for t in bar:
        arrays, last = server.run_round(grid, t, arrays, node_of)
        post = {"cohort": last.cohort_size}
        if last.accuracy is not None:
            post["acc"] = f"{last.accuracy:.3f}"
        post["eps"] = f"{last.epsilon_example_max:.2f}"
        if last.epsilon_device_max is not None:
            post["eps_dev"] = f"{last.epsilon_device_max:.2f}"
        bar.set_postfix(post)
    server.ledger.close()
    return {"run_dir": str(server.rundir.path), "final": last.__dict__ if last else None, "delta": server.delta}


_BOUND: dict[str, RunConfig] = {}


def make_server_app(cfg: RunConfig, progress: bool = True) -> ServerApp:
    """A ServerApp bound to ``cfg`` (used by ``dpfl simulate``)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        result = run_server(grid, cfg, progress=progress)
        _BOUND["result"] = result  # type: ignore[assignment]

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: settings from ``[tool.flwr.app.config]``."""
    cfg = RunConfig.from_mapping(dict(context.run_config)).with_defaults().validate()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_server(grid, cfg)
