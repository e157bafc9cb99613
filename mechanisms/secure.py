"""Noise added on the devices, summed under secure aggregation (``--noise-at secure``): no trusted server.

Each selected device clips each of its examples' gradients to C (per example, as
:mod:`mechanisms.aggregate`), rotates, scales and rounds each clipped gradient to an integer vector
of L2 norm at most Delta_2 (conditional randomised rounding), sums them, adds its share of Skellam
noise, mu / n_min per coordinate, and masks the result with secure aggregation (SecAgg+,
:mod:`mechanisms.secagg`); the server learns only the sum over the surviving devices mod 2^b,
which it decodes into the noisy sum of the clipped gradients and steps as the aggregate placement
does (:mod:`dp.discrete` for the maths and its sources).

A round is five exchanges: **keys**, **shares** (before training), the training message whose reply
is the masked vector, and **unmask** (after). n is the round's cohort; the noise is sized for
n_min = n - floor(f n) contributors (f: ``--dropout-tolerance``); a round in which fewer than n_min
devices get their masked input in, or too few shares come back to unmask, is abandoned: nothing is
released, and its events (committed before any message left) stay in the ledger.

Privacy: with at least n_min survivors the sum carries Skellam noise of variance >= mu = (sigma Delta_2)^2
per coordinate, so each round a device takes part in is, for one of its examples, the Skellam
mechanism of L2 sensitivity Delta_2 (:func:`dp.discrete.skellam_event`, Agarwal et al. 2021,
Theorem 3.5), accounted per example over the rounds its device joined (no amplification by
example sampling: p must be 1). The event is computed at Delta_2 = :data:`MIN_SCALED_CLIP`, below any round's
Delta_2, where the bound is largest, so the ledger's events are the same whatever each round's scale. Trust: the server sees only masked vectors and the masked sum; the guarantee
holds against the server and any devices it colludes with as long as the devices that drop out or
collude number at most floor(f n) (colluders know their own noise shares; with SecAgg+'s ring the
degree is raised to 2 floor(f n) so that they can never split the survivors, :func:`mechanisms.secagg.ring_degree`);
devices and server are assumed to follow the protocol (honest-but-curious). A device keeps its
round's secrets in its node's state until it answers the unmask (or, when the round ended before,
until its next round's keys exchange; a round's secrets are never used in another round).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from typing import Mapping

import numpy as np
import torch

from dp import discrete
from dp.accounting import compute_epsilon
from dp.secure_random import NoiseSource
from mechanisms import secagg
from mechanisms.aggregate import AggregateNoise, AggregateNoiseAggregator
from mechanisms.base import Calibration, DeviceReply, DeviceWork, ReplySpec, floating_keys, joinable_rounds
from mechanisms.registry import register
from mechanisms.training import clipping_engine
from nlu.model import trainable_state_keys

log = logging.getLogger(__name__)

#: The smallest scaled clip gamma C a round may use (integer units); the events are computed at
#: Delta_2 = this value (below the rounding bound of any scale a round uses), where rho and xi are
#: largest: an upper bound on the privacy loss of any round.
MIN_SCALED_CLIP = 100.0
#: The key of the masked vector in a reply's arrays.
MASKED = "masked"
#: The round's exchanges before and after the training message.
STAGES_BEFORE = ("keys", "shares")
STAGES_AFTER = ("unmask",)


def secure_event(noise_multiplier: float):
    """The example-level event of one round joined: :func:`dp.discrete.skellam_event` at Delta_2 =
    :data:`MIN_SCALED_CLIP`, Delta_1 = Delta_2^2, mu = (sigma Delta_2)^2: rho = 1/(2 sigma^2) + 1/(2 sigma^4 Delta_2^2)
    and xi <= 5/(4 sigma^4 Delta_2^2) fall as Delta_2 grows, so this bounds every round (whose Delta_2 is larger).

    Raises
    ------
    ValueError
        If ``noise_multiplier`` is not > 0.
    """
    if not noise_multiplier > 0:
        raise ValueError(f"secure aggregation needs noise: noise_multiplier {noise_multiplier!r} must be > 0")
    l2 = MIN_SCALED_CLIP  # rho and xi fall as Delta_2 grows at fixed sigma: the smallest is the worst case
    return discrete.skellam_event(l2, l2 * l2, (noise_multiplier * l2) ** 2)


def calibrate_secure_noise(target: float, delta: float, rounds: int) -> float:
    """The smallest sigma (to 0.1 %) whose ``rounds`` Skellam events compose to at most ``target`` epsilon at ``delta``.

    Raises
    ------
    ValueError
        If even sigma = 1000 does not reach the target (the message names the settings to change).
    """
    def eps(s: float) -> float:
        return compute_epsilon([secure_event(s)] * rounds, delta, "rdp")

    lo, hi = 0.05, 1000.0
    if eps(hi) > target:
        raise ValueError(f"--target-epsilon {target:g} is unreachable over {rounds} rounds at delta {delta:g}: "
                         "raise --target-epsilon or lower --rounds")
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if eps(mid) <= target else (mid, hi)
    return hi


def _server_cpu(method):
    """Add the process CPU seconds ``method`` takes to the aggregator's round total (``secure_server_cpu_seconds``)."""
    @functools.wraps(method)
    def timed(self, *args, **kwargs):
        t0 = time.process_time()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.cpu_seconds += time.process_time() - t0
    return timed


def _payload_bytes(entries: Mapping) -> int:
    """Bytes of a record's values (bytes and lists of bytes as they are, numbers 8 each, strings UTF-8)."""
    total = 0
    for v in entries.values():
        for x in (v if isinstance(v, list) else [v]):
            total += len(x) if isinstance(x, (bytes, bytearray)) else len(x.encode()) if isinstance(x, str) else 8
    return total


class SecureAggregator(AggregateNoiseAggregator):
    """The server side: runs the round's SecAgg+ exchanges, then decodes the unmasked sum.

    The decoded sum s (float64, the cohort's clipped gradients plus the devices' noise) is stepped
    as :class:`mechanisms.aggregate.AggregateNoiseAggregator` steps its noisy sum:
    ``w - step_size * lr_factor * s / E[n]``. :meth:`result` is None (keep the model) when the round
    is abandoned.

    Parameters
    ----------
    cfg : settings.config.RunConfig
        ``noise_multiplier`` sigma, ``max_grad_norm`` C, ``secure_bits`` b, ``dropout_tolerance`` f,
        ``secagg_neighbours`` k.
    step_size : float
    noise : dp.secure_random.NoiseSource
        The server's secure source (the rotation's public seed; the ring order of the devices).
    """

    name = "secure-aggregation"
    stages_before = STAGES_BEFORE
    stages_after = STAGES_AFTER

    def __init__(self, cfg, step_size: float, noise: NoiseSource):
        super().__init__(float(cfg.noise_multiplier), float(cfg.max_grad_norm), step_size, noise)
        self.cfg = cfg
        self.bits = int(cfg.secure_bits)
        self.cpu_seconds = 0.0

    # ------------------------------------------------------------------ round set-up
    def begin(self, round_, current, plan):
        self.cpu_seconds = 0.0
        self._begin(round_, current, plan)

    @_server_cpu
    def _begin(self, round_, current, plan):
        super().begin(round_, current, plan)
        cfg = self.cfg
        self.keys = floating_keys(current)
        self.shapes = {k: current[k].shape for k in self.keys}
        self.d = int(sum(int(np.prod(current[k].shape)) for k in self.keys))
        self.dim = discrete.padded_dimension(self.d)
        self.cohort = [int(x) for x in plan.cohort]
        n = len(self.cohort)
        self.tolerated = int(math.floor(cfg.dropout_tolerance * n))  # drops (or colluders) the noise is sized for
        self.n_min = n - self.tolerated
        self.abandoned: str | None = None if n >= 1 else "empty cohort"
        try:
            self.gamma = discrete.choose_scale(cfg.max_grad_norm, self.dim, max(plan.cohort_examples, 1.0),
                                               self.noise_multiplier, self.bits, noise_inflation=n / max(self.n_min, 1))
        except ValueError:
            self.gamma = 0.0
        if self.gamma * cfg.max_grad_norm < MIN_SCALED_CLIP:  # before any message: nothing is computed or sent
            self.gamma = MIN_SCALED_CLIP / cfg.max_grad_norm
            self._abandon(
                f"--secure-bits {self.bits} is too few for the {plan.cohort_examples:.0f} examples of this cohort in "
                f"{self.dim} coordinates (the scaled clip would be below {MIN_SCALED_CLIP:.0f} integer units): raise "
                "--secure-bits (at most 32) or lower --cohort-size")
        self.l2 = discrete.rounded_l2_bound(self.gamma * cfg.max_grad_norm, self.dim)
        self.variance = (self.noise_multiplier * self.l2) ** 2  # mu, in the sum of >= n_min devices
        self.rotation = self.noise.bytes(32)  # public: sent to every device of the round
        self.positions: dict[int, int] = {}  # device -> position (the order its keys arrived in)
        self.enc_keys: list[bytes] = []  # by position
        self.mask_keys: list[bytes] = []  # by position
        self.ciphertexts: dict[int, dict[int, bytes]] = {}  # owner -> holder -> ciphertext
        self.masked_total = np.zeros(self.dim, dtype=np.int64)
        self.survivors: set[int] = set()
        self.revealed: dict[int, dict[int, bytes]] = {}
        self.bytes_up = 0  # bytes the devices sent (stage replies and masked vectors)
        self.near_wrap: int | None = None  # decoded coordinates near the edge of the range (None: nothing decoded)
        self.trained: set[int] = set()  # devices sent the training message

    def lost_updates(self) -> list[tuple[int, str, str]]:
        """The cohort's devices that left the protocol before training, and, in an abandoned round, those whose
        masked input arrived (nothing of the round was released)."""
        out = [(d, "dropped", "left secure aggregation before training (keys or shares missing)")
               for d in self.cohort if d not in self.trained and self.abandoned is None]
        if self.abandoned is not None:
            out += [(d, "abandoned", f"secure aggregation abandoned: {self.abandoned}") for d in sorted(self.survivors)]
        return out

    def round_stats(self) -> dict:
        """``secure_*`` entries of the round's metrics line: bytes sent per device (mean over the cohort, all
        exchanges), the server's CPU seconds in the protocol and decoding, whether the round was abandoned
        (all functions of the cohort's size and the model's, not of the devices' data)."""
        n = max(len(self.cohort), 1)
        return {"secure_bytes_per_device": self.bytes_up / n, "secure_server_cpu_seconds": round(self.cpu_seconds, 4),
                "secure_abandoned": self.abandoned is not None, "secure_bits": self.bits,
                "secure_parameters": self.d, "secure_dimension": self.dim,
                "secure_coordinates_near_wrap": self.near_wrap}

    def _abandon(self, why: str) -> None:
        if self.abandoned is None:
            self.abandoned = why
            log.warning("round %d: secure aggregation abandoned (%s); nothing is released, the round stays accounted",
                        self.round, why)

    def _check_count(self, stage: str, count: int) -> None:
        if count < self.n_min:
            self._abandon(f"{count} devices answered {stage}, fewer than the {self.n_min} the noise is sized for "
                          f"(--dropout-tolerance {self.cfg.dropout_tolerance:g} of a cohort of {len(self.cohort)})")

    def _degree(self) -> int | None:
        """The ring's degree over this round's key holders (None: SecAgg, every device)."""
        return secagg.ring_degree(len(self.positions), self.cfg.secagg_neighbours, self.tolerated)

    def _set(self, position: int) -> tuple[int, ...]:
        return secagg.share_set(position, len(self.positions), self._degree())

    # ------------------------------------------------------------------ the exchanges
    @_server_cpu
    def stage_requests(self, stage: str) -> dict[int, dict]:
        """Device -> the config entries of its message in exchange ``stage`` (none once the round is abandoned)."""
        if self.abandoned is not None:
            return {}
        if stage == "keys":
            return {d: {} for d in self.cohort}
        if stage == "shares":
            self._check_count("keys", len(self.enc_keys))
            if self.abandoned is not None:
                return {}
            out = {}
            for d, p in self.positions.items():
                holders = self._set(p)
                out[d] = {"secagg-position": p, "secagg-holders": list(holders),
                          "secagg-enc-keys": [self.enc_keys[h] for h in holders],
                          "secagg-threshold": secagg.threshold(len(holders), self.tolerated)}
            return out
        if stage == "unmask":
            self._check_count("the masked input", len(self.survivors))
            if self.abandoned is not None:
                return {}
            alive = [self.positions[d] for d in self.survivors]
            dropped = sorted(set(self.ciphertexts) - set(alive))
            out = {}
            for d in self.survivors:
                v = self.positions[d]
                owners = [u for u, cts in self.ciphertexts.items() if v in cts]  # every sender is alive or dropped
                out[d] = {"secagg-position": v, "secagg-survivors": alive, "secagg-dropped": dropped or [-1],
                          "secagg-owners": owners, "secagg-ciphertexts": [self.ciphertexts[u][v] for u in owners],
                          "secagg-enc-keys": [self.enc_keys[u] for u in owners]}
            return out
        raise ValueError(f"unknown secure aggregation stage {stage!r}")

    @_server_cpu
    def stage_reply(self, stage: str, device: int, reply: Mapping | None) -> str | None:
        """Fold in device ``device``'s reply to ``stage`` (None: it failed or timed out); why it is rejected, or None."""
        if reply is None or self.abandoned is not None:
            return None
        self.bytes_up += _payload_bytes(reply)
        try:
            if stage == "keys":
                enc, mask = bytes(reply["secagg-enc-key"]), bytes(reply["secagg-mask-key"])
                if len(enc) != 32 or len(mask) != 32:
                    return "public keys are 32 bytes"
                self.positions[device] = len(self.enc_keys)
                self.enc_keys.append(enc)
                self.mask_keys.append(mask)
            elif stage == "shares":
                p = self.positions[device]
                to, cts = list(reply["secagg-to"]), list(reply["secagg-ciphertexts"])
                if sorted(to) != list(self._set(p)) or len(cts) != len(to):
                    return "ciphertexts for other holders than the device's share set"
                self.ciphertexts[p] = {int(v): bytes(c) for v, c in zip(to, cts)}
            elif stage == "unmask":
                owners, shares = list(reply["secagg-owners"]), list(reply["secagg-shares"])
                if len(owners) != len(shares) or any(len(bytes(s)) != 36 for s in shares):
                    return "malformed shares"
                self.revealed[self.positions[device]] = {int(u): bytes(s) for u, s in zip(owners, shares)}
        except (KeyError, TypeError, ValueError) as exc:
            return f"malformed {stage} reply ({exc})"
        return None

    @_server_cpu
    def train_entries(self, device: int) -> dict | None:
        """The training message's entries for ``device`` (None: it gets none, it left the protocol)."""
        if self.abandoned is not None:
            return None
        if device not in self.positions or self.positions[device] not in self.ciphertexts:
            return None
        self._check_count("shares", len(self.ciphertexts))
        if self.abandoned is not None:
            return None
        self.trained.add(device)
        p = self.positions[device]
        neighbours = [v for v in self._set(p) if v != p and v in self.ciphertexts]
        return {"secagg-position": p, "secagg-neighbours": neighbours or [-1],
                "secagg-mask-keys": [self.mask_keys[v] for v in neighbours] or [b""],
                "secure-scale": self.gamma, "secure-bound": self.l2, "secure-bits": self.bits,
                "secure-variance": self.variance / self.n_min, "secure-dimension": self.dim,
                "secure-rotation": self.rotation}

    @_server_cpu
    def add_reply(self, device: int, arrays: Mapping[str, np.ndarray], weight: float, clip: float | None = None) -> None:
        """Fold in ``device``'s masked vector (uint32 [D], shape checked by the round loop; taken mod 2^b)."""
        if self.abandoned is not None:
            return
        y = np.asarray(arrays[MASKED], dtype=np.int64)
        self.bytes_up += 4 * int(y.size)
        self.masked_total = (self.masked_total + y) & ((1 << self.bits) - 1)
        self.survivors.add(int(device))
        self.replies += 1

    # ------------------------------------------------------------------ the release
    def noisy_sum(self) -> dict[str, np.ndarray]:
        """The decoded sum {key: float64 array}: unmask, centre mod 2^b, divide by gamma, rotate back.

        Raises
        ------
        mechanisms.secagg.Abandoned
            If too few shares came back.
        """
        masks = {p: self.mask_keys[p] for p in self.ciphertexts}
        sets = {p: self._set(p) for p in self.ciphertexts}
        t = {p: secagg.threshold(len(s), self.tolerated) for p, s in sets.items()}
        alive = {self.positions[d] for d in self.survivors}
        dropped = set(self.ciphertexts) - alive
        if not secagg.connected(alive, len(self.positions), self._degree()):  # (k >= 2 x tolerated prevents it)
            raise secagg.Abandoned("the survivors do not form one connected piece of the mask graph")
        total = secagg.unmask(self.masked_total, alive, self.revealed, masks, sets, t, dropped, self.round, self.bits)
        centred = discrete.centred(total, self.bits)
        # a coordinate within an eighth of the range's edge may have wrapped around (decoded 2^b / gamma off)
        self.near_wrap = int((np.abs(centred) >= 0.875 * 2.0 ** (self.bits - 1)).sum())
        ints = centred.astype(np.float64) / self.gamma
        flat = discrete.unrotate(torch.from_numpy(ints)[None, :], discrete.rotation_signs(self.rotation, self.dim),
                                 self.d)[0].numpy()
        out, at = {}, 0
        for k in self.keys:
            size = int(np.prod(self.shapes[k]))
            out[k] = flat[at:at + size].reshape(self.shapes[k])
            at += size
        return out

    def noisy_gradient(self) -> dict[str, np.ndarray]:
        """The decoded sum over E[n] (float64), per floating array: the aggregate placement's step follows."""
        denom = max(float(self.plan.expected_examples), 1e-12)
        return {k: s / denom for k, s in self.decoded.items()}

    @_server_cpu
    def result(self):
        if self.abandoned is None:
            try:
                self.decoded = self.noisy_sum()
            except secagg.Abandoned as exc:
                self._abandon(str(exc))
        return None if self.abandoned is not None else super().result()


@register
class SecureAggregation(AggregateNoise):
    """Per-example clipped, quantised gradients with Skellam noise from the devices, summed under SecAgg+."""

    name = "secure"
    units = ("example",)
    holdout_noise_at = "device"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.reply = ReplySpec("masked", privacy_record=False, info=False)

    def reply_arrays(self, expected: Mapping[str, tuple]) -> dict[str, tuple]:
        """The masked vector: one uint32 array of D = 2^ceil(log2 d) entries (d: the trainable parameters)."""
        d = sum(int(np.prod(shape)) for shape, dtype in expected.values() if dtype.startswith("float"))
        return {MASKED: ((discrete.padded_dimension(d),), "uint32")}

    def aggregator(self, noise: NoiseSource, step_size: float):
        return SecureAggregator(self.cfg, step_size, noise)

    def example_event(self, num_examples: int):
        """ONE Skellam release per round joined (:func:`secure_event`)."""
        return secure_event(float(self.cfg.noise_multiplier))

    def calibrate(self, planned: np.ndarray, delta: float, q_max) -> Calibration:
        """sigma for ``--target-epsilon`` over the rounds one device may join (:func:`calibrate_secure_noise`)."""
        target = self.cfg.resolved_target_epsilon()
        if target is None:
            return Calibration()
        rounds = min(joinable_rounds(self.cfg), self.cfg.participation_cap or self.cfg.rounds)
        sigma = calibrate_secure_noise(target, delta, rounds)
        return Calibration({"target_epsilon": target, "noise_multiplier": sigma},
                           (f"target epsilon {target:g}: Skellam noise multiplier calibrated to {sigma:.4f} "
                            f"(Renyi DP at integer orders, {rounds} rounds)",))

    # ------------------------------------------------------------------ device side
    def device_stage(self, stage: str, config: Mapping, state: dict, noise: NoiseSource, round_: int) -> dict:
        """The device's part of exchange ``stage``; ``state`` (bytes values) persists over the round's exchanges.

        Raises
        ------
        ValueError
            On an exchange out of order or a request the protocol forbids (see :func:`mechanisms.secagg.reveal`).
        """
        if stage == "keys":
            state.clear()  # a previous round's secrets (kept when that round ended before its unmask)
            secrets = secagg.DeviceSecrets.new(noise)
            state["secagg-secrets"] = secrets.to_bytes()
            state["secagg-round"] = round_
            enc, mask = secrets.public_keys()
            return {"secagg-enc-key": enc, "secagg-mask-key": mask}
        secrets = self._secrets(state, round_)
        me = int(config["secagg-position"])
        if stage == "shares":
            holders = [int(h) for h in config["secagg-holders"]]
            keys = dict(zip(holders, (bytes(k) for k in config["secagg-enc-keys"])))
            cts = secagg.encrypt_shares(secrets, me, keys, holders, int(config["secagg-threshold"]), round_, noise)
            return {"secagg-to": list(cts), "secagg-ciphertexts": list(cts.values())}
        if stage == "unmask":
            owners = [int(u) for u in config["secagg-owners"]]
            cts = dict(zip(owners, (bytes(c) for c in config["secagg-ciphertexts"])))
            keys = dict(zip(owners, (bytes(k) for k in config["secagg-enc-keys"])))
            survivors = {int(u) for u in config["secagg-survivors"]}
            dropped = {int(u) for u in config["secagg-dropped"]} - {-1}
            shares = secagg.reveal(secrets, me, cts, keys, survivors, dropped, round_)
            state.clear()  # the round's secrets are not needed again
            return {"secagg-owners": list(shares), "secagg-shares": list(shares.values())}
        raise ValueError(f"unknown secure aggregation stage {stage!r}")

    @staticmethod
    def _secrets(state: Mapping, round_: int) -> secagg.DeviceSecrets:
        if "secagg-secrets" not in state or int(state.get("secagg-round", -1)) != round_:
            raise ValueError(f"no secure aggregation keys of round {round_} on this device (the keys exchange did not reach it)")
        return secagg.DeviceSecrets.from_bytes(bytes(state["secagg-secrets"]))

    def device_part(self, work: DeviceWork) -> DeviceReply:
        """The masked vector: sum_i round(gamma R clip_C(grad l_i)) + Skellam(mu / n_min), masked mod 2^b."""
        cfg, rc = self.cfg, work.round_config
        secrets = self._secrets(work.state, work.round)
        bits, dim = int(rc["secure-bits"]), int(rc["secure-dimension"])
        ints = quantised_gradient_sum(
            work.model, work.data, max_grad_norm=float(cfg.max_grad_norm), scale=float(rc["secure-scale"]),
            bound=float(rc["secure-bound"]), signs=discrete.rotation_signs(bytes(rc["secure-rotation"]), dim),
            noise=work.noise, task=work.task, teacher=work.teacher, physical_batch_size=cfg.physical_batch_size)
        ints = ints + discrete.skellam((dim,), float(rc["secure-variance"]), work.noise)
        neighbours = [int(v) for v in rc["secagg-neighbours"] if int(v) >= 0]
        keys = dict(zip(neighbours, (bytes(k) for k in rc["secagg-mask-keys"])))
        y = secagg.masked_input(discrete.wrap(ints, bits), secrets, int(rc["secagg-position"]), keys, work.round, bits)
        return DeviceReply({MASKED: torch.from_numpy(y)})


def quantised_gradient_sum(model, data, *, max_grad_norm: float, scale: float, bound: float, signs: torch.Tensor,
                           noise: NoiseSource, task=None, teacher=None, physical_batch_size: int = 32) -> np.ndarray:
    """sum_i R_i over the device's examples (int64 [D]): R_i = the conditional randomised rounding (to L2 norm <=
    ``bound``) of ``scale`` times the rotation (``signs``, :func:`dp.discrete.rotate`) of example i's gradient
    clipped to ``max_grad_norm`` C.

    Each example's gradient over all trainable parameters comes from the DP-SGD engine's per-example
    instantiation (:meth:`dp.engine.engine.DPSGDEngine.per_example_gradients`, ``physical_batch_size``
    examples per pass: memory that many times the trainable parameters, in float64), is clipped to C in
    float64 and, after rotation and scaling, clipped again to gamma C (so that float rounding never lets a
    vector past the scaled clip). Eval mode (no dropout); the model is left unchanged.
    """
    by_name = dict(model.named_parameters(remove_duplicate=False))
    keys = trainable_state_keys(model)
    total = np.zeros(signs.numel(), dtype=np.int64)
    if len(data) == 0:
        return total
    batch = max(1, int(physical_batch_size))
    with clipping_engine(model, max_grad_norm, "dpfl", task, teacher) as (collate_fn, loss_fn, engine):
        for start in range(0, len(data), batch):
            idx = np.arange(start, min(len(data), start + batch), dtype=np.int64)
            pe = engine.per_example_gradients(loss_fn(model, collate_fn(data, idx)))
            rows = torch.cat([(pe[by_name[k]] if by_name[k] in pe else torch.zeros((len(idx), *by_name[k].shape)))
                              .reshape(len(idx), -1).to(torch.float64).cpu() for k in keys], dim=1)
            del pe
            rows = rows * torch.clamp(max_grad_norm / torch.linalg.vector_norm(rows, dim=1, keepdim=True).clamp_min(1e-300),
                                      max=1.0)
            scaled = discrete.rotate(rows, signs) * scale
            del rows
            norms = torch.linalg.vector_norm(scaled, dim=1, keepdim=True)
            scaled = scaled * torch.clamp(scale * max_grad_norm / norms.clamp_min(1e-300), max=1.0)
            total += discrete.conditional_round(scaled, bound, noise).sum(dim=0).numpy()
    return total
