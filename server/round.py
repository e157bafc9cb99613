"""One federated round as a short sequence of named stages.

::

    sel   = select(server, t)                          # q_k(t), budgets, Poisson cohort (secret draws)
    commit_events(server, sel)                         # the mechanism's privacy events -> ledger, BEFORE anything leaves
    msgs  = dispatch(server, grid, sel, arrays, node_of)  # one training message per cohort member
    collect(server, grid, msgs, sel, out)              # replies validated and folded into the aggregator as they arrive
    arrays = aggregate(server, sel)                    # aggregator result -> strategy's server step -> new global arrays
    for hook in server.hooks: hook(server, t, arrays, out)   # evaluate, checkpoint, metrics line

:func:`run_round` is exactly that. What a stage needs of the run lives on the
:class:`server.state.Server` it receives (population, selector, ledger, privacy book, noise
source, strategy, the run's mechanism and its aggregator); hooks are in :mod:`server.hooks`;
what a round sends, what a reply holds, how replies combine and what is accounted are the
mechanism's (:mod:`mechanisms`): no stage tests which mechanism runs.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from dp.accounting import SubsampledGaussianEvent, dp_event_to_json, to_dp_event
from protocol import messages as rec
from protocol.arrays import array_view, record_from_numpy
from protocol.messages import validate_update
from rundir import EventRow
from mechanisms import RoundPlan
from server.control import receive
from server.selection import poisson_cohort
from server.strategies import CohortGrid

log = logging.getLogger("dpfl.server")

@dataclass
class RoundOutcome:
    """What happened in one round (one line of metrics.jsonl).

    ``train_loss`` is set only by non-private runs: a private run's devices never send an
    un-noised statistic of their data. Evaluation metrics are on the test split.
    """

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
    epsilon_example_max: float | None = 0.0
    epsilon_device_max: float | None = None
    seconds: float = 0.0
    train_seconds_mean: float | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        """One metrics.jsonl line (strict JSON: an infinite or NaN value is written as null)."""
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        return json.dumps(_finite(d), allow_nan=False)


def _finite(x):
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


@dataclass
class Selection:
    """The round's selection: inclusion probabilities q [K], the cohort (device ids), budget hits."""

    round: int
    q: np.ndarray
    cohort: np.ndarray
    budget_hits: list[tuple[int, str, float]]


class _Clock:
    """Seconds spent in each named phase of a round (``phase_seconds`` in metrics.jsonl)."""

    def __init__(self):
        self.t0 = self.mark = time.perf_counter()
        self.phase: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phase[name] = self.phase.get(name, 0.0) + now - self.mark
        self.mark = now


# ---------------------------------------------------------------------------------- stages
def select(server, t: int) -> Selection:
    """q_k(t) from each device's own activity, minus devices over a budget; Poisson cohort.

    The cohort is drawn from the run's secret :class:`dp.secure_random.NoiseSource`.
    """
    server.activity = server.pop.activity(t)
    server.apply_deletions(t)
    q, hits = server.probabilities(t)
    return Selection(t, q, poisson_cohort(q, server.noise), hits)


def commit_events(server, sel: Selection) -> None:
    """Write the round's privacy events to the ledger in one transaction, before any message leaves.

    For each unit the mechanism accounts, the devices it charges this round
    (:meth:`mechanisms.base.Mechanism.accounted`): example level, every device asked to train,
    so a device that trains and then fails, times out, sends a rejected update or outlives a
    server crash is still in the ledger (never under-reported); device level, every device that
    could have been selected (q_k > 0) took part in the round's mechanism. Each row names the
    mechanism and holds the event as a dp-accounting ``DpEvent`` (JSON).
    """
    mech, book, t = server.mechanism, server.book, sel.round
    events: list[EventRow] = []
    epsilons: dict[tuple[int, str], float] = {}
    for unit in mech.units:
        charged = {int(d): mech.event(unit, int(server.activity[d]), float(sel.q[d])) for d in mech.accounted(unit, sel.q, sel.cohort)}
        if not charged:
            continue
        clip = mech.clip_norm(unit)
        serialised = {e: dp_event_to_json(to_dp_event(e)) for e in set(charged.values())}  # one per distinct event
        # the (sigma, q, steps) columns of another dp-accounting event (secure aggregation's Skellam
        # zCDP bound): the run's noise multiplier, one release; its dp_event is what is composed
        columns = {e: (e.noise_multiplier, e.sample_rate, e.steps) if isinstance(e, SubsampledGaussianEvent)
                   else (float(server.cfg.noise_multiplier or 0.0), 1.0, 1) for e in serialised}
        events += [EventRow(d, unit, *columns[e], clip, mech.name, serialised[e]) for d, e in charged.items()]
        epsilons.update(book.add(unit, charged))
    holdings = []
    if "example" in mech.units and server.pop.stream is not None:
        for d in map(int, sel.cohort):
            holdings += [(d, int(u)) for u in server.pop.uids(server.pop.held(d, t))]
    server.ledger.commit_round(
        t, len(sel.cohort), events, epsilons, server.delta, sel.budget_hits, holdings, attempt=server.attempt, complete=False
    )


def plan_of(server, sel: Selection) -> RoundPlan:
    """The round's public expectations: m (expected cohort) and the expected examples E[n]: sum_k p n_k over
    the cohort, or, under cyclic selection (``--bands`` b > 1), the expectation over a cycle of b rounds,
    (1/b) sum_k q_k p n_k over all devices (every group's rounds divide by the same E[n], so that a group
    holding little data takes a small step and a cycle's steps add up to one over all the data)."""
    cfg = server.cfg
    held = float(sum(int(server.activity[d]) for d in sel.cohort))
    if server.selector.bands > 1:
        q_all = server.selector.probabilities(server.activity)
        expected = float(cfg.sample_rate * np.dot(q_all, server.activity) / server.selector.bands)
    else:
        expected = float(sum(cfg.sample_rate * int(server.activity[d]) for d in sel.cohort))  # (as ever, term by term)
    return RoundPlan(
        round=sel.round,
        expected_cohort=float(cfg.cohort_size),
        expected_examples=expected,
        lr_factor=lr_factor(cfg.server_lr_schedule, sel.round, cfg.rounds),
        cohort=tuple(int(d) for d in sel.cohort),
        cohort_examples=held,
    )


def lr_factor(schedule: str, t: int, rounds: int) -> float:
    """The server learning rate's factor in round ``t`` of ``rounds``: 1 (``constant``) or cosine decay.

    ``cosine``: 0.5 (1 + cos(pi (t - 1) / rounds)), from 1 in round 1 towards 0 (Loshchilov &
    Hutter 2017, SGDR, Eq. 5 without restarts). A schedule is public: it costs no privacy.
    """
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (t - 1) / max(rounds, 1)))
    return 1.0


def dispatch(server, grid: Grid, sel: Selection, arrays: ArrayRecord, node_of: dict[int, int]) -> list[Message]:
    """One training message per cohort member (built by the Flower strategy, then personalised).

    Each carries the trainable arrays, the round config (deadline, delta and the mechanism's
    round parameters, :meth:`mechanisms.base.Mechanism.round_params`), the settings a device reads
    (``RunConfig.device_settings``: no budget, selection, deletion or server setting) and its
    device id; with ``--pc-weight`` and a previous release, that release's trainable parameters
    (``pc-teacher``).
    """
    cfg = server.cfg
    round_cfg = {"num-labels": server.num_labels, "target-delta": server.delta, "deadline": time.time() + cfg.round_deadline_seconds()}
    round_cfg.update(server.mechanism.round_params())
    run_record = ConfigRecord(cfg.device_settings())
    # the strategy addresses cohort positions (its node sampling shuffles, and a node may serve
    # several devices); each message then goes to its device's node
    cohort = [int(k) for k in sel.cohort]
    cohort_grid = CohortGrid(grid, list(range(len(cohort))))
    msgs = list(server.strategy.configure_train(sel.round, arrays, ConfigRecord(round_cfg), cohort_grid))
    teacher = server.releases.last_arrays if cfg.pc_weight > 0 else None
    teacher_record = record_from_numpy(teacher) if teacher is not None else None
    out = []
    for m in msgs:  # the strategy's messages share one RecordDict: give each its own
        d = cohort[int(m.metadata.dst_node_id)]
        entries = server.aggregator.train_entries(d)
        if entries is None:  # the device left the round's protocol (secure aggregation)
            continue
        content = RecordDict(dict(m.content.items()))
        if entries:
            content[rec.CONFIG] = ConfigRecord({**dict(content[rec.CONFIG]), **entries})
        content[rec.RUN] = run_record
        content[rec.DEVICE] = ConfigRecord({"device-id": d})
        if teacher_record is not None:
            content[rec.TEACHER] = teacher_record
        out.append(Message(content, dst_node_id=int(node_of[d]), message_type=m.metadata.message_type))
    return out


def exchange(server, grid: Grid, sel: Selection, stage: str, node_of: dict[int, int]) -> None:
    """One of the round's exchanges besides training (:attr:`mechanisms.base.Aggregator.stages_before` /
    ``stages_after``: secure aggregation's keys, shares and unmask): the aggregator's request to each device
    it names, each reply's ``stage`` record (alone) back to the aggregator, a failed or late one as None.

    A device's node state holds what it keeps between the exchanges, so a node gets one message at a time:
    devices that share a node are asked in turns (waves), never at once.
    """
    requests = server.aggregator.stage_requests(stage)
    if not requests:
        return
    cfg, t = server.cfg, sel.round
    run_record = ConfigRecord(cfg.device_settings())
    waves: list[list[int]] = []
    seen: dict[int, int] = {}
    for d in requests:
        w = seen.get(node_of[d], 0)
        seen[node_of[d]] = w + 1
        if w == len(waves):
            waves.append([])
        waves[w].append(d)
    answered: set[int] = set()
    for wave in waves:
        deadline = time.time() + cfg.round_deadline_seconds()
        msgs = []
        for d in wave:
            entries = {"server-round": t, "deadline": deadline, rec.STAGE_KEY: stage, **requests[d]}
            content = RecordDict({rec.CONFIG: ConfigRecord(entries), rec.RUN: run_record,
                                  rec.DEVICE: ConfigRecord({"device-id": d})})
            msgs.append(Message(content, dst_node_id=int(node_of[d]), message_type="train"))

        def handle(r: Message, i: int, wave=wave) -> None:
            d = wave[i]
            answered.add(d)
            reply = None
            if r.has_error():
                log.warning("round %d: device %d failed in the %s exchange: %s", t, d, stage, _short_reason(r.error.reason))
            elif set(r.content.keys()) != {rec.STAGE} or rec.STAGE not in r.content.config_records:
                log.warning("round %d: %s reply of device %d rejected: it must hold the stage record alone", t, stage, d)
            else:
                reply = dict(r.content.config_records[rec.STAGE])
            why = server.aggregator.stage_reply(stage, d, reply)
            if why is not None:
                log.warning("round %d: %s reply of device %d rejected: %s", t, stage, d, why)

        receive(grid, msgs, cfg.round_deadline_seconds(), handle, adaptive=cfg.round_timeout is None, control=server.control)
    for d in sorted(set(requests) - answered):
        log.warning("round %d: device %d did not answer the %s exchange in time", t, d, stage)
        server.aggregator.stage_reply(stage, d, None)


def _short_reason(reason: str) -> str:
    """One line out of a device error (Flower/Ray wrap the exception in a long traceback)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", reason or "")
    found = re.findall(r"Message: (.+)", text)
    line = found[-1] if found else next((x for x in text.splitlines() if x.strip()), "unknown error")
    return line.strip().rstrip("'>").strip()[:300]


def collect(server, grid: Grid, msgs: list[Message], sel: Selection, out: RoundOutcome) -> list[tuple[int, str, str]]:
    """Send the messages; validate each reply and fold it into the aggregator as it arrives (the wait is
    :func:`server.control.receive`: deadline, Ctrl-C and backend checks of ``server.control``).

    A failed, rejected or late device is counted in ``out`` and returned as a lost update
    ``(device, reason, detail)`` (its privacy event is already in the ledger). Only the
    replies' small records are kept (for timings and the Ray nodes), never their arrays.
    """
    cfg, t = server.cfg, sel.round
    devices = [int(m.content[rec.DEVICE]["device-id"]) for m in msgs]  # the server's own addressing
    answered: set[int] = set()
    lost: list[tuple[int, str, str]] = []
    kept: list[RecordDict] = []
    spec = server.mechanism.reply
    expected = server.mechanism.reply_arrays(server.expected)

    def handle(r: Message, i: int) -> None:
        d = devices[i]
        if d in answered:
            return
        answered.add(d)
        if r.has_error():
            out.failures += 1
            reason = _short_reason(r.error.reason)
            lost.append((d, "error", reason))
            log.warning("round %d: device %d failed: %s", t, d, reason)
            return
        why = validate_update(r.content, expected, spec.privacy_record, kind=spec.kind, clip_key=spec.clip)
        if why is None and rec.INFO in r.content and int(r.content[rec.INFO].get("device-id", d)) != d:
            why = "device id in the reply does not match the node"
        if why is None and spec.clip:
            why = server.mechanism.check_clip(float(r.content[rec.CLIP][spec.clip]), int(server.activity[d]))
        if why is not None:
            out.rejected += 1
            lost.append((d, "rejected", why))
            log.warning("round %d: update of device %d rejected: %s", t, d, why)
            return
        weight = float(r.content[rec.METRICS]["num-examples"]) if rec.METRICS in r.content else 1.0
        clip = float(r.content[rec.CLIP][spec.clip]) if spec.clip else None
        arrays = {k: array_view(a) for k, a in r.content[rec.ARRAYS].items()}
        if held is not None:  # --reproducible-noise: folded in device order once all are in
            held.append((d, {k: np.array(a) for k, a in arrays.items()}, weight, clip))
        else:
            server.aggregator.add_reply(d, arrays, weight, clip)
        kept.append(RecordDict({k: v for k, v in r.content.items() if k not in (rec.ARRAYS, rec.CLIP)}))

    # Replies are folded in as they arrive (the server holds one running sum), so floating-point
    # sums follow the arrival order; a --reproducible-noise run holds them and folds them in
    # device order, so that the arrival order plays no part in a rerun's model.
    held: list | None = [] if cfg.reproducible_noise else None
    sent = time.perf_counter()
    latencies: list[float] = []

    def timed(r: Message, i: int) -> None:
        latencies.append(time.perf_counter() - sent)
        handle(r, i)
        if server.control.progress is not None:
            server.control.progress(len(latencies), len(devices))

    receive(grid, msgs, cfg.round_deadline_seconds(), timed, adaptive=cfg.round_timeout is None, control=server.control)
    for d, arrays, weight, clip in sorted(held or [], key=lambda x: x[0]):
        server.aggregator.add_reply(d, arrays, weight, clip)
    # the adaptive deadline's length follows the replies' times, which depend on the devices'
    # secret sample sizes: the ledger and the log name it, never its measured length
    deadline = (f"--round-timeout {cfg.round_timeout:g}s" if cfg.round_timeout is not None
                else "the adaptive round deadline")
    if latencies and not server.mechanism.private:
        # only for non-private runs: a DP-SGD device's time depends on its secret Poisson batch sizes
        out.extra["reply_seconds_mean"] = float(np.mean(latencies))
    for d in sorted(set(devices) - answered):
        out.timeouts += 1
        lost.append((d, "timeout", f"no reply within {deadline}"))
    if out.timeouts:
        log.warning("round %d: %d devices did not reply within %s", t, out.timeouts, deadline)
    out.replies = len(kept)
    _reply_stats(kept, out)
    return lost


def _reply_stats(kept: list[RecordDict], out: RoundOutcome) -> None:
    """Ray nodes, timings and (non-private runs only) the training loss of the accepted replies."""
    infos = [c[rec.INFO] for c in kept if rec.INFO in c]
    out.extra["ray_nodes"] = len({str(i["ray-node"]) for i in infos} - {""})
    out.extra["device_nodes"] = {int(i["device-id"]): str(i["ray-node"]) for i in infos}
    metrics = [c[rec.METRICS] for c in kept if rec.METRICS in c]
    losses = [(float(m["train_loss"]), float(m["num-examples"])) for m in metrics if "train_loss" in m]
    good = [(l, w) for l, w in losses if np.isfinite(l)]
    if good:
        out.train_loss = float(np.average([l for l, _ in good], weights=[w for _, w in good]))
    timed = [m for m in metrics if "train_seconds" in m]  # non-private runs only
    if timed:
        out.train_seconds_mean = float(np.mean([float(m["train_seconds"]) for m in timed]))
        out.extra["task_seconds_mean"] = float(np.mean([float(m.get("task_seconds", 0.0)) for m in timed]))


def aggregate(server, sel: Selection, arrays: ArrayRecord) -> ArrayRecord:
    """The aggregator's proposal through the strategy's server step; ``arrays`` if there is none."""
    proposal = server.aggregator.result()
    if proposal is None:
        return arrays
    return server.server_step.apply(sel.round, proposal, server.aggregator.plan.lr_factor)


# ---------------------------------------------------------------------------------- the round
def run_round(server, grid: Grid, t: int, arrays: ArrayRecord, node_of: dict[int, int]) -> tuple[ArrayRecord, RoundOutcome]:
    """Run round ``t`` from the global (trainable) ``arrays``; return the new arrays and the outcome.

    Order of what is written: ledger (events, before any message leaves) -> lost updates ->
    checkpoint -> rounds row -> metrics line (the hooks keep the last three in that order).
    With ``--server-ema`` the hooks evaluate and checkpoint the average of the global models
    (:class:`server.aggregation.ModelAverage`); the returned arrays, which the next round sends,
    are the current iterate.
    """
    clock = _Clock()
    sel = select(server, t)
    out = RoundOutcome(round=t, cohort_size=len(sel.cohort))
    clock.lap("select")
    commit_events(server, sel)
    clock.lap("ledger")
    server.aggregator.begin(t, {k: v.numpy() for k, v in arrays.items()}, plan_of(server, sel))
    lost: list[tuple[int, str, str]] = []
    noise_only = server.mechanism.releases_on_empty_cohort  # DP-FedAvg releases a noise-only update
    if len(sel.cohort) == 0:
        log.info("round %d: the Poisson-sampled cohort is empty; %s", t, "noise-only update" if noise_only else "round skipped")
        out.skipped = not noise_only
        if noise_only:
            server.strategy.configure_train(t, arrays, ConfigRecord({}), CohortGrid(grid, []))
    else:
        for stage in server.aggregator.stages_before:
            exchange(server, grid, sel, stage, node_of)
        msgs = dispatch(server, grid, sel, arrays, node_of)
        clock.lap("messages")
        lost = collect(server, grid, msgs, sel, out)
        for stage in server.aggregator.stages_after:
            exchange(server, grid, sel, stage, node_of)
        clock.lap("send_receive")
    if out.replies or noise_only:
        arrays = aggregate(server, sel, arrays)
    lost += server.aggregator.lost_updates()
    server.ledger.record_lost(t, server.attempt, lost)
    out.extra.update(server.aggregator.round_stats())
    clock.lap("aggregate")
    server.account(out)
    clock.lap("accounting")
    released = server.average.update(t, arrays) if server.average is not None else arrays
    server.current_iterate = arrays
    for hook in server.hooks:
        hook(server, t, released, out, clock)
    return arrays, out
