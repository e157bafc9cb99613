"""The ServerApp: the round loop.

Each round: compute every device's inclusion probability from its activity, Poisson-sample
the cohort, send it the global weights (messages built by the Flower strategy), collect the
replies, write the round's privacy events to the ledger in one transaction, aggregate with
the strategy, evaluate the global model on the test split, append the round to
``metrics.jsonl`` and checkpoint the model.

Costs kept off the round (see benchmarks/round_overhead.py): devices are assigned to nodes
without a query round-trip (:func:`map_nodes_to_devices`); replies are validated on views of
their bytes and, for FedAvg, FedProx and FedAdam without device-level DP, folded into a running
weighted sum as they arrive (:class:`RunningMean`) and their arrays dropped, so the server holds
about two copies of the model whatever the cohort size; the strategy then receives that mean as
one reply. Each round's ``phase_seconds`` in metrics.jsonl says where its time went.

``dpfl simulate`` runs :func:`make_server_app` bound to its RunConfig; ``flwr run .`` runs
the module-level ``app``, which reads the same settings from the Flower run config.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx

from client.arrays import array_view, load_into, record_from_numpy, record_from_state
from dp.accounting import SubsampledGaussianEvent
from dp.audit.run import write_canaries
from dpfl.config import RunConfig
from nlu.model import load_tokenizer
from nlu.tasks import task_for_data
from partitions.population import Population, build_population
from rundir import EventRow, Ledger, RunDir
from server.device_dp import DeviceDPStrategy, _AsReply
from server.privacy import PrivacyBook, calibrate_example_noise, local_mechanism
from server.selection import ActivitySelector, poisson_cohort
from server.strategies import CohortGrid, make_strategy

log = logging.getLogger("dpfl.server")

#: Set (e.g. by ``dpfl simulate``'s SIGINT handler) to stop the run at the next safe point:
#: the round in flight is abandoned (its privacy events are already in the ledger) and the run
#: stays resumable from its last checkpoint.
STOP = threading.Event()


class Interrupted(Exception):
    """The run was stopped (Ctrl-C) before its last round; resume with ``dpfl simulate --resume``."""


def validate_update(content: RecordDict, expected: dict[str, tuple[tuple[int, ...], str]], dp: bool) -> str | None:
    """Why a device's training reply cannot be averaged in (None if it can).

    Checks: an ``arrays`` ArrayRecord with exactly the global model's keys, shapes and dtypes,
    every value finite; a ``metrics`` record with a finite positive ``num-examples``; with DP,
    a ``privacy`` record.
    """
    if "arrays" not in content.array_records:
        return "no arrays in the reply"
    arrays = content.array_records["arrays"]
    keys = set(arrays.keys())
    if keys != set(expected):
        missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
        return f"wrong keys (missing {missing[:3]}, unexpected {extra[:3]})"
    for k, (shape, dtype) in expected.items():
        a = arrays[k]
        if tuple(a.shape) != tuple(shape) or str(a.dtype) != dtype:
            return f"{k}: shape {tuple(a.shape)} {a.dtype}, expected {tuple(shape)} {dtype}"
        v = array_view(a)
        if v.dtype.kind in "fc" and not np.isfinite(v).all():
            return f"{k}: non-finite values (NaN or inf)"
    if "metrics" not in content.metric_records:
        return "no metrics in the reply"
    n = content.metric_records["metrics"].get("num-examples")
    if not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
        return f"num-examples {n!r} is not a positive number"
    if dp and "privacy" not in content.config_records:
        return "no privacy record in the reply"
    return None


def _quiet_flower() -> None:
    for name in ("flwr", "flower", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)


def map_nodes_to_devices(grid: Grid, num_devices: int, timeout: float = 600.0, query: bool = False) -> dict[int, int]:
    """Device id -> node id.

    Default: device k is the k-th node in node-id order, and every training message names its
    device (``"device"`` record), so no message needs to travel before round 1. (Asking each
    node costs a round-trip per node, and Flower's in-memory link state scans every stored
    message for every node, which grows with the square of the population.)
    ``query=True``: ask every node which device it is (its ``partition-id``).

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
    if not query:
        return {d: int(n) for d, n in enumerate(sorted(node_ids)[:num_devices])}
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


def _short_reason(reason: str) -> str:
    """One line out of a device error (Flower/Ray wrap the exception in a long traceback)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", reason or "")
    found = re.findall(r"Message: (.+)", text)
    line = found[-1] if found else next((x for x in text.splitlines() if x.strip()), "unknown error")
    return line.strip().rstrip("'>").strip()[:300]


class RunningMean:
    """The example-weighted mean of the replies' arrays, folded in one reply at a time.

    FedAvg's average (weights ``num-examples``), accumulated in place as replies arrive, so the
    server never holds more than the running sum and one reply. Floating arrays are averaged
    (float32 sums of ``n_k * w_k``, divided by ``sum n_k`` at the end); other arrays (integer
    buffers such as position ids) keep the global model's values.
    """

    def __init__(self, current: ArrayRecord):
        self.current = current
        self.sums: dict[str, np.ndarray] = {}
        self.total = 0.0

    def add(self, arrays: ArrayRecord, weight: float) -> None:
        w = float(weight)
        for k, a in arrays.items():
            v = array_view(a)
            if v.dtype.kind != "f":
                continue
            if k not in self.sums:
                self.sums[k] = np.multiply(v, w, dtype=v.dtype)
            else:
                self.sums[k] += np.multiply(v, w, dtype=v.dtype)
        self.total += w

    def result(self) -> ArrayRecord | None:
        """The mean as an ArrayRecord (None before any reply)."""
        if self.total <= 0:
            return None
        out = {}
        for k, a in self.current.items():
            if k in self.sums:
                acc = self.sums.pop(k)
                acc /= self.total
                out[k] = acc
            else:
                out[k] = np.asarray(array_view(a))
        return record_from_numpy(out)


@dataclass
class RoundOutcome:
    """What happened in one round (one line of metrics.jsonl)."""

    round: int
    cohort_size: int
    replies: int = 0
    failures: int = 0
    timeouts: int = 0
    rejected: int = 0
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

    def __init__(self, cfg: RunConfig, resume: bool = False):
        self.cfg = cfg
        self.rundir = RunDir(Path(cfg.run_dir), resume=resume)
        self.pop: Population = build_population(cfg)
        self.delta = cfg.resolve_delta(len(self.pop.data.train))
        self.cfg.target_delta = self.delta
        self.num_labels = len(self.pop.data.label_names)
        self.activity = self.pop.activity(1)  # a_k(1); updated each round in the continual setting
        empty = int((self.activity == 0).sum())
        if empty:
            log.warning("%d devices hold no examples after partitioning; they are never selected", empty)
        # every planned round's activities [T, K] (continual), or the static ones [K]
        planned = self.pop.planned_activity(cfg.rounds)
        if cfg.dp and cfg.target_epsilon is not None:
            cfg.noise_multiplier = calibrate_example_noise(cfg, planned.ravel(), self.delta)
            log.warning("--target-epsilon %g: noise multiplier calibrated to %.4f", cfg.target_epsilon, cfg.noise_multiplier)
        alpha = cfg.activity_exponent if cfg.selection == "activity" else 0.0
        self.selector = ActivitySelector(planned, alpha, cfg.cohort_size, cfg.selection_constant)
        self.rng = np.random.default_rng([cfg.seed, 1])
        self.ledger = Ledger(self.rundir.ledger_path, cfg.run_id)
        if not self.selector.calibrated:
            note = "c was set directly by the user (--selection-constant)."
        elif self.pop.stream is None:
            note = (
                "c was calibrated once, before round 1, from the devices' starting activities "
                f"(sum of a_k^alpha) so that the expected cohort size is {cfg.cohort_size:g}; "
                "this one calibration read the activity total, which the guarantee does not cover."
            )
        else:
            note = (
                "c was calibrated once, before round 1, from every planned round's activities "
                f"(the arrival schedule) so that the expected cohort size averaged over the {cfg.rounds} "
                f"rounds is {cfg.cohort_size:g} (early rounds, when devices hold less, select fewer); "
                "this one calibration read the activity totals, which the guarantee does not cover."
            )
        self.ledger.start_run(
            target_delta=self.delta, accountant=cfg.accountant, selection_constant=self.selector.c, calibration_note=note
        )
        self.ledger.record_devices(self.activity, self.selector.probabilities(self.activity))
        self.rundir.write_config(cfg)
        write_canaries(self.rundir.path, self.pop, self.rundir.ledger_path, cfg.run_id)
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
        # Replies are averaged as they arrive when the strategy's aggregate is FedAvg's weighted
        # mean (FedAvg, FedProx; FedAdam then steps on that mean); device-level DP needs them all.
        self.streaming = not cfg.device_dp and isinstance(self.strategy, FedAvg)
        self.expected = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in self.model.state_dict().items()}
        self.attempt = self.ledger.next_attempt()
        self.start_round = 1
        self.arrays = record_from_state(self.model.state_dict())
        if resume:
            self._resume()

    # ------------------------------------------------------------------ resume
    def _resume(self) -> None:
        """Continue from the last complete round: model, strategy and rng states, privacy book.

        Every privacy event in the ledger is loaded, including those of a round that crashed
        after its events were committed (they were spent); that round is re-run as a new attempt.
        """
        ck = self.rundir.load_checkpoint()
        last, last_line = 0, None
        if ck is not None:
            last, sd, state, server_state = ck
            self.arrays = record_from_state(sd)
            self.rng.bit_generator.state = state["selection_rng"]
            last_line = state.get("metrics")
            inner = self.strategy.inner if isinstance(self.strategy, DeviceDPStrategy) else self.strategy
            for k, v in ((server_state or {}).get("strategy") or {}).items():
                setattr(inner, k, v)
            if isinstance(self.strategy, DeviceDPStrategy) and (server_state or {}).get("device_dp_rng"):
                self.strategy.rng.bit_generator.state = server_state["device_dp_rng"]
            self.ledger.complete_round(last, int(state.get("cohort_size", 0)), int(state.get("attempt", 0)))
        self.rundir.repair_metrics(last, last_line)
        for unit in ("example", "device"):
            self.book.load(unit, self.ledger.events(unit))
        self.book.exhausted.update(self.ledger.exhausted())
        self.start_round = last + 1
        log.warning(
            "resuming %s after round %d (attempt %d); %d devices' privacy histories loaded from the ledger",
            self.cfg.run_dir, last, self.attempt, len(self.book.history["example"]) + len(self.book.history["device"]),
        )

    def server_state(self) -> dict:
        """Picklable state needed to resume: the strategy's optimizer moments, the device-DP rng."""
        inner = self.strategy.inner if isinstance(self.strategy, DeviceDPStrategy) else self.strategy
        strat = {k: getattr(inner, k) for k in ("m_t", "v_t") if getattr(inner, k, None) is not None}
        out: dict = {"strategy": strat}
        if isinstance(self.strategy, DeviceDPStrategy):
            out["device_dp_rng"] = self.strategy.rng.bit_generator.state
        return out

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
        load_into(self.model, arrays)
        return self.task.evaluate(self.model, self.test_enc)

    def _receive(self, grid: Grid, msgs: list[Message], timeout: float, on_reply=None) -> list[Message]:
        """Send ``msgs``; collect the replies that arrive within ``timeout`` seconds (or until STOP).

        ``on_reply(message)``, if given, is called on each reply as soon as it is pulled.
        """
        ids = set(grid.push_messages(msgs))
        del msgs
        end = time.time() + timeout
        out: list[Message] = []
        while ids and time.time() < end:
            got = list(grid.pull_messages(ids))
            out += got
            ids -= {m.metadata.reply_to_message_id for m in got}
            if on_reply is not None:
                for m in got:
                    on_reply(m)
            if STOP.is_set():
                raise Interrupted("interrupted")
            if ids:
                time.sleep(0.1)
        return out

    def run_round(self, grid: Grid, t: int, arrays: ArrayRecord, node_of: dict[int, int]) -> tuple[ArrayRecord, RoundOutcome]:
        cfg = self.cfg
        t0 = time.perf_counter()
        phase: dict[str, float] = {}
        mark = [t0]

        def lap(name: str) -> None:
            now = time.perf_counter()
            phase[name] = phase.get(name, 0.0) + now - mark[0]
            mark[0] = now

        self.activity = self.pop.activity(t)
        q, budget_hits = self.probabilities()
        cohort = poisson_cohort(q, self.rng)
        out = RoundOutcome(round=t, cohort_size=len(cohort))
        lap("select")
        events: list[EventRow] = []
        epsilons: dict[tuple[int, str], float] = {}
        ok: list[Message] = []
        if cfg.device_dp:
            # Every device that could have been selected took part in this round's mechanism.
            dev_events = {int(d): SubsampledGaussianEvent(cfg.device_noise_multiplier, float(q[d]), 1) for d in np.flatnonzero(q > 0)}
            events += [EventRow(d, "device", e.noise_multiplier, e.sample_rate, 1, cfg.update_clip_norm) for d, e in dev_events.items()]
            epsilons.update(self.book.add("device", dev_events))
        # Example level: the event of every device asked to train, written BEFORE the messages
        # leave, so a device that trains and then fails, times out, sends a rejected update or
        # outlives a server crash is still in the ledger (never under-reported).
        prior: dict[int, list[SubsampledGaussianEvent]] = {}
        if cfg.dp and len(cohort):
            ex_events = {}
            for d in cohort:
                d = int(d)
                sr, steps = local_mechanism(int(self.activity[d]), cfg.batch_size, cfg.local_epochs)
                ex_events[d] = SubsampledGaussianEvent(cfg.noise_multiplier, sr, steps)
                prior[d] = list(self.book.history["example"].get(d, []))
                events.append(EventRow(d, "example", cfg.noise_multiplier, sr, steps, cfg.max_grad_norm))
            epsilons.update(self.book.add("example", ex_events))
        holdings = []
        if cfg.dp and self.pop.stream is not None:
            for d in cohort:
                holdings += [(int(d), int(u)) for u in self.pop.uids(self.pop.held(int(d), t))]
        self.ledger.commit_round(
            t, len(cohort), events, epsilons, self.delta, budget_hits, holdings, attempt=self.attempt, complete=False
        )
        lap("ledger")
        lost: list[tuple[int, str, str]] = []
        mean = RunningMean(arrays) if self.streaming else None
        if len(cohort) == 0:
            log.warning("round %d: the Poisson-sampled cohort is empty; %s", t, "noise-only update" if cfg.device_dp else "round skipped")
            out.skipped = not cfg.device_dp
            if cfg.device_dp:
                self.strategy.current = {k: v.numpy() for k, v in arrays.items()}
        else:
            round_cfg = ConfigRecord(
                {"num-labels": self.num_labels, "target-delta": self.delta, "deadline": time.time() + cfg.round_timeout}
            )
            run_record = ConfigRecord(cfg.to_dict_flat())
            msgs = list(
                self.strategy.configure_train(t, arrays, round_cfg, CohortGrid(grid, [node_of[int(k)] for k in cohort]))
            )
            device_of = {n: d for d, n in node_of.items()}
            personal = []
            for m in msgs:  # the strategy's messages share one RecordDict: give each its own
                hist = prior.get(device_of.get(m.metadata.dst_node_id, -1), [])
                content = RecordDict(dict(m.content.items()))
                content["run"] = run_record
                content["device"] = ConfigRecord({"device-id": device_of[m.metadata.dst_node_id]})
                # The device's past example-level events (the ledger's): its accountant composes
                # them with this round's, also after a resume, when its own node state is empty.
                content["privacy-history"] = ConfigRecord(
                    {
                        "noise_multiplier": [float(e.noise_multiplier) for e in hist],
                        "sample_rate": [float(e.sample_rate) for e in hist],
                        "steps": [int(e.steps) for e in hist],
                    }
                )
                personal.append(Message(content, dst_node_id=m.metadata.dst_node_id, message_type=m.metadata.message_type))
            msgs = personal
            lap("messages")
            answered = set()

            def handle(r: Message) -> None:
                d = device_of.get(r.metadata.src_node_id)
                if d is None or d in answered:
                    return
                answered.add(d)
                if r.has_error():
                    out.failures += 1
                    reason = _short_reason(r.error.reason)
                    lost.append((d, "error", reason))
                    log.warning("round %d: device %d failed: %s", t, d, reason)
                    return
                why = validate_update(r.content, self.expected, cfg.dp)
                if why is None and "info" in r.content and int(r.content["info"].get("device-id", d)) != d:
                    why = "device id in the reply does not match the node"
                if why is not None:
                    out.rejected += 1
                    lost.append((d, "rejected", why))
                    log.warning("round %d: update of device %d rejected: %s", t, d, why)
                    return
                if mean is not None:  # fold in now; keep the reply without its arrays
                    mean.add(r.content["arrays"], float(r.content["metrics"]["num-examples"]))
                    rest = RecordDict({k: v for k, v in r.content.items() if k != "arrays"})
                    r = _AsReply(SimpleNamespace(content=rest, metadata=r.metadata))
                ok.append(r)

            self._receive(grid, msgs, cfg.round_timeout, on_reply=handle)
            lap("send_receive")
            for d in sorted(set(int(k) for k in cohort) - answered):
                out.timeouts += 1
                lost.append((d, "timeout", f"no reply within --round-timeout {cfg.round_timeout:g}s"))
            if out.timeouts:
                log.warning("round %d: %d devices did not reply within %gs", t, out.timeouts, cfg.round_timeout)
            out.replies = len(ok)
            nodes = {str(r.content["info"]["ray-node"]) for r in ok if "info" in r.content}
            out.extra["ray_nodes"] = len(nodes - {""})
            out.extra["device_nodes"] = {
                int(r.content["info"]["device-id"]): str(r.content["info"]["ray-node"]) for r in ok if "info" in r.content
            }
            losses = [float(r.content["metrics"]["train_loss"]) for r in ok]
            weights = [float(r.content["metrics"]["num-examples"]) for r in ok]
            good = [(l, w) for l, w in zip(losses, weights) if math.isfinite(l)]
            if good:
                out.train_loss = float(np.average([l for l, _ in good], weights=[w for _, w in good]))
            if ok:
                out.train_seconds_mean = float(np.mean([float(r.content["metrics"]["train_seconds"]) for r in ok]))
                out.extra["task_seconds_mean"] = float(np.mean([float(r.content["metrics"].get("task_seconds", 0.0)) for r in ok]))
            lap("validate")
        self.ledger.record_lost(t, self.attempt, lost)
        if mean is not None:
            new_arrays = mean.result()
            if new_arrays is not None and type(self.strategy) not in (FedAvg, FedProx):
                # e.g. FedAdam: its server step on the mean, handed over as one reply
                synthetic = RecordDict({"arrays": new_arrays, "metrics": MetricRecord({"num-examples": 1})})
                new_arrays, _ = self.strategy.aggregate_train(t, [_AsReply(Message(synthetic, dst_node_id=0, message_type="train"))])
            if new_arrays is not None:
                arrays = new_arrays
        elif ok or cfg.device_dp:
            new_arrays, _ = self.strategy.aggregate_train(t, ok)
            if new_arrays is not None:
                arrays = new_arrays
        lap("aggregate")
        out.epsilon_example_max = self.book.max_epsilon("example") if cfg.dp else float("inf")
        out.epsilon_device_max = self.book.max_epsilon("device") if cfg.device_dp else None
        out.extra["devices_over_budget"] = len(self.book.exhausted)
        if self.pop.stream is not None:
            out.extra["activity_total"] = int(self.activity.sum())
        if t % cfg.eval_every == 0 or t == cfg.rounds:
            lap("accounting")
            m = self.evaluate(arrays)
            out.accuracy, out.macro_f1, out.test_loss = m["accuracy"], m["macro_f1"], m["test_loss"]
            for k in ("slot_f1", "sentence_accuracy"):
                if k in m:
                    out.extra[k] = m[k]
            lap("evaluate")
            out.extra["eval_seconds"] = phase["evaluate"]
        lap("accounting")
        out.seconds = time.perf_counter() - t0
        out.extra["phase_seconds"] = {k: round(v, 4) for k, v in phase.items()}
        line = out.to_json()
        # Order: ledger (above) -> checkpoint -> rounds row -> metrics line.
        self.rundir.save_checkpoint(
            arrays.to_torch_state_dict(),
            t,
            {"selection_rng": self.rng.bit_generator.state, "attempt": self.attempt, "cohort_size": len(cohort), "metrics": line},
            self.server_state(),
        )
        self.ledger.complete_round(t, len(cohort), self.attempt)
        self.rundir.append_metrics(line)
        return arrays, out


def run_server(grid: Grid, cfg: RunConfig, progress: bool = True, resume: bool = False) -> dict:
    """Run every round of ``cfg`` on ``grid``; return a small summary dict.

    Raises
    ------
    dpfl.config.ConfigError, partitions.errors.DataError, nlu.model.ModelError
        On bad settings or data (before any round runs).
    Interrupted
        When :data:`STOP` is set (Ctrl-C); the run directory stays resumable.
    """
    from tqdm.auto import tqdm

    _quiet_flower()
    t0 = time.perf_counter()
    server = Server(cfg, resume=resume)
    timings: dict = {"server_init": time.perf_counter() - t0, "rounds": []}
    try:
        t0 = time.perf_counter()
        node_of = map_nodes_to_devices(grid, cfg.num_devices)
        timings["node_mapping"] = time.perf_counter() - t0
        arrays = server.arrays
        bar = tqdm(
            range(server.start_round, cfg.rounds + 1), desc="rounds", unit="round", disable=not progress,
            dynamic_ncols=True, initial=server.start_round - 1, total=cfg.rounds,
        )
        last = None
        for t in bar:
            if STOP.is_set():
                raise Interrupted(f"interrupted before round {t}")
            t0 = time.perf_counter()
            arrays, last = server.run_round(grid, t, arrays, node_of)
            timings["rounds"].append(time.perf_counter() - t0)  # with checkpoint and ledger completion
            post = {"cohort": last.cohort_size}
            if last.accuracy is not None:
                post["acc"] = f"{last.accuracy:.3f}"
            post["eps"] = f"{last.epsilon_example_max:.2f}"
            if last.epsilon_device_max is not None:
                post["eps_dev"] = f"{last.epsilon_device_max:.2f}"
            if last.failures or last.timeouts or last.rejected:
                post["lost"] = last.failures + last.timeouts + last.rejected
            bar.set_postfix(post)
    finally:
        server.ledger.close()
    return {"run_dir": str(server.rundir.path), "final": last.__dict__ if last else None, "delta": server.delta, "timings": timings}


_BOUND: dict[str, RunConfig] = {}


def make_server_app(cfg: RunConfig, progress: bool = True, resume: bool = False) -> ServerApp:
    """A ServerApp bound to ``cfg`` (used by ``dpfl simulate``; ``resume`` continues its run directory)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        result = run_server(grid, cfg, progress=progress, resume=resume)
        _BOUND["result"] = result  # type: ignore[assignment]

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: settings from ``[tool.flwr.app.config]``."""
    cfg = RunConfig.from_mapping(dict(context.run_config)).with_defaults().validate()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_server(grid, cfg)
