"""Side work at the end of each round, as callbacks: evaluation, checkpoint, metrics line.

The round loop (:func:`server.round.run_round`) calls each hook of ``server.hooks`` in order
as ``hook(server, t, arrays, outcome, clock)``. The default order is the write order the
ledger's durability argument needs: evaluate (the released model, on the test split) ->
checkpoint (model, server state) -> the ledger's ``rounds`` row -> the metrics line.
"""

from __future__ import annotations

import time

from server.releases import is_release


def evaluate(server, t: int, arrays, out, clock) -> None:
    """Every ``--eval-every`` rounds, at every release and at the last round: the task's metrics on
    the test split; at a release also its flip rates (:mod:`server.releases`: ``release``,
    ``nfr``, ``pfr``, ``nfr_baseline``, ``pfr_baseline`` in the metrics line)."""
    cfg = server.cfg
    release = is_release(t, cfg.rounds, cfg.release_every, cfg.eval_every)
    if not (t % cfg.eval_every == 0 or t == cfg.rounds or release):
        return
    m = server.evaluate(arrays, with_correct=release)
    if release:
        keep = {k: v.numpy() for k, v in arrays.items()} if cfg.pc_weight > 0 else None  # the next rounds' teacher
        out.extra.update(server.releases.release(t, m.pop("correct"), keep))
    for k in server.task.metric_names:
        if k in m:
            if k in ("accuracy", "macro_f1", "test_loss"):
                setattr(out, k, m[k])
            else:
                out.extra[k] = m[k]
    clock.lap("evaluate")
    out.extra["eval_seconds"] = clock.phase["evaluate"]


def checkpoint(server, t: int, arrays, out, clock) -> None:
    """Close the round's timings, save the global model and server state, then the ``rounds`` row."""
    clock.lap("accounting")
    out.seconds = time.perf_counter() - clock.t0
    out.extra["phase_seconds"] = {k: round(v, 4) for k, v in clock.phase.items()}
    server.save_checkpoint(arrays, t, out, iterate=server.current_iterate)
    server.ledger.complete_round(t, out.cohort_size, server.attempt)


def metrics_line(server, t: int, arrays, out, clock) -> None:
    """Append the round's line to metrics.jsonl (last: a line exists only for a complete round)."""
    server.rundir.append_metrics(out.to_json())


DEFAULT_HOOKS = (evaluate, checkpoint, metrics_line)
