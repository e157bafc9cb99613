"""Secure aggregation with distributed discrete noise (``--noise-at secure``, issue 25).

* SecAgg+ (mechanisms/secagg.py): the unmasked sum equals the sum of the inputs mod 2^b exactly,
  with up to the tolerated drops after masking; one more drop abandons; every masked vector is
  uniform mod 2^b whatever the device's input (chi-square over many rounds); a holder never
  reveals both secrets of one device.
* The discrete noise (dp/discrete.py): the rotation is orthogonal, conditional rounding keeps every
  example within Delta_2, Skellam noise has its variance, the zCDP event bounds Theorem 3.5 of
  Agarwal et al. 2021 at every integer order, the calibration meets the target and no more.
* A run (in-process round loop, tiny model): every exchange's message and reply holds what the
  protocol says and nothing else; the decoded sum equals the brute-force sum of the clipped
  gradients within the rounding's error; the realised noise of the sum is at least sigma C; a round
  with one drop more than tolerated is abandoned (model kept, events in the ledger); the ledger's
  epsilon equals dp-accounting's RDP accountant on the recorded events.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import client.app as capp
from dp import discrete
from dp.accounting import INTEGER_RDP_ORDERS, compute_epsilon
from dp.secure_random import NoiseSource
from inprocess import run_rounds, toy_config, write_lamp_data
from mechanisms import secagg, secure
from rundir import LedgerReader
from settings.config import ConfigError, RunConfig

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower's Message() in-process (tests/conftest.py)
DELTA = 1e-5


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_lamp_data(tmp_path_factory.mktemp("securedata"))


# ---------------------------------------------------------------------------------- SecAgg+
def _protocol(n, dim, bits, neighbours, tolerance, inputs, drop_after_shares=(), silent_at_unmask=(), round_=3):
    """Run the four steps for ``n`` devices in-process; return (unmasked sum, masked vectors)."""
    noise = NoiseSource()
    sec = [secagg.DeviceSecrets.new(noise) for _ in range(n)]
    pubs = [s.public_keys() for s in sec]
    enc = {i: p[0] for i, p in enumerate(pubs)}
    mk = {i: p[1] for i, p in enumerate(pubs)}
    tolerated = int(math.floor(tolerance * n))
    k = secagg.ring_degree(n, neighbours, tolerated)
    sets = {i: secagg.share_set(i, n, k) for i in range(n)}
    t = {i: secagg.threshold(len(sets[i]), tolerated) for i in range(n)}
    cts = {u: secagg.encrypt_shares(sec[u], u, enc, sets[u], t[u], round_, noise) for u in range(n)}
    survivors = [u for u in range(n) if u not in drop_after_shares]
    masked = {u: secagg.masked_input(inputs[u], sec[u], u, {v: mk[v] for v in sets[u] if v != u}, round_, bits)
              for u in survivors}
    inbox = {v: {u: cts[u][v] for u in range(n) if v in cts[u]} for v in range(n)}
    revealed = {v: secagg.reveal(sec[v], v, inbox[v], enc, set(survivors), set(drop_after_shares), round_)
                for v in survivors if v not in silent_at_unmask}
    total = np.zeros(dim, dtype=np.int64)
    for y in masked.values():
        total = (total + y.astype(np.int64)) & ((1 << bits) - 1)
    out = secagg.unmask(total, set(survivors), revealed, mk, sets, t, set(drop_after_shares), round_, bits)
    return out, masked


@pytest.mark.parametrize("neighbours", [None, 4])
def test_unmasked_sum_equals_the_sum_of_the_inputs_with_tolerated_drops(neighbours):
    n, dim, bits = 9, 257, 20
    rng = np.random.default_rng(0)
    inputs = [rng.integers(0, 1 << bits, dim).astype(np.uint32) for _ in range(n)]
    # tolerance 0.25 of 9: 2 drops; share sets of 9 (SecAgg) or of 5 (ring, k = 4 = 2 x 2) tolerate 2 missing holders
    drops = (2, 6)
    for dropped in [(), drops]:
        out, _ = _protocol(n, dim, bits, neighbours, 0.25, inputs, drop_after_shares=dropped)
        want = sum(inputs[u].astype(np.int64) for u in range(n) if u not in dropped) & ((1 << bits) - 1)
        np.testing.assert_array_equal(out, want.astype(np.uint32))
    # one missing holder more than tolerated: the sum cannot be unmasked
    with pytest.raises(secagg.Abandoned):
        _protocol(n, dim, bits, neighbours, 0.25, inputs, drop_after_shares=drops, silent_at_unmask=(3,))


def test_the_ring_is_wide_enough_that_tolerated_drops_never_split_the_survivors():
    """SecAgg+'s ring degree is raised to twice the tolerated drops: removing any of that many positions leaves the
    survivors connected (so the server can unmask only the sum of all of them), and every share set keeps a
    threshold above both half the set and the tolerated drops."""
    from itertools import combinations

    n, tolerated = 14, 3
    k = secagg.ring_degree(n, 2, tolerated)
    assert k == 6
    assert secagg.ring_degree(n, 2, 7) is None  # as wide as every device: SecAgg
    for gone in combinations(range(n), tolerated):
        assert secagg.connected(set(range(n)) - set(gone), n, k)
    # a ring of degree 2 with 3 drops would split: the check the server makes before unmasking
    assert not secagg.connected(set(range(n)) - {0, 5}, n, 2)
    size = len(secagg.share_set(0, n, k))
    t = secagg.threshold(size, tolerated)
    assert t == size - tolerated and t > size // 2 and t > tolerated
    with pytest.raises(ValueError, match="dropout-tolerance"):
        secagg.threshold(5, 3)


def test_masked_vectors_are_uniform_whatever_the_input():
    """The first device's masked vector, over many fresh rounds, is uniform mod 2^b for an all-zero and an
    all-maximal input alike (chi-square over 256 values, bits = 8)."""
    from scipy.stats import chisquare

    n, dim, bits = 3, 64, 8
    for value in (0, (1 << bits) - 1):
        inputs = [np.full(dim, value, dtype=np.uint32)] + [np.zeros(dim, dtype=np.uint32)] * (n - 1)
        seen = np.concatenate([_protocol(n, dim, bits, None, 0.0, inputs, round_=r)[1][0] for r in range(60)])
        counts = np.bincount(seen.astype(np.int64), minlength=1 << bits)
        assert chisquare(counts).pvalue > 1e-3, value


def test_a_holder_never_reveals_both_secrets_of_one_device():
    noise = NoiseSource()
    sec = [secagg.DeviceSecrets.new(noise) for _ in range(2)]
    enc = {i: s.public_keys()[0] for i, s in enumerate(sec)}
    cts = secagg.encrypt_shares(sec[0], 0, enc, (0, 1), 2, 1, noise)
    with pytest.raises(ValueError, match="both survivors and dropped"):
        secagg.reveal(sec[1], 1, {0: cts[1]}, enc, {0}, {0}, 1)
    # and a ciphertext for another holder does not decrypt
    with pytest.raises(Exception):
        secagg.reveal(sec[1], 1, {0: cts[0]}, enc, {0}, set(), 1)


# ---------------------------------------------------------------------------------- the discrete noise
def test_rotation_is_orthogonal_and_rounding_keeps_the_bound():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(5, 300)))
    signs = discrete.rotation_signs(b"s" * 32, discrete.padded_dimension(300))
    y = discrete.rotate(x, signs)
    assert y.shape == (5, 512)
    torch.testing.assert_close(torch.linalg.vector_norm(y, dim=1), torch.linalg.vector_norm(x, dim=1))
    torch.testing.assert_close(discrete.unrotate(y, signs, 300), x)
    scaled = y / torch.linalg.vector_norm(y, dim=1, keepdim=True) * 40.0  # norm exactly gamma C = 40
    bound = discrete.rounded_l2_bound(40.0, 512)
    r = discrete.conditional_round(scaled, bound, NoiseSource())
    assert (torch.linalg.vector_norm(r.to(torch.float64), dim=1) <= bound).all()
    assert (r.to(torch.float64) - scaled).abs().max() < 1.0  # each coordinate rounded to a neighbour


def test_skellam_noise_has_its_variance_and_sums_are_skellam():
    v = 37.5
    z = discrete.skellam((200_000,), v, NoiseSource())
    assert z.dtype == np.int64
    assert abs(z.mean()) < 0.1
    assert z.var() == pytest.approx(v, rel=0.02)
    # four shares of v / 4: the sum has variance v
    s = sum(discrete.skellam((200_000,), v / 4, NoiseSource()) for _ in range(4))
    assert s.var() == pytest.approx(v, rel=0.02)


@pytest.mark.parametrize("l2, mu", [(1000.0, 4e6), (30.0, 900.0), (3.0, 20.0)])
def test_the_zcdp_event_bounds_theorem_3_5_at_every_integer_order(l2, mu):
    l1 = l2 * l2
    ev = discrete.skellam_event(l2, l1, mu)
    for a in range(2, 300):
        assert discrete.skellam_rdp(a, l2, l1, mu) <= ev.xi + ev.rho * a + 1e-12
    # the first branch of the theorem is exactly xi + rho alpha
    a = 7
    assert ev.xi + ev.rho * a == pytest.approx(a * l2 ** 2 / (2 * mu) + ((2 * a - 1) * l2 ** 2 + 6 * l1) / (4 * mu ** 2))


def test_secure_epsilon_is_dp_accountings_rdp_at_integer_orders_and_calibration_is_tight():
    from dp_accounting.rdp import rdp_privacy_accountant

    sigma, rounds = 2.0, 12
    ev = secure.secure_event(sigma)
    acc = rdp_privacy_accountant.RdpAccountant(list(INTEGER_RDP_ORDERS))
    acc.compose(ev, rounds)
    ref = acc.get_epsilon(DELTA)
    for accountant in ("pld", "rdp"):  # a history with a zCDP event is composed at integer orders either way
        assert compute_epsilon([ev] * rounds, DELTA, accountant) == pytest.approx(ref, rel=1e-9)
    target = 3.0
    s = secure.calibrate_secure_noise(target, DELTA, 20)
    assert compute_epsilon([secure.secure_event(s)] * 20, DELTA, "rdp") <= target
    assert compute_epsilon([secure.secure_event(0.99 * s)] * 20, DELTA, "rdp") > target


def test_scale_fits_the_modulus_and_refuses_too_few_bits():
    gamma = discrete.choose_scale(1.0, 1 << 15, 1000, 5.0, 20)
    l2 = discrete.rounded_l2_bound(gamma, 1 << 15)
    assert 4 * math.sqrt((gamma * 1000) ** 2 / (1 << 15) + (5.0 * l2) ** 2) <= 2 ** 19 * (1 + 1e-9)
    with pytest.raises(ValueError, match="raise --secure-bits"):
        discrete.choose_scale(1.0, 1 << 25, 10 ** 6, 5.0, 8)


# ---------------------------------------------------------------------------------- runs
def _cfg(tmp_path, data_dir, **kw):
    base = dict(noise_at="secure", trainable="head", num_devices=6, cohort_size=6, rounds=2, noise_multiplier=0.5)
    base.update(kw)
    return toy_config(tmp_path / "run", data_dir, **base)


def test_every_exchange_holds_what_the_protocol_says(tmp_path, data_dir):
    cfg = _cfg(tmp_path, data_dir)
    server, grid, _, outs = run_rounds(cfg)
    assert [o.replies for o in outs] == [6, 6]
    stages = [m.content["config"].get("stage", "train") for m in grid.sent]
    assert stages == (["keys"] * 6 + ["shares"] * 6 + ["train"] * 6 + ["unmask"] * 6) * 2
    dim = discrete.padded_dimension(sum(int(np.prod(s)) for s, _ in server.expected.values()))
    allowed = {"keys": {"secagg-enc-key", "secagg-mask-key"}, "shares": {"secagg-to", "secagg-ciphertexts"},
               "unmask": {"secagg-owners", "secagg-shares"}}
    for m, (_, reply) in zip(grid.sent, grid.outgoing):
        stage = m.content["config"].get("stage", "train")
        if stage == "train":  # the masked vector alone
            assert set(reply.keys()) == {"arrays"}
            arrays = reply["arrays"]
            assert list(arrays.keys()) == ["masked"]
            a = arrays["masked"].numpy()
            assert a.dtype == np.uint32 and a.shape == (dim,) and int(a.max()) < (1 << cfg.secure_bits)
        else:
            assert set(reply.keys()) == {"stage"}
            assert set(reply["stage"].keys()) == allowed[stage]
    # the node state keeps no secret once the round is over
    assert all(not c.state.config_records for c in grid.contexts.values())


def test_decoded_sum_is_the_clipped_gradient_sum_plus_noise_of_at_least_sigma_C(tmp_path, data_dir, monkeypatch):
    """With the noise of the devices recorded, the decoded sum minus that noise (decoded alike) equals the
    brute-force float sum of the clipped per-example gradients within the rounding's error; the noise's
    per-coordinate std in gradient units is at least sigma C."""
    cfg = _cfg(tmp_path, data_dir, rounds=1, secure_bits=32, noise_multiplier=0.3)
    seen = {}
    orig_unmask, orig_skellam = secagg.unmask, discrete.skellam
    noises = []

    def skellam(shape, variance, noise):
        z = orig_skellam(shape, variance, noise)
        noises.append(z)
        return z

    monkeypatch.setattr(discrete, "skellam", skellam)

    def unmask(*a, **k):
        out = orig_unmask(*a, **k)
        seen["sum"] = out
        return out

    monkeypatch.setattr(secagg, "unmask", unmask)
    server, grid, _, outs = run_rounds(cfg)
    agg = server.aggregator
    assert outs[0].replies == 6 and len(noises) == 6
    bits = cfg.secure_bits
    noise_int = sum(noises)
    signal_int = discrete.centred(seen["sum"].astype(np.int64) - noise_int, bits)
    # the clipped gradient sum, brute force, at the round's global model
    from mechanisms.aggregate import clipped_gradient_sum

    model = capp.model_of(cfg, capp.task_of(cfg))
    capp.load_into(model, grid.sent[12].content["arrays"], partial=True)  # the round's global model
    ref = torch.zeros(agg.d, dtype=torch.float64)
    for m in grid.sent[12:18]:
        d = int(m.content["device"]["device-id"])
        data = capp.device_examples(cfg, d, 1)
        s = clipped_gradient_sum(model, data, sample_rate=1.0, max_grad_norm=cfg.max_grad_norm, physical_batch_size=1,
                                 noise=NoiseSource(), task=capp.task_of(cfg))
        ref += torch.cat([s[k].reshape(-1).to(torch.float64) for k in agg.keys])
    signs = discrete.rotation_signs(agg.rotation, agg.dim)
    decoded = discrete.unrotate(torch.from_numpy(signal_int.astype(np.float64) / agg.gamma)[None], signs, agg.d)[0]
    examples = sum(len(capp.device_examples(cfg, int(m.content["device"]["device-id"]), 1)) for m in grid.sent[12:18])
    # each example's rounding moves each coordinate by < 1 integer unit (plus the float32 engine's error)
    float32 = 1e-6 * ref.norm().item()
    assert (decoded - ref).abs().max().item() < examples / agg.gamma + float32
    assert (decoded - ref).norm().item() < math.sqrt(examples * agg.dim) / agg.gamma + float32
    assert ref.norm().item() > 100 * float32
    # the noise: Skellam with variance >= mu = (sigma Delta_2)^2 per coordinate, i.e. >= (sigma C)^2 decoded
    std = float(np.std(noise_int.astype(np.float64))) / agg.gamma
    assert std >= 0.97 * cfg.noise_multiplier * cfg.max_grad_norm
    assert agg.variance / agg.n_min * 6 >= (cfg.noise_multiplier * agg.l2) ** 2


def test_a_round_with_more_drops_than_tolerated_is_abandoned_and_accounted(tmp_path, data_dir, monkeypatch):
    """Devices that fail after training (their masked input never arrives): within the tolerance the round
    is released; one more and nothing is released, the model stays and the events stay in the ledger."""
    failing = {1}
    orig = capp.fault_for
    monkeypatch.setattr(capp, "fault_for", lambda seed, r, d, rate, kind: "raise" if d in failing else orig(seed, r, d, rate, kind))
    cfg = _cfg(tmp_path, data_dir, rounds=1, dropout_tolerance=0.2)  # 6 devices: 1 may drop
    server, grid, arrays, outs = run_rounds(cfg)
    assert outs[0].replies == 5
    before = {k: v.numpy() for k, v in server.arrays.items()}
    assert any(not np.array_equal(before[k], arrays[k].numpy()) for k in before)  # released
    failing.add(4)
    cfg2 = _cfg(tmp_path / "b", data_dir, rounds=1, dropout_tolerance=0.2)
    server, grid, arrays, outs = run_rounds(cfg2)
    assert outs[0].replies == 4
    after = {k: v.numpy() for k, v in arrays.items()}
    assert all(np.array_equal(before_v, after[k]) for k, before_v in {k: v.numpy() for k, v in server.arrays.items()}.items())
    assert "unmask" not in [m.content["config"].get("stage") for m in grid.sent]
    with LedgerReader(Path(cfg2.run_dir) / "ledger.sqlite") as ledger:
        assert len(ledger.events_by_device("example")) == 6  # the whole cohort stays charged
        lost = {(u.device_id, u.reason) for u in ledger.lost_updates()}
    assert lost == {(1, "error"), (4, "error")} | {(d, "abandoned") for d in (0, 2, 3, 5)}


def test_a_secagg_plus_round_with_a_tolerated_drop_is_released(tmp_path, data_dir, monkeypatch):
    """The ring (SecAgg+, k = 2 asked, raised to 2 x floor(0.2 x 6) = 2) with one device failing after training."""
    orig = capp.fault_for
    monkeypatch.setattr(capp, "fault_for", lambda seed, r, d, rate, kind: "raise" if d == 3 else orig(seed, r, d, rate, kind))
    cfg = _cfg(tmp_path, data_dir, rounds=1, dropout_tolerance=0.2, secagg_neighbours=2)
    server, grid, arrays, outs = run_rounds(cfg)
    assert outs[0].replies == 5 and not outs[0].extra["secure_abandoned"]
    shares = [m for m in grid.sent if m.content["config"].get("stage") == "shares"]
    assert {len(m.content["config"]["secagg-holders"]) for m in shares} == {3}  # itself and one neighbour each side
    assert any(not np.array_equal(v.numpy(), arrays[k].numpy()) for k, v in server.arrays.items())


def test_ledger_epsilon_is_dp_accountings_on_the_recorded_events(tmp_path, data_dir):
    cfg = _cfg(tmp_path, data_dir, rounds=3, num_devices=6, cohort_size=3, noise_multiplier=1.5)
    server, grid, _, _ = run_rounds(cfg)
    with LedgerReader(Path(cfg.run_dir) / "ledger.sqlite") as ledger:
        eps = ledger.device_epsilons("example")
        by_device = ledger.events_by_device("example")
    assert by_device
    from dp_accounting.rdp import rdp_privacy_accountant

    for d, evs in by_device.items():
        acc = rdp_privacy_accountant.RdpAccountant(list(INTEGER_RDP_ORDERS))
        acc.compose(secure.secure_event(1.5), len(evs))
        assert eps[d] == pytest.approx(acc.get_epsilon(server.delta), rel=1e-6)


@pytest.mark.parametrize("settings, flag", [
    (dict(sample_rate=0.5), "--sample-rate"), (dict(device_dp=True), "--noise-at"),
    (dict(reproducible_noise=True), "--reproducible-noise"), (dict(dropout_tolerance=0.5), "--dropout-tolerance"),
    (dict(secure_bits=40), "--secure-bits"), (dict(secagg_neighbours=3), "--secagg-neighbours"),
    (dict(dp=False), "--noise-at"),
])
def test_settings_secure_aggregation_cannot_take_are_refused(settings, flag):
    with pytest.raises(ConfigError, match=flag):
        RunConfig(noise_at="secure", **settings).validate()
