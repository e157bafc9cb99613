"""The holdout evaluation (``--holdout-per-device F``): whom the final model serves, by activity quartile.

Each device keeps a fraction F of its examples out of training (partitions.population.split_holdout).
After the last round the server sends the final released model to every device that has holdout
examples; each replies with how many of them the model classifies correctly. These counts are
statistics of the devices' data, so they are released only with Gaussian noise and accounted:

* noise on the device (``--noise-at device``): the device adds N(0, sigma_h^2) to its own count;
* noise on the aggregate (central DP): the server adds N(0, sigma_h^2) once to each quartile's sum;
* a non-private run sends exact counts (the report says the run is not private).

One holdout example changes one device's count by at most 1 (sensitivity 1), and every holdout
example is read by one such release (more only if an evaluation is interrupted and done again),
so its guarantee is that of one Gaussian mechanism with noise multiplier sigma_h
(``--holdout-noise-multiplier``), accounted with the run's accountant at the run's delta. With
out-of-scope calibration the release also holds a histogram of the confidences (one bin per
example, each bin noised alike): L2 sensitivity sqrt(2), noise multiplier sigma_h / sqrt(2)
(:func:`release_noise_multiplier`), which is what the ledger row records. The devices counted
are those that reply before the wait ends (the round's deadline): which devices those are, and
so the released totals, is not covered by the noise.
Membership in the holdout is decided per example by a keyed hash of its id, so holdout examples
never train and training examples are never evaluated: the two guarantees cover disjoint
examples. The number of holdout examples of a device is an example count like its activity,
which the server sees (the adjacency treats example counts as public): it is not sent. The
ledger records the release (``holdout_releases``) before any message leaves; the result goes to
``holdout.json`` (rundir).
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from dp.accounting import SubsampledGaussianEvent, compute_epsilon
from nlu.oos import CONFIDENCE_BINS, SCORE
from partitions.activity import activity_quartiles
from protocol import messages as rec
from protocol.arrays import record_from_state, trainable_state
from rundir import read_holdout, write_holdout
from server.control import receive

log = logging.getLogger("dpfl.server")

__all__ = ["by_quartile", "calibrates_oos", "evaluate_holdout", "holdout_epsilon", "release_noise_multiplier"]


def holdout_epsilon(noise_multiplier: float, releases: int, delta: float, accountant: str) -> float:
    """Epsilon (at ``delta``) of a holdout example read by ``releases`` Gaussian releases of
    noise multiplier sigma_h (std over L2 sensitivity): ``releases`` composed Gaussian mechanisms
    (dp-accounting through :func:`dp.accounting.compute_epsilon`); infinity when sigma_h is 0."""
    if noise_multiplier <= 0:
        return float("inf")
    return float(compute_epsilon([SubsampledGaussianEvent(float(noise_multiplier), 1.0, int(releases))], delta, accountant))


def release_noise_multiplier(cfg) -> float:
    """The noise multiplier (std over L2 sensitivity) of one holdout release of ``cfg``.

    Each released number (the correct count and, with out-of-scope calibration, each bin of the
    confidence histogram) gets Gaussian noise of std sigma_h (``--holdout-noise-multiplier``). One
    holdout example changes the count by at most 1 and one bin by 1, so with the histogram the
    release's L2 sensitivity is sqrt(2) and its noise multiplier sigma_h / sqrt(2) (the same as two
    Gaussian mechanisms of multiplier sigma_h composed); without it, sigma_h."""
    sigma = float(cfg.holdout_noise_multiplier)
    return sigma / float(np.sqrt(2.0)) if calibrates_oos(cfg) else sigma


def calibrates_oos(cfg) -> bool:
    """True when the holdout release also carries the confidence histogram that chooses the
    out-of-scope threshold (out-of-scope detection on, no public ``--oos-threshold``)."""
    return bool(cfg.out_of_scope) and cfg.oos_threshold is None and cfg.holdout_per_device > 0


def by_quartile(groups: list[list[int]], activity: dict[int, int], sizes: dict[int, int], counts: dict[int, float],
                noise_at: str, sigma: float, noise) -> list[dict]:
    """Holdout accuracy per activity quartile from the devices' (noised) correct counts.

    Parameters
    ----------
    groups : list of 4 lists of device ids
        :func:`partitions.activity.activity_quartiles`.
    activity, sizes : dict
        Each device's activity and number of holdout examples.
    counts : dict
        The replies: device -> its correct count (noised on the device with ``noise_at`` "device").
    noise_at : {"aggregate", "device", "none"}
        With "aggregate", N(0, sigma^2) from ``noise`` (a :class:`dp.secure_random.NoiseSource`)
        is added once to each quartile's sum here.
    sigma : float
        The noise's std in count units (the noise multiplier; sensitivity 1).
    noise : dp.secure_random.NoiseSource or None
        The server's secret source (used only with ``noise_at`` "aggregate").

    Returns
    -------
    list of dict
        Per quartile: ``quartile``, ``activity_min``, ``activity_max``, ``devices``,
        ``devices_evaluated`` (replied), ``examples`` (their holdout examples), ``accuracy``
        (noisy sum / examples clipped to [0, 1]; None without examples) and
        ``noise_std_accuracy`` (sigma / examples, or sigma sqrt(devices_evaluated) / examples on the device).

    Raises
    ------
    KeyError
        If a device of ``groups`` is missing from ``activity`` or, having replied, from ``sizes``.
    """
    out = []
    for q, group in enumerate(groups):
        evaluated = [d for d in group if d in counts]
        examples = sum(sizes[d] for d in evaluated)
        total = sum(counts[d] for d in evaluated)
        std = 0.0
        if noise_at == "aggregate" and sigma > 0:
            total += float(noise.normal_numpy((1,), sigma)[0])
            std = sigma
        elif noise_at == "device":
            std = sigma * float(np.sqrt(len(evaluated)))
        out.append({
            "quartile": q + 1, "activity_min": activity[group[0]], "activity_max": activity[group[-1]],
            "devices": len(group), "devices_evaluated": len(evaluated), "examples": examples,
            "accuracy": min(1.0, max(0.0, total / examples)) if examples else None,
            "noise_std_accuracy": std / examples if examples else None,
        })
    return out


def evaluate_holdout(server, grid, node_of: dict[int, int]) -> dict | None:
    """Evaluate the final released model on every device's holdout examples; write ``holdout.json``.

    Does nothing without ``--holdout-per-device`` or when ``holdout.json`` is already written (a
    resumed finished run). An evaluation that was recorded in the ledger but stopped before its
    result was written is done again as a new attempt; the report composes every recorded
    release. Only devices in an activity quartile are asked; deleted devices (``--deletions``)
    are not. The wait is the round's (:func:`server.control.receive`: the round deadline,
    Ctrl-C, the backend checks).

    Raises
    ------
    settings.interrupt.Interrupted, settings.interrupt.BackendLost
        As a round's wait does (the ledger row stays; a resume evaluates again).

    Returns
    -------
    dict or None
        The ``holdout.json`` payload: per activity quartile (Q1 lightest, the report's split)
        ``devices``, ``devices_evaluated`` (replied), ``examples`` (their holdout examples),
        ``accuracy`` (noisy correct count / examples, clipped to [0, 1]; None without examples)
        and ``noise_std_accuracy`` (the noise's std on that accuracy); ``epsilon`` of a holdout
        example at ``target_delta``.
    """
    cfg = server.cfg
    if cfg.holdout_per_device <= 0:
        return None
    t = cfg.rounds
    done = read_holdout(server.rundir.path)
    if done is not None:
        return done
    pop = server.pop
    deleted = set(server.deleted)
    sizes = {d: len(pop.holdout_rows(d)) for d in range(pop.num_devices)}
    activity = {d: int(a) for d, a in enumerate(pop.activity(1))}
    groups = activity_quartiles(activity)
    in_quartile = {d for g in groups for d in g}
    asked = [d for d, h in sizes.items() if h > 0 and d not in deleted and d in in_quartile]
    noise_at = server.mechanism.holdout_noise_at  # where the count is noised: "device", "aggregate" or "none"
    sigma = float(cfg.holdout_noise_multiplier) if noise_at != "none" else 0.0
    bins = CONFIDENCE_BINS if calibrates_oos(cfg) else 0
    server.ledger.record_holdout(t, server.attempt, release_noise_multiplier(cfg) if noise_at != "none" else 0.0,
                                 noise_at, len(asked), sum(sizes[d] for d in asked))
    arrays = record_from_state(trainable_state(server.model))  # the final release (checkpointed)
    run_record = ConfigRecord(cfg.device_settings())
    round_cfg = ConfigRecord({"server-round": t, "holdout-noise": sigma if noise_at == "device" else 0.0,
                              "oos-bins": bins})
    msgs = [Message(RecordDict({rec.ARRAYS: arrays, rec.RUN: run_record, rec.CONFIG: round_cfg,
                                rec.DEVICE: ConfigRecord({"device-id": d})}),
                    dst_node_id=node_of[d], message_type=MessageType.EVALUATE) for d in asked]
    counts: dict[int, float] = {}
    hist = np.zeros(bins)

    def on_reply(reply: Message, i: int) -> None:
        nonlocal hist
        d = asked[i]
        if reply.has_error():
            return
        value, h, why = rec.validate_holdout_reply(reply.content, bins)
        if why is None:
            counts[d] = value
            if bins:
                hist = hist + h
        else:
            log.warning("holdout evaluation: device %d's reply rejected (%s)", d, why)

    if msgs:
        receive(grid, msgs, cfg.round_deadline_seconds(), on_reply, adaptive=cfg.round_timeout is None,
                control=server.control)
    if len(counts) < len(asked):
        log.warning("holdout evaluation: %d of %d devices did not reply; their examples are left out",
                    len(asked) - len(counts), len(asked))
    quartiles = by_quartile(groups, activity, sizes, counts, noise_at, sigma, server.noise)
    eps = holdout_epsilon(release_noise_multiplier(cfg) if sigma > 0 else 0.0, server.ledger.holdout_release_count(),
                          server.delta, cfg.accountant)
    payload = {
        "version": 1, "round": t, "fraction": cfg.holdout_per_device, "noise_multiplier": sigma, "noise_at": noise_at,
        "epsilon": eps if np.isfinite(eps) else None, "target_delta": server.delta, "accountant": cfg.accountant,
        "devices_asked": len(asked), "devices_replied": len(counts), "quartiles": quartiles,
        "noise_multiplier_release": release_noise_multiplier(cfg) if noise_at != "none" else 0.0,
    }
    if bins:  # the noised histogram of in-scope confidences: the out-of-scope threshold's only input
        if noise_at == "aggregate" and sigma > 0:
            hist = hist + server.noise.normal_numpy((bins,), sigma)
        payload["oos_histogram"] = {
            "score": SCORE, "bins": bins, "counts": [float(x) for x in hist],
            "noise_std_per_bin": sigma * (float(np.sqrt(len(counts))) if noise_at == "device" else 1.0),
            # what it counts: the replied devices' holdout examples (example counts, public like the activity);
            # with an out-of-scope class the in-scope ones are a function of the labels, so not given
            "examples": sum(sizes[d] for d in counts) if pop.data.oos_index is None else None,
        }
    write_holdout(server.rundir.path, payload)
    return payload
