"""The server side of one run: its collaborators, set up once, and how to resume them.

:class:`Server` holds what the round's stages (server/round.py) use: the device population,
the selector, the ledger and the in-memory privacy book, the secret noise source, the model
and task (central evaluation), the Flower strategy (messages, server optimizer) and the
run's privacy mechanism (mechanisms/: what a round sends, what a device replies, the
aggregator, the events) and its aggregator. It also answers the privacy question a stage asks:
which devices are over a budget.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord

from dp.secure_random import NoiseSource
from settings.config import ConfigError, RunConfig
from nlu.features import cache_frozen_encoder
from nlu.head_init import LABEL_TEXT_MAX_LENGTH, init_head_from_texts, label_texts
from nlu.model import load_tokenizer, set_trainable
from nlu.tasks import task_for_data
from partitions.canary_record import write_canaries
from partitions.population import Population, build_population
from protocol.arrays import load_into, record_from_numpy, record_from_state, trainable_state
from rundir import Ledger, RunDir, hold_run_lock, load_model_file, load_model_state
from mechanisms import mechanism_for
from server.aggregation import ModelAverage, ServerStep, server_step_size
from server.hooks import DEFAULT_HOOKS
from server.plan import resolve
from server.privacy import PrivacyBook
from server.control import RunControl
from server.deletions import load_deletions
from server.releases import ReleaseTracker
from server.round import run_round as _run_round
from server.selection import ActivitySelector
from server.strategies import make_strategy

log = logging.getLogger("dpfl.server")


#: Marks a float64 array the checkpoint stores in float32 (:func:`narrow`, :func:`widen`).
_NARROWED = "__float64_as_float32__"


def narrow(state):
    """``state`` (nested dicts, lists, numpy arrays) with every float64 array stored as float32, marked.

    The server's float64 state (the optimizer's moments, the released average, the iterate) is
    checkpointed every round; in float32 it takes half the bytes (a head-only MiniLM run: about
    0.48 MB instead of 0.95 MB a round). A resumed run continues from the stored values rounded to
    float32 (relative error at most 2^-24).
    """
    if isinstance(state, dict):
        return {k: narrow(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(narrow(v) for v in state)
    if isinstance(state, np.ndarray) and state.dtype == np.float64:
        return {_NARROWED: state.astype(np.float32)}
    return state


def widen(state):
    """Undo :func:`narrow`: marked float32 arrays back to float64 (anything else unchanged)."""
    if isinstance(state, dict):
        if set(state) == {_NARROWED}:
            return np.asarray(state[_NARROWED], dtype=np.float64)
        return {k: widen(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(widen(v) for v in state)
    return state


def _calibration_note(selector: ActivitySelector, pop: Population, cfg: RunConfig) -> str:
    note = _calibration_sentence(selector, pop, cfg)
    if selector.bands > 1 and selector.calibrated:
        note += (f" With cyclic selection (--bands {selector.bands}) the calibration is for {selector.bands} x "
                 f"{cfg.cohort_size:g} expected devices over the population, one group of {selector.bands} selectable "
                 "per round.")
    return note


def _calibration_sentence(selector: ActivitySelector, pop: Population, cfg: RunConfig) -> str:
    if not selector.calibrated:
        return "c was set directly by the user (--selection-constant)."
    if pop.stream is None:
        return (
            "c was calibrated once, before round 1, from the devices' starting activities "
            f"(sum of a_k^alpha) so that the expected cohort size is {cfg.cohort_size:g}; "
            "this one calibration read the activity total, which the guarantee does not cover."
        )
    return (
        "c was calibrated once, before round 1, from every planned round's activities "
        f"(the arrival schedule) so that the expected cohort size averaged over the {cfg.rounds} "
        f"rounds is {cfg.cohort_size:g} (early rounds, when devices hold less, select fewer); "
        "this one calibration read the activity totals, which the guarantee does not cover."
    )


def load_baseline_model(task, cfg: RunConfig):
    """The run's model (``task.build_model``) with ``cfg.baseline_model``'s state dict loaded.

    Raises
    ------
    ValueError
        If the file cannot be read as a PyTorch state dict (whatever it holds: text, a pickle,
        an empty file) or does not fit the run's model; the message names the file. A run's
        ``checkpoints/global.pt`` with a frozen encoder (its ``state.json`` has ``frozen_from``)
        holds the trained parameters only: the rest keep the run's base model.
    """
    import pickle

    path = cfg.baseline_model
    model = task.build_model(cfg.model, seed=cfg.seed)
    try:
        load_model_file(path, model)
    except (RuntimeError, OSError, ValueError, KeyError, IndexError, EOFError, pickle.UnpicklingError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ValueError(f"--baseline-model {path}: cannot load it into the run's model ({reason}); give a state "
                         "dict .pt of this model, e.g. RUN_DIR/checkpoints/global.pt of a run with the same --model "
                         "and data") from exc
    return model


def _distinct_pairs(activity: np.ndarray, q: np.ndarray) -> tuple[list[tuple[int, float]], np.ndarray]:
    """The distinct (activity, q) pairs of n devices and each device's index into them ([n] int64).

    q_k is a function of a_k (server/selection.py), so the pairs are keyed by activity (an integer
    sort, fast for a million devices); if a pair differs within one activity, by both.
    """
    acts, which = np.unique(np.asarray(activity, dtype=np.int64), return_inverse=True)
    which = which.reshape(-1)
    first = np.zeros(len(acts), dtype=np.float64)
    first[which[::-1]] = q[::-1]  # any one q of each activity
    if np.array_equal(first[which], q):
        return [(int(a), float(x)) for a, x in zip(acts, first)], which
    keys, which = np.unique(np.stack([np.asarray(activity, dtype=np.float64), q], axis=1), axis=0, return_inverse=True)
    return [(int(a), float(x)) for a, x in keys], which.reshape(-1)


class Server:
    """State of one run on the server side.

    Parameters
    ----------
    cfg : settings.config.RunConfig
        Validated settings (not changed). :attr:`plan` resolves them (:func:`server.plan.resolve`:
        delta, calibrated noise, server learning rate); :attr:`cfg` is the resolved copy, which
        ``config.toml`` records (with the run directory's own copy of ``--deletions``).
    resume : bool
        Continue the run directory's last complete round (:meth:`_resume`).
    control : server.control.RunControl, optional
        The run's stop flag and backend checks (a fresh one, never stopped, by default).

    Raises
    ------
    settings.config.ConfigError, partitions.errors.DataError, nlu.model.ModelError, rundir.RunDirError
        On bad settings, data, model or run directory (before any round runs).
    """

    def __init__(self, cfg: RunConfig, resume: bool = False, control: RunControl | None = None):
        #: stop flag and backend checks of the run (server/control.py); the rounds' waits poll it
        self.control = control if control is not None else RunControl()
        self.rundir = RunDir(Path(cfg.run_dir), resume=resume)
        hold_run_lock(self.rundir.path)  # one process runs a run's rounds; the report knows it is running
        self.pop: Population = build_population(cfg)
        #: the settings resolved once (server/plan.py): delta, calibrated noise, server step
        self.plan = resolve(cfg, self.pop)
        cfg = self.plan.settings
        if resume and self.rundir.deletions_path.exists():  # the run's own copy (wherever the run now lives)
            cfg = cfg.replace(deletions=str(self.rundir.deletions_path))
        self.delta = self.plan.delta
        self.num_labels = len(self.pop.data.label_names)
        #: the run's privacy mechanism (mechanisms/): the stages and the devices ask it, never a flag
        self.mechanism = self.plan.mechanism
        #: the secret source of every noise draw and sampling decision of the server
        self.noise = NoiseSource(cfg.seed if cfg.reproducible_noise else None)
        self.activity = self.pop.activity(1)  # a_k(1); updated each round in the continual setting
        #: deletion requests (--deletions): device -> the round from which its data is gone
        self.deletion_requests: dict[int, int] = load_deletions(cfg.deletions, self.pop.num_devices) if cfg.deletions else {}
        empty = int((self.activity == 0).sum())
        if empty:
            log.warning("%d devices hold no examples after partitioning; they are never selected", empty)
        self.selector = self.plan.selector
        for note in self.plan.calibration.notes:
            log.info("%s", note)
        self.cfg = cfg
        self._check_holdout_budget()  # before anything is written
        if cfg.deletions and not resume:  # the run keeps its own copy: a resume reads the requests it started with
            self.cfg = cfg = cfg.replace(deletions=str(self.rundir.keep_deletions(cfg.deletions)))
        self.ledger = Ledger(self.rundir.ledger_path, cfg.run_id)
        self.ledger.start_run(
            target_delta=self.delta, accountant=cfg.accountant, selection_constant=self.selector.c,
            calibration_note=_calibration_note(self.selector, self.pop, cfg),
        )
        self.ledger.record_devices(self.activity, self.selector.probabilities(self.activity))
        #: devices whose deletion round has come (never selected again); those on record survive a resume
        self.deleted: set[int] = set(self.ledger.deletions())
        self.rundir.write_config(cfg)
        write_canaries(self.rundir.path, self.pop, self.rundir.ledger_path, cfg.run_id)
        self.task = task_for_data(cfg.task, self.pop.data, cfg.slot_loss_weight, pooling=cfg.pooling, pc_weight=cfg.pc_weight)
        model = self.task.build_model(cfg.model, seed=cfg.seed)
        if cfg.head_init == "label-names":  # the public label schema only (nlu/head_init.py)
            init_head_from_texts(model, label_texts(self.pop.data.label_names, cfg.label_descriptions),
                                 load_tokenizer(cfg.model), LABEL_TEXT_MAX_LENGTH)
        self.model = set_trainable(model, cfg.trainable, **cfg.lora_options())
        cache_frozen_encoder(self.model)  # --trainable head: the test split's features are computed once
        self.test_enc = self.task.encode(self.pop.data.test, load_tokenizer(cfg.model), cfg.max_length)
        self.strategy = make_strategy(cfg)
        self.server_step = ServerStep(self.strategy)
        self.aggregator = self.mechanism.aggregator(self.noise, server_step_size(cfg))
        #: the released model is the average of the iterates (--server-ema), or the iterate itself
        self.average = ModelAverage(cfg.server_ema) if cfg.server_ema > 0 else None
        self.current_iterate: ArrayRecord | None = None  # the round's iterate, when the average is released
        self.book = PrivacyBook(
            self.delta,
            cfg.accountant,
            max_epsilon=self.example_budget(),
            max_epsilon_device=cfg.target_epsilon_device if "device" in self.mechanism.units else None,
        )
        self.expected = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in trainable_state(self.model).items()}
        self.attempt = self.ledger.next_attempt()
        self.start_round = 1
        self.arrays: ArrayRecord = record_from_state(trainable_state(self.model))
        self.hooks = list(DEFAULT_HOOKS)
        self.releases = ReleaseTracker(self._baseline_correct())
        if resume:
            self._resume()

    # ------------------------------------------------------------------ privacy questions
    def example_budget(self) -> float | None:
        """The example-level per-device budget: ``--max-epsilon``, else ``--target-epsilon`` (None when
        the mechanism accounts no example-level unit)."""
        if "example" not in self.mechanism.units:
            return None
        budgets = [b for b in (self.cfg.max_epsilon, self.cfg.target_epsilon) if b is not None]
        return min(budgets) if budgets else None

    def probabilities(self, round_: int | None = None) -> tuple[np.ndarray, list[tuple[int, str, float]]]:
        """q_k(t) after removing devices whose next round would exceed a budget (and those hits); with
        cyclic selection (``--bands``) also the devices outside round ``round_``'s group."""
        if self.selector.bands > 1 and round_ is None:
            raise ValueError("cyclic selection (--bands) needs the round whose group may be selected")
        gone = sorted(set(self.book.exhausted) | self.deleted)
        q = self.selector.probabilities(self.activity, excluded=np.array(gone, dtype=np.int64), round_=round_)
        hits: list[tuple[int, str, float]] = []
        cand = np.flatnonzero(q > 0)
        budgeted = [u for u in self.mechanism.units if self.book.budget[u] is not None]
        if budgeted and len(cand):
            # a device's next event is a function of its (activity, q_k): one event per distinct pair
            pairs, which = _distinct_pairs(self.activity[cand], q[cand])
            for unit in budgeted:
                events = [self.mechanism.event(unit, a, qk) for a, qk in pairs]
                hits += self.book.over_budget_grouped(unit, cand, events, which.reshape(-1))
        if hits:
            q[np.array([d for d, _, _ in hits], dtype=np.int64)] = 0.0
            log.info("%d devices reached their privacy budget and will not be selected again", len(hits))
        return q, hits

    def _check_holdout_budget(self) -> None:
        """Refuse a holdout noise that gives holdout examples more epsilon than the example-level budget.

        Raises
        ------
        settings.config.ConfigError
            Naming ``--holdout-noise-multiplier`` and the value that would fit.
        """
        cfg, budget = self.cfg, self.example_budget()
        if cfg.holdout_per_device <= 0 or budget is None or cfg.holdout_noise_multiplier <= 0:
            return
        from server.holdout import holdout_epsilon, release_noise_multiplier

        f = release_noise_multiplier(cfg) / cfg.holdout_noise_multiplier  # 1/sqrt(2) with the out-of-scope histogram
        eps = holdout_epsilon(cfg.holdout_noise_multiplier * f, 1, self.delta, cfg.accountant)
        if eps > budget:
            lo, hi = cfg.holdout_noise_multiplier, cfg.holdout_noise_multiplier
            while holdout_epsilon(hi * f, 1, self.delta, cfg.accountant) > budget:
                lo, hi = hi, hi * 2
            for _ in range(30):  # bisect to the smallest sigma (two decimals, rounded up) within the budget
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if holdout_epsilon(mid * f, 1, self.delta, cfg.accountant) > budget else (lo, mid)
            sigma = math.ceil(hi * 100) / 100
            raise ConfigError(f"--holdout-noise-multiplier {cfg.holdout_noise_multiplier:g} gives each holdout example "
                              f"epsilon {eps:.3g} at delta {self.delta:g}, above the example-level budget {budget:g}; "
                              f"use --holdout-noise-multiplier {sigma:g} or more")

    def apply_deletions(self, t: int) -> None:
        """Before round ``t``'s selection: every deletion request whose round has come takes effect
        (the device is never selected again) and is recorded in the ledger, from round ``t`` (its
        effective round), with the first round the device joined."""
        due = sorted(d for d, r in self.deletion_requests.items() if r <= t and d not in self.deleted)
        if not due:
            return
        joined = self.ledger.first_joined(due)
        self.ledger.record_deletions([(d, t, joined.get(d)) for d in due])
        self.deleted.update(due)
        log.info("round %d: %d deletion request(s) in effect (devices %s); they are never selected again",
                    t, len(due), ", ".join(map(str, due[:10])) + (" ..." if len(due) > 10 else ""))

    def account(self, out) -> None:
        """The round's privacy figures on its outcome: max epsilons so far, devices over budget."""
        units = self.mechanism.units
        out.epsilon_example_max = self.book.max_epsilon("example") if "example" in units else None
        out.epsilon_device_max = self.book.max_epsilon("device") if "device" in units else None
        out.extra["devices_over_budget"] = len(self.book.exhausted)
        if self.pop.stream is not None:
            out.extra["activity_total"] = int(self.activity.sum())

    # ------------------------------------------------------------------ model
    def evaluate(self, arrays: ArrayRecord, with_correct: bool = False) -> dict[str, float]:
        """The task's metrics of the global model ``arrays`` (trainable entries) on the test split
        (``with_correct``: also the per-example correctness, see :meth:`nlu.tasks.Task.evaluate`)."""
        load_into(self.model, arrays, partial=True)
        return self.task.evaluate(self.model, self.test_enc, with_correct=with_correct)

    def _baseline_correct(self):
        """Per-example correctness [N] of ``--baseline-model`` on the test split (None without one).

        Raises
        ------
        ValueError
            If the file cannot be loaded into the run's model.
        """
        if not self.cfg.baseline_model:
            return None
        return self.task.evaluate(load_baseline_model(self.task, self.cfg), self.test_enc, with_correct=True)["correct"]

    def save_checkpoint(self, released: ArrayRecord, t: int, out, iterate: ArrayRecord | None = None) -> None:
        """Checkpoint round ``t``: the released global model (whole, frozen parts included), attempt,
        metrics line, and the server state (strategy, aggregator, model average and, with
        ``--server-ema``, the current iterate ``iterate`` that training continues from)."""
        load_into(self.model, released, partial=True)
        server_state = {"strategy": narrow(self.server_step.state_dict()), "aggregator": self.aggregator.state_dict(),
                        "releases": self.releases.state_dict()}
        if self.average is not None:
            server_state["average"] = narrow(self.average.state_dict())
            server_state["iterate"] = narrow({k: v.numpy() for k, v in (iterate or released).items()})
        state = {"attempt": self.attempt, "cohort_size": out.cohort_size, "metrics": out.to_json()}
        if self.cfg.round_checkpoints or self.cfg.deletions:  # for dpfl retrain
            self.rundir.save_round_copy(t, trainable_state(self.model), state, server_state)
        if all(p.requires_grad for p in self.model.parameters()):
            self.rundir.save_checkpoint(self.model.state_dict(), t, state, server_state)
        else:  # a frozen encoder: the trained parameters only (KB, not the encoder's 90 MB each round)
            self.rundir.save_checkpoint(trainable_state(self.model), t, state, server_state,
                                        frozen_from={"model": self.cfg.model, "seed": self.cfg.seed})

    # ------------------------------------------------------------------ resume
    def _resume(self) -> None:
        """Continue from the last complete round: model, strategy state, privacy book.

        Every privacy event in the ledger is loaded, including those of a round that crashed
        after its events were committed (they were spent); that round is re-run as a new
        attempt. The secret draws (cohorts, noise) are fresh: nothing of them was saved.
        """
        ck = self.rundir.load_checkpoint()
        last, last_line = 0, None
        if ck is not None:
            last, sd, state, server_state = ck
            load_model_state(self.model, sd, state.get("frozen_from"))
            self.arrays = record_from_state(trainable_state(self.model))
            last_line = state.get("metrics")
            server_state = widen(server_state or {})
            self.server_step.load_state_dict((server_state or {}).get("strategy") or {})
            self.aggregator.load_state_dict((server_state or {}).get("aggregator") or {})
            self.releases.load_state_dict((server_state or {}).get("releases") or {})
            if self.average is not None and (server_state or {}).get("iterate") is not None:
                self.average.load_state_dict(server_state.get("average") or {})
                self.arrays = record_from_numpy(server_state["iterate"])
            self.ledger.complete_round(last, int(state.get("cohort_size", 0)), int(state.get("attempt", 0)))
        self.rundir.repair_metrics(last, last_line)
        for unit in ("example", "device"):
            self.book.load(unit, self.ledger.events(unit))
        self.book.exhausted.update(self.ledger.exhausted())
        self.start_round = last + 1
        log.info(
            "resuming %s after round %d (attempt %d); %d devices' privacy histories loaded from the ledger",
            self.cfg.run_dir, last, self.attempt, len(self.book.history["example"]) + len(self.book.history["device"]),
        )

    def run_round(self, grid, t: int, arrays: ArrayRecord, node_of: dict[int, int]):
        """Round ``t`` (see :func:`server.round.run_round`)."""
        return _run_round(self, grid, t, arrays, node_of)
