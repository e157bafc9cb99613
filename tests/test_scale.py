"""Round overhead and population scale: correctness only (timings live in benchmarks/round_overhead.py).

Selection over a million devices, the one-copy weight conversions (client/arrays.py), the
running mean the server folds replies into, and the device -> node assignment.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from protocol.arrays import array_view, load_into, record_from_numpy, record_from_state
from mechanisms import RoundPlan
from mechanisms.fedavg import MeanAggregator
from server.app import DeviceNodes, map_nodes_to_devices
from server.selection import ActivitySelector, poisson_cohort


def test_selection_over_a_million_devices():
    k, m = 1_000_000, 100.0
    rng = np.random.default_rng(0)
    a = rng.lognormal(3.0, 1.2, k).astype(np.int64)
    a[:1000] = 0
    sel = ActivitySelector(a, 1.0, m)
    q = sel.probabilities(a, excluded=np.arange(1000, 1010))
    assert q.shape == (k,) and q.dtype == np.float64
    assert (q[:1010] == 0).all() and (q >= 0).all() and (q <= 1).all()
    assert q.sum() == pytest.approx(m, rel=1e-3)  # ten excluded devices barely move it
    sizes = []
    for _ in range(20):
        c = poisson_cohort(q, rng)
        assert c.dtype == np.int64 and (np.diff(c) > 0).all()
        assert (c >= 1010).all() and (c < k).all()
        sizes.append(len(c))
    # Poisson-binomial: mean sum q, sd <= sqrt(sum q)
    assert abs(np.mean(sizes) - q.sum()) < 5 * np.sqrt(q.sum() / len(sizes))


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(7, 5, generator=g),
        "b": torch.randn(5, generator=g).double(),
        "ids": torch.arange(9).reshape(1, 9),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


def test_record_from_state_writes_what_flower_writes():
    sd = _state()
    ours, theirs = record_from_state(sd), ArrayRecord(sd)
    assert list(ours.keys()) == list(theirs.keys())
    for k in sd:
        assert ours[k].data == theirs[k].data and ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype
        v = array_view(theirs[k])
        assert np.array_equal(v, sd[k].numpy()) and v.dtype == sd[k].numpy().dtype


def test_load_into_copies_into_the_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    src = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    for p in src.parameters():
        torch.nn.init.normal_(p)
    ptr = model[0].weight.data_ptr()
    load_into(model, ArrayRecord(src.state_dict()))
    assert model[0].weight.data_ptr() == ptr  # same storage, values copied in
    for a, b in zip(model.state_dict().values(), src.state_dict().values()):
        assert torch.equal(a, b)
    bad = dict(src.state_dict())
    bad.pop("1.bias")
    with pytest.raises(RuntimeError):
        load_into(model, ArrayRecord(bad))


def _mean(current, replies=(), weights=()):
    agg = MeanAggregator()
    agg.begin(1, {k: v.numpy() for k, v in current.items()}, RoundPlan(1))
    for r, w in zip(replies, weights):
        agg.add(r, w)
    out = agg.result()
    return None if out is None else record_from_numpy(out)


def test_running_mean_is_fedavg():
    current = record_from_state(_state(0))
    replies = [record_from_state(_state(s)) for s in (1, 2, 3)]
    weights = [3.0, 1.0, 6.0]
    got = _mean(current, replies, weights)
    ref = aggregate_arrayrecords(
        [RecordDict({"arrays": r, "metrics": MetricRecord({"num-examples": w})}) for r, w in zip(replies, weights)],
        "num-examples",
    )
    for k in current.keys():
        g, want = got[k].numpy(), ref[k].numpy()
        if g.dtype.kind == "f":
            assert g.dtype == current[k].numpy().dtype
            np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)
        else:  # integer buffers keep the global model's values
            assert np.array_equal(g, current[k].numpy())
    assert _mean(current) is None


class _Grid:
    def __init__(self, ids):
        self.ids = ids

    def get_node_ids(self):
        return set(self.ids)


def test_devices_are_assigned_to_nodes_in_node_id_order():
    ids = [907, 12, 5501, 44]
    assert map_nodes_to_devices(_Grid(ids), 4) == {0: 12, 1: 44, 2: 907, 3: 5501}
    # fewer nodes than devices (flwr run's federation has num-supernodes): the nodes take turns
    assert map_nodes_to_devices(_Grid(ids), 6, settle=0.0) == {0: 12, 1: 44, 2: 907, 3: 5501, 4: 12, 5: 44}
    with pytest.raises(RuntimeError, match="0 of 5"):
        map_nodes_to_devices(_Grid([]), 5, timeout=0.0)
    with pytest.raises(RuntimeError, match="4 of 5"):  # a deployment that asks its nodes needs one per device
        map_nodes_to_devices(_Grid(ids), 5, timeout=0.0, query=True)


@pytest.mark.usefixtures("task_identity")
def test_a_node_serving_several_devices_trains_each_device_it_is_sent(tmp_path):
    """``flwr run .`` simulates fewer nodes than devices: each reply is the device's the server
    addressed, whichever node carried it, and every cohort member's update is accepted."""
    from inprocess import run_rounds, toy_config, write_lamp_data
    from protocol import messages as rec

    cfg = toy_config(tmp_path / "run", write_lamp_data(tmp_path), num_devices=4, cohort_size=4, rounds=2,
                     noise_at="aggregate", trainable="head", sample_rate=1.0, noise_multiplier=1.0)
    server, grid, _, outs = run_rounds(cfg, nodes=1)
    assert {m.metadata.dst_node_id for m in grid.sent} == {100}
    sent = [int(m.content[rec.DEVICE]["device-id"]) for m in grid.sent]
    for out in outs:  # the node's own partition-id is device 0, yet every addressed device's update was accepted
        assert out.cohort_size > 0 and out.replies == out.cohort_size and out.rejected == out.failures == 0
    assert sorted(set(sent)) == [0, 1, 2, 3]


@pytest.mark.usefixtures("task_identity")
def test_reproducible_noise_sums_replies_in_device_order_whatever_their_arrival(tmp_path):
    """Floating-point sums follow the order of the terms: a --reproducible-noise run folds the
    replies into the aggregate in device order, so replies that arrive in another order (Ray's
    scheduling) still give the same model bit for bit."""
    import server.app as sapp
    from inprocess import LocalGrid, toy_config, write_lamp_data

    class Reversed(LocalGrid):  # the replies come back last-sent first
        def pull_messages(self, ids):
            return list(reversed(super().pull_messages(ids)))

    cfg = toy_config(tmp_path / "run", write_lamp_data(tmp_path), num_devices=4, cohort_size=4, rounds=1,
                     dp=False, device_dp=True, noise_at="device", trainable="head", reproducible_noise=True)
    server = sapp.Server(cfg)
    grid = Reversed(cfg.num_devices)
    order = []
    add = server.aggregator.add

    def spy(arrays, weight, clip=None):
        order.append(next(d for d, content in grid.outgoing
                          if all(np.array_equal(np.asarray(arrays[k]), content["arrays"][k].numpy()) for k in arrays)))
        return add(arrays, weight, clip)

    server.aggregator.add = spy
    server.run_round(grid, 1, server.arrays, {d: n for n, d in grid.nodes.items()})
    server.ledger.close()
    assert len(order) >= 2 and order == sorted(order)



@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("noise_at", ["device", "aggregate"])
def test_reproducible_noise_releases_the_same_model_bit_for_bit_whichever_actor_serves_a_device(tmp_path, monkeypatch,
                                                                                                 noise_at):
    """A Ray actor keeps one model and one feature cache for every device it serves, and which
    actor serves which device changes from run to run. The built-in data set holds utterances
    that several devices share: the cache encodes each one alone under --reproducible-noise, so
    its features (and the model released) do not depend on which device met it first. Two runs:
    one actor serving every device, then one actor per device; the released arrays are equal."""
    import client.app as capp
    import inprocess
    from inprocess import LocalGrid, run_rounds
    from settings.config import RunConfig

    build = capp._model.__wrapped__  # the uncached constructor: one instance per emulated actor
    models, actor = {}, {"now": 0}

    def model(*args):
        if actor["now"] not in models:
            models[actor["now"]] = build(*args)
        return models[actor["now"]]

    monkeypatch.setattr(capp, "_model", model)

    class ActorGrid(LocalGrid):
        per_device = False

        def push_messages(self, messages):
            ids = []
            for m in messages:
                dev = int(m.content["device"]["device-id"]) if "device" in m.content.config_records else -1
                actor["now"] = dev if self.per_device else 0
                ids += super().push_messages([m])
            return ids

    monkeypatch.setattr(inprocess, "LocalGrid", ActorGrid)
    kw = dict(model="tiny", num_devices=6, cohort_size=3, rounds=3, max_length=32, batch_size=16, local_epochs=1,
              selection="uniform", round_timeout=30.0, trainable="head", reproducible_noise=True, seed=5)
    if noise_at == "device":
        kw.update(dp=False, device_dp=True, noise_at="device")
    released = []
    for per_device in (False, True):
        models.clear()
        capp._encoded.cache_clear()  # fresh example sets: nothing marked warmed by the other run
        ActorGrid.per_device = per_device
        cfg = RunConfig(run_dir=str(tmp_path / f"run{int(per_device)}"), **kw).validate()
        _, _, arrays, _ = run_rounds(cfg)
        released.append({k: np.asarray(v.numpy()).copy() for k, v in arrays.items()})
    assert len(models) > 1  # the second run had one actor per device
    assert released[0].keys() == released[1].keys()
    for k in released[0]:
        assert np.array_equal(released[0][k], released[1][k]), (k, np.abs(released[0][k] - released[1][k]).max())

def test_nodes_take_the_devices_in_turn_without_waiting():
    ids = [907, 12, 5501]
    m = map_nodes_to_devices(_Grid(ids), 1_000_000, nodes=3, settle=3600.0)  # no settle wait: all 3 are there
    assert isinstance(m, DeviceNodes) and len(m) == 1_000_000
    assert [m[d] for d in (0, 1, 2, 3, 999_999)] == [12, 907, 5501, 12, 12]
    assert map_nodes_to_devices(_Grid(ids), 4, nodes=3) == {0: 12, 1: 907, 2: 5501, 3: 12}
    with pytest.raises(KeyError):
        m[1_000_000]
