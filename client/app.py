"""The ClientApp: one simulated device's training and its privacy state across rounds.

A device is a Flower node. The server tells each training message which device it is for
(``"device"`` record, ``device-id``; it assigns devices to nodes once, in node-id order, see
server/app.map_nodes_to_devices); without that record the device id is the node's
``partition-id``. Each Ray actor process keeps one model instance and the tokenised data of
the devices it served (built once, reused across tasks; with a frozen encoder also their
features, nlu/features.py); every task copies the global trainable weights straight into that
instance and replies in one copy (protocol/arrays.py). Only trainable parameters travel.

What the device computes and replies is its mechanism's (mechanisms/, looked up from the
run's settings by :func:`mechanisms.mechanism_for`): this module loads the data, the model and
the weights, hands them to the mechanism's device part and turns its
:class:`mechanisms.base.DeviceReply` into the reply's records. Privacy accounting is the
server's: its ledger holds every selected device's event before the round's messages leave.
Replies carry only what protocol/messages.py lists: no text or token ids, and in a private run
no loss, timing or other statistic of the device's data (noise on the aggregate: the clipped
gradient sum alone). The task's random draws come from a secret NoiseSource
(dp/secure_random.py), never from the run seed (except with ``--reproducible-noise``).

Fault injection for tests (``--fault-rate``, ``--fault-kind``): :func:`fault_for` decides per
(seed, round, device) whether the device fails after training, and how.
"""

from __future__ import annotations

import logging
import os
import time
from functools import lru_cache

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from dp.secure_random import NoiseSource
from settings.config import RunConfig
from mechanisms import DeviceWork, mechanism_for
from mechanisms.training import teacher_logits
from nlu.features import cache_frozen_encoder, warm_feature_cache
from protocol import messages as rec
from protocol.arrays import load_into, record_from_state
from nlu.data import Encoded
from nlu.model import load_tokenizer, set_trainable
from nlu.tasks import Task, task_for_data
from partitions.population import population_for_key, population_key

app = ClientApp()
logging.getLogger("opacus").setLevel(logging.ERROR)
# A device tokenises its few utterances at a time: the tokenizers' thread pool only competes with
# the other actors for the cores (and spins while it waits)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_config_from(record: ConfigRecord) -> RunConfig:
    """The RunConfig the server sent with the message (parsed once per distinct record in this process:
    every message of a run carries the same settings)."""
    items = dict(record)
    try:
        key = tuple(sorted(items.items()))
        hash(key)
    except TypeError:  # a list-valued setting: parse it every time
        return RunConfig.from_mapping(items)
    return _parsed_config(key)


@lru_cache(maxsize=8)
def _parsed_config(items: tuple) -> RunConfig:
    return RunConfig.from_mapping(dict(items))


@lru_cache(maxsize=4)
def _task(pop_key: tuple, model_group: tuple, pc_weight: float) -> Task:
    m = dict(model_group)
    return task_for_data(m["task"], population_for_key(pop_key).data, m["slot_loss_weight"], pooling=m["pooling"],
                         pc_weight=pc_weight)


def task_of(cfg: RunConfig) -> Task:
    """The run's task (intent / slots / joint), one object per process and setting (keyed by the
    population's settings and the ``model`` setting group)."""
    return _task(population_key(cfg), cfg.group("model"), cfg.pc_weight)


@lru_cache(maxsize=1)
def _model(task: Task, model_group: tuple, seed: int, resources: tuple):
    """One model instance per process (``--trainable`` applied), on the GPU Ray assigned this actor when asked for one.

    Keyed by the ``model`` and ``resources`` setting groups. A frozen encoder (``--trainable
    head``) gets a feature cache (nlu/features.py): each of the device's utterances is encoded
    once, in this process, and reused in later rounds.
    """
    m, r = dict(model_group), dict(resources)
    torch.set_num_threads(max(1, int(r["client_cpus"])))
    cfg = RunConfig(**m, seed=seed)  # the LoRA options as RunConfig parses them
    model = set_trainable(task.build_model(m["model"], seed=seed), m["trainable"], **cfg.lora_options())
    cache_frozen_encoder(model)
    if r["client_gpus"] > 0 and torch.cuda.is_available():
        model = model.to("cuda")
    return model


def model_of(cfg: RunConfig, task: Task):
    """This process's model instance for the run's settings (see :func:`_model`)."""
    return _model(task, cfg.group("model"), cfg.seed, cfg.group("resources"))


@lru_cache(maxsize=256)
def _encoded(pop_key: tuple, rows: tuple, model_name: str, max_length: int, task: Task) -> Encoded:
    pop = population_for_key(pop_key)
    sub = pop.data.train_records(rows)  # plain columns: no Dataset built per device task
    return task.encode(sub, load_tokenizer(model_name), max_length)


def device_examples(cfg: RunConfig, device_id: int, round_: int = 1) -> Encoded:
    """The tokenised training examples ``device_id`` holds at ``round_`` (cached per process)."""
    key = population_key(cfg)
    rows = tuple(int(r) for r in population_for_key(key).held(device_id, round_))
    return _encoded(key, rows, cfg.model, cfg.max_length, task_of(cfg))


def _ray_node_id() -> str:
    """The Ray node this task runs on ("" outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # pragma: no cover - Ray absent or not in a worker
        return ""


def device_id_of(context: Context, msg: Message | None = None) -> int:
    """The device a message is for: the server's ``"device"`` record, else the node's ``partition-id``."""
    if msg is not None and "device" in msg.content.config_records:
        return int(msg.content.config_records["device"]["device-id"])
    return int(context.node_config["partition-id"])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report which device this node is (used once at the start to map node ids to devices)."""
    return Message(
        RecordDict({"device": MetricRecord({"device-id": device_id_of(context)})}),
        reply_to=msg,
    )


def fault_for(seed: int, round_: int, device_id: int, rate: float, kind: str) -> str | None:
    """The injected fault of ``device_id`` in ``round_`` (None for most), deterministic in the seed.

    ``kind`` "mixed" splits faults half "raise" (the task raises after training), half "hang"
    (it replies only after ``--round-timeout``).
    """
    if rate <= 0:
        return None
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xFA17, int(round_), int(device_id)])
    if rng.random() >= rate:
        return None
    if kind == "mixed":
        return "raise" if rng.random() < 0.5 else "hang"
    return kind


class InjectedFault(RuntimeError):
    """A device failure injected by ``--fault-rate`` (testing)."""


def _noise_source(cfg: RunConfig, server_round: int, device_id: int) -> NoiseSource:
    """The task's secret randomness (batches, example sampling, noise); seeded only with --reproducible-noise.

    With --reproducible-noise torch's global generator (dropout) is seeded from the same key too,
    so a rerun trains the same model; otherwise dropout keeps torch's own unseeded state.
    """
    if cfg.reproducible_noise:
        key = hash((cfg.seed, server_round, device_id)) & 0x7FFFFFFFFFFF
        torch.manual_seed(key)
        return NoiseSource(key)
    return NoiseSource()


def _keep_state(context: Context, key: str, state: dict) -> None:
    """Keep ``state`` (what the device holds between a round's exchanges) in the node's state under ``key``
    (removed when empty). The node state stays on the device side: it is never sent to the server."""
    if state:
        context.state[key] = ConfigRecord(state)
    elif key in context.state.config_records:
        del context.state[key]


def _inject(fault: str | None, state: dict, cfg: RunConfig, round_cfg, device_id: int, server_round: int) -> dict:
    """Apply an injected fault (testing) to the reply's arrays, or raise / hang."""
    if fault == "raise":
        raise InjectedFault(f"injected fault: device {device_id} failed after training in round {server_round}")
    if fault == "hang":
        # reply just after the server stopped waiting for this round (late: counted as a timeout)
        deadline = float(round_cfg.get("deadline", time.time() + cfg.round_deadline_seconds()))
        time.sleep(max(0.0, deadline - time.time()) + 1.0)
    elif fault == "nan":
        key = next(k for k, v in state.items() if v.is_floating_point())
        state = dict(state)
        state[key] = torch.full_like(state[key], float("nan"))
    elif fault == "shape":
        key = next(k for k, v in state.items() if v.is_floating_point())
        state = dict(state)
        state[key] = state[key].flatten()[:-1].clone()
    return state


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One device's round: its mechanism's device part (DP-SGD with the noise on the device, plain
    training, or the clipped gradient sum with the noise on the aggregate).

    The reply holds what the mechanism's :class:`mechanisms.base.ReplySpec` allows (see
    protocol/messages.py for every record). A private run's reply carries no loss, timing or
    other statistic of the device's data.
    """
    t0 = time.perf_counter()
    cfg = run_config_from(msg.content["run"])
    round_cfg = msg.content["config"]
    device_id = device_id_of(context, msg)
    server_round = int(round_cfg["server-round"])
    if "deadline" in round_cfg and time.time() > float(round_cfg["deadline"]):
        # The server stopped waiting for this round before the task started: do not train.
        raise TimeoutError(f"round {server_round} task started after the round deadline; not trained")
    state_key = f"device-{device_id}"
    state = dict(context.state.config_records[state_key]) if state_key in context.state.config_records else {}
    if rec.STAGE_KEY in round_cfg:  # one of the round's other exchanges (secure aggregation's protocol)
        reply = mechanism_for(cfg).device_stage(str(round_cfg[rec.STAGE_KEY]), round_cfg, state,
                                                _noise_source(cfg, server_round, device_id),
                                                server_round)
        _keep_state(context, state_key, state)
        return Message(RecordDict({rec.STAGE: ConfigRecord(reply)}), reply_to=msg)
    data = device_examples(cfg, device_id, server_round)
    task = task_of(cfg)
    model = model_of(cfg, task)
    # a frozen encoder's features; with --reproducible-noise each one encoded alone, a function of its
    # utterance whichever devices this process served before (an utterance two devices hold)
    warm_feature_cache(model, data, task.collate, per_utterance=cfg.reproducible_noise)
    teacher = None
    if task.pc_weight > 0 and rec.TEACHER in msg.content.array_records:
        # positive-congruent training: the previous release's logits on this device's examples
        load_into(model, msg.content[rec.TEACHER], partial=True)
        teacher = teacher_logits(model, data, task, batch_size=cfg.physical_batch_size)
    load_into(model, msg.content["arrays"], partial=True)
    noise = _noise_source(cfg, server_round, device_id)
    fault = fault_for(cfg.seed, server_round, device_id, cfg.fault_rate, cfg.fault_kind)
    mechanism = mechanism_for(cfg)
    reply = mechanism.device_part(DeviceWork(model, data, task, noise, round_cfg, device_id, server_round, teacher, t0,
                                             state=state))
    content = RecordDict()
    if mechanism.reply.info:
        content[rec.INFO] = ConfigRecord({"ray-node": _ray_node_id(), "device-id": device_id})
    if reply.privacy is not None:
        content[rec.PRIVACY] = ConfigRecord(reply.privacy)
    content[rec.ARRAYS] = record_from_state(_inject(fault, reply.arrays, cfg, round_cfg, device_id, server_round))
    if reply.metrics is not None:
        content[rec.METRICS] = MetricRecord(reply.metrics)
    if reply.clip is not None:
        content[rec.CLIP] = MetricRecord({mechanism.reply.clip: float(reply.clip)})
    return Message(content, reply_to=msg)


def holdout_examples(cfg: RunConfig, device_id: int) -> Encoded:
    """The tokenised holdout examples ``device_id`` keeps out of training (``--holdout-per-device``; cached)."""
    key = population_key(cfg)
    rows = tuple(int(r) for r in population_for_key(key).holdout_rows(device_id))
    return _encoded(key, rows, cfg.model, cfg.max_length, task_of(cfg))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Holdout evaluation: how many of this device's holdout examples the released model gets right.

    The count gets Gaussian noise of std ``holdout-noise`` (from the secret NoiseSource) here when
    the run adds its noise on the device; with the noise on the aggregate the server adds it once
    to each quartile's sum (``holdout-noise`` 0). The reply holds the count alone
    (protocol/messages.py).
    """
    from nlu.oos import confidence_edges, confidences, histogram

    cfg = run_config_from(msg.content["run"])
    device_id = device_id_of(context, msg)
    data = holdout_examples(cfg, device_id)
    bins = int(msg.content["config"].get("oos-bins", 0))
    correct, hist = 0.0, np.zeros(bins)
    if len(data):
        task = task_of(cfg)
        model = model_of(cfg, task)
        load_into(model, msg.content["arrays"], partial=True)
        if bins:  # out-of-scope calibration: the confidences' histogram on the public grid, one pass
            oos_index = population_for_key(population_key(cfg)).data.oos_index
            top, _, conf = confidences(task.probabilities(model, data), oos_index)
            labels = np.asarray(data.labels)
            correct = float((top == labels).sum())
            hist = histogram(conf[labels != (-1 if oos_index is None else oos_index)], confidence_edges(bins))  # in scope
        else:
            correct = float(np.asarray(task.evaluate(model, data, with_correct=True)["correct"]).sum())
    sigma = float(msg.content["config"]["holdout-noise"])
    if sigma > 0:
        # (with --reproducible-noise a stream of its own, not the last round's training stream)
        noise = _noise_source(cfg, -int(msg.content["config"]["server-round"]), device_id)
        correct += float(noise.normal_numpy((1,), sigma)[0])
        if bins:
            hist = hist + noise.normal_numpy((bins,), sigma)
    out = {"correct": correct}
    if bins:
        out["oos-histogram"] = [float(x) for x in hist]
    return Message(RecordDict({rec.HOLDOUT: MetricRecord(out)}), reply_to=msg)
