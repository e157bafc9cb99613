"""One resolution of a run's settings into what the run uses: :func:`resolve` -> :class:`RunPlan`.

The user's :class:`settings.config.RunConfig` is frozen; what is derived from it and from the
data (delta from the number of training examples, the selection constant c from the planned
activities, the noise multipliers the mechanism calibrates for its targets, the server learning
rate of the run's mode, how the intent head starts) is computed here once, by the same function the preflight of ``dpfl
simulate`` and the :class:`server.state.Server` call, so the preflight checks exactly the
calibration the run will use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mechanisms import mechanism_for
from mechanisms.base import Calibration, Mechanism
from nlu.head_init import HeadInitError, label_texts, labels_are_text
from partitions.population import Population
from server.privacy import largest_selection_probability
from server.selection import ActivitySelector
from settings.config import ConfigError, RunConfig

__all__ = ["RunPlan", "resolve"]


@dataclass(frozen=True, eq=False)
class RunPlan:
    """The settings a run uses, resolved once (see :func:`resolve`).

    Attributes
    ----------
    settings : settings.config.RunConfig
        The user's settings with the derived values filled in: ``target_delta``, the calibrated
        ``noise_multiplier`` / ``device_noise_multiplier`` (and the default ``target_epsilon``
        they were calibrated for), ``server_learning_rate``, ``head_init`` (``auto`` resolved).
        ``config.toml`` records these.
    delta : float
        The delta at which every epsilon of the run is stated.
    planned : numpy.ndarray, shape [K] or [T, K] (continual setting), int
        The devices' planned activities (training examples held) the calibrations read.
    selector : server.selection.ActivitySelector
        The activity-weighted Poisson selection with its constant c fixed (given or calibrated).
    mechanism : mechanisms.base.Mechanism
        The run's privacy mechanism, built from :attr:`settings`.
    calibration : mechanisms.base.Calibration
        What the mechanism calibrated (field -> value) and one log line for each.
    """

    settings: RunConfig
    delta: float
    planned: np.ndarray
    selector: ActivitySelector
    mechanism: Mechanism
    calibration: Calibration

    @property
    def selection_constant(self) -> float:
        """c of q_k = min(1, c a_k^alpha) (given with ``--selection-constant`` or calibrated)."""
        return float(self.selector.c)


def resolve_head_init(cfg: RunConfig, label_names, declared: bool = True) -> str:
    """``--head-init`` with ``auto`` resolved: ``label-names`` for an intent task on mean-pooled features
    whose labels are words (:func:`nlu.head_init.labels_are_text`) and come from a declared schema
    (``declared``: ``labels.json``, a hub ClassLabel, the built-in set; or ``--label-descriptions``),
    else ``random``.

    Raises
    ------
    settings.config.ConfigError
        If ``--label-descriptions`` cannot be read or misses a label, or ``--head-init label-names`` is
        asked for label names that were read off the training data (not public).
    """
    declared = declared or cfg.label_descriptions is not None
    head_init = cfg.head_init
    if head_init == "auto":
        usable = cfg.task == "intent" and cfg.pooling == "mean" and declared
        head_init = "label-names" if usable and (labels_are_text(label_names) or cfg.label_descriptions) else "random"
    if head_init == "label-names":
        if not declared:
            raise ConfigError("--head-init label-names: the label names were read off the training data (no "
                              "labels.json beside train.jsonl), so they are not public; write the public label schema "
                              "to labels.json (a JSON list of the names), give --label-descriptions, or use "
                              "--head-init random")
        try:
            label_texts(label_names, cfg.label_descriptions)
        except HeadInitError as exc:
            raise ConfigError(str(exc)) from None
    return head_init


def resolve(cfg: RunConfig, pop: Population) -> RunPlan:
    """Resolve ``cfg`` on the population ``pop`` into the run's :class:`RunPlan` (``cfg`` is not changed).

    Parameters
    ----------
    cfg : settings.config.RunConfig
        Validated settings.
    pop : partitions.population.Population
        The run's devices (built from ``cfg``).

    Raises
    ------
    settings.config.ConfigError
        If a privacy target cannot be reached (the message names the setting to change).
    ValueError
        If no selection constant reaches ``--cohort-size``.
    """
    delta = cfg.resolve_delta(pop.data.num_train)
    planned = pop.planned_activity(cfg.rounds)  # [T, K] (continual) or [K]
    alpha = cfg.activity_exponent if cfg.selection == "activity" else 0.0
    try:
        selector = ActivitySelector(planned, alpha, cfg.cohort_size, cfg.selection_constant, bands=cfg.bands)
    except ValueError as exc:
        if cfg.bands == 1:
            raise
        raise ConfigError(str(exc)) from None
    # the mechanism's noise from its targets (a calibration target is also every device's budget)
    calibration = mechanism_for(cfg).calibrate(planned, delta, lambda: largest_selection_probability(selector, planned))
    head_init = resolve_head_init(cfg, pop.data.label_names, pop.data.labels_declared)
    settings = cfg.replace(target_delta=delta, head_init=head_init, **calibration.values,
                           label_descriptions=cfg.label_descriptions if head_init == "label-names" else None)
    settings = settings.replace(server_learning_rate=settings.resolved_server_learning_rate())
    return RunPlan(settings=settings, delta=delta, planned=planned, selector=selector,
                   mechanism=mechanism_for(settings), calibration=calibration)
