"""What every privacy mechanism of a run answers, in one interface (cf. pfl-research's
``SplitPrivacyMechanism``: constrain sensitivity on the device, add noise on the server).

A mechanism owns, in one module of this package:

* what a round sends to the devices beyond the model (:meth:`Mechanism.round_params`);
* what a device computes and may reply (:meth:`Mechanism.device_part`, :attr:`Mechanism.reply`);
* how the server combines the replies and adds its noise (:meth:`Mechanism.aggregator`, an
  :class:`Aggregator`: ``begin`` / ``add`` / ``result``, ``state_dict`` for resume);
* which privacy events it charges to which unit (:attr:`Mechanism.units`,
  :meth:`Mechanism.accounted`, :meth:`Mechanism.event`);
* how its noise is calibrated from a target (:meth:`Mechanism.calibrate`).

The round loop (server/round.py) and the ClientApp (client/app.py) ask the run's mechanism
(:func:`mechanisms.mechanism_for`); they never test which one runs. Nothing here imports Flower:
arrays are numpy (server side) and torch tensors (device side); server/ and client/ turn them
into Flower records.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch

from dp.accounting import SubsampledGaussianEvent, calibrate_noise_multiplier
from dp.secure_random import NoiseSource

#: The two privacy units (DESIGN.md, "Privacy model").
UNITS = ("example", "device")


@dataclass(frozen=True)
class RoundPlan:
    """What the server expects of a round, fixed before any reply arrives (public quantities only).

    Attributes
    ----------
    round : int
    expected_cohort : float
        m, device-level DP's fixed denominator: ``--cohort-size``, the expected cohort size the
        selection constant c was calibrated for (public; equal to sum_k q_k(t) when no device is
        capped at q_k = 1 or removed by a budget, and in the continual setting only on average).
    expected_examples : float
        sum over the cohort of p_k n_k, the expected number of sampled examples (the
        aggregate placement's denominator; n_k are the public example counts); under cyclic
        selection (``--bands``) the same expectation over a cycle, (1/b) sum_k q_k p n_k over
        all devices (:func:`server.round.plan_of`).
    lr_factor : float
        The server learning-rate schedule's factor this round (``--server-lr-schedule``).
    cohort : tuple of int
        The round's cohort (device ids, in the server's order): the devices a multi-exchange round
        (secure aggregation) numbers.
    cohort_examples : float
        sum over the cohort of n_k, the examples its devices hold (public counts).
    """

    round: int
    expected_cohort: float = 1.0
    expected_examples: float = 1.0
    lr_factor: float = 1.0
    cohort: tuple[int, ...] = ()
    cohort_examples: float = 0.0


@dataclass(frozen=True)
class ReplySpec:
    """What a device's training reply may hold (protocol/messages.py checks it on arrival).

    Attributes
    ----------
    kind : {"weights", "clipped-sum", "masked"}
        ``"weights"``: the locally trained trainable parameters with a ``metrics`` record
        (``num-examples``); ``"clipped-sum"``: the sum of clipped per-example gradients, alone;
        ``"masked"``: secure aggregation's masked integer vector, alone (:meth:`Mechanism.reply_arrays`).
    privacy_record : bool
        The reply must carry the round's ``privacy`` record (the device's DP-SGD event).
    info : bool
        The reply carries the ``info`` record (the Ray node it ran on, its device id).
    clip : str, optional
        The key of the reply's ``clip`` record (adaptive clipping, :mod:`mechanisms.adaptive_clip`):
        ``"centred-unclipped-count"`` (the aggregate placement's count, used only noised) or
        ``"clip-norm"`` (local DP-SGD: the device's clip norm after its noised updates); None: no such record.
    """

    kind: str = "weights"
    privacy_record: bool = False
    info: bool = True
    clip: str | None = None


@dataclass
class DeviceWork:
    """One device's task in one round, as the ClientApp hands it to the mechanism's device part.

    Attributes
    ----------
    model : torch.nn.Module
        The global model loaded into this process's instance (trainable parameters as they train).
    data : nlu.data.Encoded or nlu.slots.SlotEncoded
        The device's n training examples this round.
    task : nlu.tasks.Task
        Collation and per-example loss.
    noise : dp.secure_random.NoiseSource
        The task's secret randomness (batches, example sampling, noise).
    round_config : Mapping
        The round's config record (``server-round``, :meth:`Mechanism.round_params`, the
        strategy's entries such as ``proximal-mu``).
    device_id, round : int
    teacher : torch.Tensor [n, C], optional
        The previous release's logits on the device's examples (``--pc-weight``).
    started : float
        ``time.perf_counter()`` when the handler started (non-private runs report task time).
    state : dict
        What the device part of a multi-exchange round keeps between the round's exchanges
        (:meth:`Mechanism.device_stage`; bytes, str and numbers; the ClientApp keeps it in the node's state).
    """

    model: torch.nn.Module
    data: Any
    task: Any
    noise: NoiseSource
    round_config: Mapping
    device_id: int
    round: int
    teacher: torch.Tensor | None = None
    started: float = field(default_factory=time.perf_counter)
    state: dict = field(default_factory=dict)


@dataclass
class DeviceReply:
    """What the device part returns; the ClientApp turns it into the reply's records.

    Attributes
    ----------
    arrays : dict of str to torch.Tensor
        State-dict key of each trainable parameter -> tensor (trained weights or clipped sum).
    metrics : dict, optional
        The ``metrics`` record (None: no such record).
    privacy : dict, optional
        The ``privacy`` record: the round's event, from public counts only (None: no such record).
    clip : float, optional
        The ``clip`` record's value (adaptive clipping, see :attr:`ReplySpec.clip`; None: no such record).
    """

    arrays: dict[str, torch.Tensor]
    metrics: dict | None = None
    privacy: dict | None = None
    clip: float | None = None


@dataclass(frozen=True)
class Calibration:
    """Settings a mechanism calibrated from its targets, and one log line for each.

    Attributes
    ----------
    values : dict
        RunConfig field -> value (written to ``config.toml`` by the server).
    notes : tuple of str
    """

    values: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def _check_unit(unit: str) -> None:
    if unit not in UNITS:
        raise ValueError(f"unknown privacy unit {unit!r}; expected one of {UNITS}")


def _numpy(v) -> np.ndarray:
    """A numpy view of ``v`` (numpy arrays as they are; objects with ``.numpy()``, e.g. Flower Arrays, converted)."""
    return v if isinstance(v, np.ndarray) else np.asarray(v.numpy())


def floating_keys(current: Mapping[str, np.ndarray]) -> list[str]:
    """The keys of ``current`` whose arrays are floating point (the ones a mechanism changes)."""
    return [k for k, v in current.items() if np.issubdtype(v.dtype, np.floating)]


class Aggregator:
    """The server side of a mechanism: how one round's replies become the proposal for the next global arrays.

    ::

        agg.begin(t, current, plan)        # the round's global arrays {key: array} and what the server expects
        agg.add(reply_arrays, weight)      # per accepted reply, as it arrives (folded in, then dropped)
        proposal = agg.result()            # the new global arrays (None: keep the current model)

    Each aggregator holds at most a running sum and one reply, whatever the cohort size.
    ``state_dict`` / ``load_state_dict`` resume it.
    """

    name = "aggregator"

    def begin(self, round_: int, current: dict[str, np.ndarray], plan: RoundPlan) -> None:
        """Start round ``round_`` from the global arrays ``current`` ({key: array})."""
        self.round, self.current, self.plan = round_, current, plan

    def add(self, arrays: Mapping[str, np.ndarray], weight: float,
            clip: float | None = None) -> None:  # pragma: no cover - interface
        """Fold in one accepted reply's arrays ({key: array}; ``weight``: its ``num-examples``, where it has one;
        ``clip``: its ``clip`` record's value, where the reply spec asks for one)."""
        raise NotImplementedError

    def result(self) -> dict[str, np.ndarray] | None:  # pragma: no cover - interface
        """The round's proposal for the new global arrays, or None to keep ``current``."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Picklable state to resume (none by default)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output."""

    # A round may hold exchanges before and after its training message (secure aggregation's
    # protocol): the round loop sends each stage's requests and folds in the replies.
    #: the names of the exchanges before the training message, in order
    stages_before: tuple[str, ...] = ()
    #: the names of the exchanges after the training message (the replies are all in), in order
    stages_after: tuple[str, ...] = ()

    def stage_requests(self, stage: str) -> dict[int, dict]:
        """Device id -> the config entries of its message in exchange ``stage`` (bytes, numbers, str, lists of one
        of them); no entry: no message."""
        return {}

    def stage_reply(self, stage: str, device: int, reply: Mapping | None) -> str | None:
        """Fold in ``device``'s reply to exchange ``stage`` (its ``stage`` record; None when it failed or did not
        reply in time); return why it was rejected, or None."""
        return None

    def train_entries(self, device: int) -> dict | None:
        """Extra config entries of ``device``'s training message ({} by default); None: send it none."""
        return {}

    def lost_updates(self) -> list[tuple[int, str, str]]:
        """(device, reason, detail) of the round's devices whose update the aggregator could not use besides the
        round loop's failed, rejected and late replies (after :meth:`result`; none by default)."""
        return []

    def round_stats(self) -> dict:
        """Entries the round's metrics line gets from the aggregator (none by default; never a statistic of the
        devices' data)."""
        return {}

    def add_reply(self, device: int, arrays: Mapping[str, np.ndarray], weight: float,
                  clip: float | None = None) -> None:
        """:meth:`add` for device ``device``'s accepted reply (an aggregator that needs to know the sender overrides it)."""
        self.add(arrays, weight, clip)


class Mechanism:
    """A run's privacy mechanism (see the module docstring); one subclass per module, registered by name.

    Parameters
    ----------
    cfg : settings.config.RunConfig
        The run's settings; calibrated values (:meth:`calibrate`) are read from it when used.

    Attributes
    ----------
    name : str
    units : tuple of str
        The privacy units it accounts, in the order the server checks their budgets.
    reply : ReplySpec
    holdout_noise_at : {"device", "aggregate", "none"}
        Where a holdout evaluation's count is noised (``--holdout-per-device``).
    releases_on_empty_cohort : bool
        The server releases a (noise-only) update even when the Poisson cohort is empty.
    """

    name = "mechanism"
    units: tuple[str, ...] = ()
    reply = ReplySpec()
    holdout_noise_at = "none"
    releases_on_empty_cohort = False

    def __init__(self, cfg):
        self.cfg = cfg

    @property
    def private(self) -> bool:
        """True when the mechanism accounts some privacy unit (a private run)."""
        return bool(self.units)

    # ------------------------------------------------------------------ the round's message
    def round_params(self) -> dict:
        """Entries the round's config record carries for the device part (public settings only)."""
        return {}

    # ------------------------------------------------------------------ device
    def device_part(self, work: DeviceWork) -> DeviceReply:  # pragma: no cover - interface
        """What the device computes from its data in one round, and the reply it may send."""
        raise NotImplementedError

    def device_stage(self, stage: str, config: Mapping, state: dict, noise: NoiseSource, round_: int) -> dict:
        """The device's part of a non-training exchange ``stage`` (:attr:`Aggregator.stages_before` / ``stages_after``):
        the reply's ``stage`` record from the message's ``config``; ``state`` persists over the round's exchanges.

        Raises
        ------
        ValueError
            For a mechanism without exchanges (always, by default).
        """
        raise ValueError(f"{self.name} has no {stage!r} exchange")

    def reply_arrays(self, expected: Mapping[str, tuple]) -> Mapping[str, tuple]:
        """``{key: (shape, dtype name)}`` of a training reply's arrays, given the trainable parameters' ``expected``
        (the same by default)."""
        return expected

    # ------------------------------------------------------------------ server
    def aggregator(self, noise: NoiseSource, step_size: float) -> Aggregator:  # pragma: no cover - interface
        """The run's server side; ``step_size`` is the server SGD step (1 when a Flower optimizer takes the step)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ accounting
    def example_event(self, num_examples: int) -> SubsampledGaussianEvent:  # pragma: no cover - interface
        """The example-level event of one round for an example of a device holding ``num_examples``."""
        raise NotImplementedError(f"{self.name} accounts no example-level event")

    def device_event(self, q: float) -> SubsampledGaussianEvent:  # pragma: no cover - interface
        """The device-level event of one round for a device selected with probability ``q``."""
        raise NotImplementedError(f"{self.name} accounts no device-level event")

    def event(self, unit: str, num_examples: int, q: float) -> SubsampledGaussianEvent:
        """The event of ``unit`` ("example" or "device") for a device holding ``num_examples``, selected with ``q``.

        Raises
        ------
        ValueError
            If ``unit`` is not one of :data:`UNITS`.
        """
        _check_unit(unit)
        return self.example_event(num_examples) if unit == "example" else self.device_event(q)

    def check_clip(self, value: float, num_examples: int) -> str | None:
        """Why a reply's ``clip`` record value cannot be used (None if it can); ``num_examples`` is the
        device's public example count. No check by default."""
        return None

    def clip_norm(self, unit: str) -> float:
        """The L2 sensitivity bound of ``unit``'s events: C (example) or S (device).

        Raises
        ------
        ValueError
            If ``unit`` is not one of :data:`UNITS`.
        """
        _check_unit(unit)
        return float(self.cfg.max_grad_norm if unit == "example" else self.cfg.update_clip_norm)

    def accounted(self, unit: str, q: np.ndarray, cohort: np.ndarray) -> np.ndarray:
        """Device ids charged an event of ``unit`` this round.

        Example level: the devices asked to train (the cohort). Device level: every device that
        could have been selected (q_k > 0), selected or not (individual accounting).
        """
        if unit == "device":
            return np.flatnonzero(q > 0)
        return np.asarray(cohort)

    def calibrate(self, planned: np.ndarray, delta: float, q_max: Callable[[], float]) -> Calibration:
        """Noise multipliers calibrated from the run's targets (none by default).

        Parameters
        ----------
        planned : np.ndarray [K] or [T, K]
            Every activity a device can have (the continual setting: every round's).
        delta : float
        q_max : callable
            Returns the largest inclusion probability of the run (computed only when needed).
        """
        return Calibration()


def joinable_rounds(cfg) -> int:
    """The most rounds one device can join: ``cfg.rounds``, or ceil(rounds / bands) under cyclic selection
    (``--bands`` b > 1: a device may join only the rounds of its group, one round in b;
    :class:`server.selection.ActivitySelector`)."""
    return -(-int(cfg.rounds) // int(getattr(cfg, "bands", 1)))


def calibrate_example(cfg, delta: float, profiles: set[tuple[float, int]], hint: str) -> Calibration:
    """The example-level calibration of either placement: the smallest noise multiplier that keeps
    every (sample_rate, steps-per-round) profile, repeated ``cfg.rounds`` times (or
    ``cfg.participation_cap`` times, the most rounds one device joins: the budget filter, with
    the target as every device's budget, stops it there; or ceil(rounds / bands) times under
    cyclic selection, :func:`joinable_rounds`), at or below the target epsilon (``--target-epsilon``, default 8 without ``--noise-multiplier``: also every
    device's budget). The largest sigma any profile needs; nothing when no target applies.

    Parameters
    ----------
    cfg : settings.config.RunConfig
        ``target_epsilon`` (resolved), ``rounds``, ``participation_cap``, ``accountant``.
    delta : float
    profiles : set of (float, int)
        (q, steps of one round) per distinct local mechanism.
    hint : str
        The settings to change, appended to the error (e.g. ``" or --sample-rate"``).

    Raises
    ------
    ValueError
        If the target cannot be met (the message names the settings to change).
    """
    target = cfg.resolved_target_epsilon()
    if target is None:
        return Calibration()
    rounds = min(joinable_rounds(cfg), cfg.participation_cap or cfg.rounds)  # the rounds one device may join
    sigma = 0.0
    for q, steps in sorted(profiles):
        if steps == 0:
            continue
        try:
            s = calibrate_noise_multiplier(target, delta, schedule=[(q, steps * rounds)], accountant=cfg.accountant)
        except ValueError as exc:
            raise ValueError(
                f"--target-epsilon {target:g} is unreachable for a device with sample rate {q:.3g} "
                f"and {steps} local steps over {rounds} rounds at delta {delta:g}: raise --target-epsilon, "
                f"lower --rounds (or --participation-cap)" + hint + f" ({exc})"
            ) from exc
        sigma = max(sigma, s)
    return Calibration({"target_epsilon": target, "noise_multiplier": sigma},
                       (f"target epsilon {target:g}: noise multiplier calibrated to {sigma:.4f}"
                        + (f" for at most {rounds} of the {cfg.rounds} rounds per device ("
                           + ("--participation-cap" if rounds < joinable_rounds(cfg) else f"--bands {cfg.bands}") + ")"
                           if rounds < cfg.rounds else ""),))
