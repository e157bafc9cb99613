"""The in-process harness of the round-loop tests: a Flower Grid that runs the ClientApp's train
handler in this process (no Ray), the server's rounds driven on it, and a toy two-intent data set and run settings.

Used by tests/test_reliability.py, tests/test_aggregate_noise.py and tests/test_privacy_hygiene.py;
the task identity that Flower's ``Message()`` needs is set by the ``_task_identity`` fixture in
tests/conftest.py.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict

import client.app as capp
from settings.config import RunConfig
from server import app as sapp

TEXTS_ON = [f"zorblax please switch the quintarian lamp number {i} on" for i in range(12)]
TEXTS_OFF = [f"vexmoor kindly turn the heliograph unit {i} off" for i in range(12)]


def write_lamp_data(d: Path) -> Path:
    """Write the toy data set (train: TEXTS_ON labelled "on", TEXTS_OFF "off"; a two-line test split) into ``d``."""
    with open(d / "train.jsonl", "w") as fh:
        for t in TEXTS_ON:
            fh.write(json.dumps({"text": t, "label": "on"}) + "\n")
        for t in TEXTS_OFF:
            fh.write(json.dumps({"text": t, "label": "off"}) + "\n")
    with open(d / "test.jsonl", "w") as fh:
        fh.write(json.dumps({"text": "lamp on", "label": "on"}) + "\n")
        fh.write(json.dumps({"text": "lamp off", "label": "off"}) + "\n")
    return d


def lamp_device(d: Path, on: int, off: int):
    """(intent task, encoded examples of one device) for the mechanism tests: the first ``on`` "on" and
    ``off`` "off" utterances of the toy data set (written into ``d``), tiny tokenizer, max length 16."""
    from nlu.model import load_tokenizer
    from nlu.tasks import make_task

    write_lamp_data(d)
    rows = [json.loads(line) for line in open(d / "train.jsonl")]
    rows = [r for r in rows if r["label"] == "on"][:on] + [r for r in rows if r["label"] == "off"][:off]
    task = make_task("intent", 2)
    labels = {"off": 0, "on": 1}
    data = task.encode({"text": [r["text"] for r in rows], "label": [labels[r["label"]] for r in rows]},
                       load_tokenizer("tiny"), 16)
    return task, data


def state_snapshot(model) -> dict:
    """A detached copy of ``model``'s state dict (to check a mechanism left the model as it was)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def toy_config(run_dir, data_dir, **settings) -> RunConfig:
    """A validated RunConfig of a small run on the toy data (tiny model, 4 devices, cohorts of 3,
    2 rounds, uniform selection); ``settings`` override any of these."""
    base = dict(
        model="tiny", num_devices=4, cohort_size=3, rounds=2, max_length=16, run_dir=str(run_dir),
        data_dir=str(data_dir), batch_size=4, local_epochs=1, selection="uniform", round_timeout=30.0,
    )
    base.update(settings)
    return RunConfig(**base).validate()


class LocalGrid:
    """A Grid that runs the ClientApp's train handler in this process, one Context per device.

    A task whose handler sleeps (the injected "hang") never delivers its reply: it would arrive
    after the server's round deadline.
    """

    def __init__(self, num_devices: int):
        self.nodes = {100 + d: d for d in range(num_devices)}
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={"partition-id": d, "num-partitions": num_devices}, state=RecordDict(), run_config={})
            for n, d in self.nodes.items()
        }
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []
        #: (device, content) of every reply a device built (delivered or not)
        self.outgoing: list[tuple[int, RecordDict]] = []

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = uuid.uuid4().hex
            m.metadata.__dict__["_message_id"] = mid
            m.metadata.__dict__["_src_node_id"] = 1
            self.sent.append(m)
            # tasks run synchronously here, before the server starts waiting: the harness keeps
            # them from tripping the device's "started after the deadline" check
            if "deadline" in m.content["config"]:
                m.content["config"]["deadline"] = time.time() + 3600.0
            slept = []
            orig = capp.time.sleep
            capp.time.sleep = lambda s: slept.append(s)
            try:
                handler = capp.evaluate if m.metadata.message_type == "evaluate" else capp.train
                reply = handler(m, self.contexts[m.metadata.dst_node_id])
                self.outgoing.append((self.nodes[m.metadata.dst_node_id], reply.content))
            except Exception as exc:  # the ClientApp raised: Flower replies with an Error
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=m)
            finally:
                capp.time.sleep = orig
            ids.append(mid)
            if not slept:
                self.replies[mid] = reply
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def run_rounds(cfg, rounds=None, resume=False, nodes=None):
    """Run the server's rounds (from its start round to ``rounds``, else cfg.rounds) on a LocalGrid;
    ``nodes``: that many Flower nodes serve the devices in turn (default one node per device).

    Returns (server, grid, released arrays, the rounds' outcomes); the server's ledger is closed.
    """
    server = sapp.Server(cfg, resume=resume)
    grid = LocalGrid(cfg.num_devices)
    node_of = {d: n for n, d in grid.nodes.items()}
    if nodes is not None:
        node_of = {d: 100 + d % nodes for d in range(cfg.num_devices)}
    arrays = server.arrays
    outs = []
    for t in range(server.start_round, (rounds or cfg.rounds) + 1):
        arrays, out = server.run_round(grid, t, arrays, node_of)
        outs.append(out)
    if (rounds or cfg.rounds) >= cfg.rounds:
        from server.holdout import evaluate_holdout

        from server.out_of_scope import evaluate_out_of_scope

        evaluate_holdout(server, grid, node_of)
        evaluate_out_of_scope(server)
    server.ledger.close()
    return server, grid, arrays, outs
