"""Run control: how a run is stopped from outside, and the wait for a round's replies.

A :class:`RunControl` is made by whoever starts the run (``dpfl simulate``; a fresh one for
``flwr run .`` and in-process tests) and passed to the ServerApp, the :class:`server.state.Server`
and every wait (:func:`receive`). It replaces module-level globals: two runs in one process
each have their own stop flag, backend checks and outcome.
"""

from __future__ import annotations

import threading
import time

from flwr.app import Message
from flwr.serverapp import Grid

from settings.interrupt import BackendLost, Interrupted


class RunControl:
    """The stop flag, the backend health checks and the outcome of one run.

    Parameters
    ----------
    checks : sequence of callables, optional
        Health checks of the simulation backend, polled while a round waits: each returns None
        while the backend is healthy, else the reason it failed (``dpfl simulate`` gives one for
        its own Ray instance). A failure ends the round with :class:`settings.interrupt.BackendLost`.
    check_seconds : float
        Seconds between two polls of ``checks``.

    Attributes
    ----------
    stop : threading.Event
        Set (e.g. by ``dpfl simulate``'s SIGINT handler) to stop the run at the next safe point:
        the round in flight is abandoned (its privacy events are already in the ledger) and the
        run stays resumable from its last checkpoint.
    outcome : dict
        What the ServerApp leaves for the command that started it: ``result`` (the run's
        summary), ``backend_lost`` (``{"reason": ...}``), ``done`` (the server has returned) and
        ``reported`` (the failure line was printed).
    progress : callable or None
        ``progress(replied, sent)``, called as a round's replies arrive (the progress bar's
        line; for the operator's terminal only, never written to the run directory).
    """

    def __init__(self, checks=(), check_seconds: float = 1.0):
        self.stop = threading.Event()
        self.checks = list(checks)
        self.check_seconds = float(check_seconds)
        self.outcome: dict = {}
        self.progress = None
        self._checked = 0.0

    def poll(self) -> None:
        """Raise if the run must stop now (checks polled at most every ``check_seconds``).

        Raises
        ------
        settings.interrupt.Interrupted
            When :attr:`stop` is set (Ctrl-C).
        settings.interrupt.BackendLost
            When a check reports a failure.
        """
        if self.stop.is_set():
            raise Interrupted("interrupted")
        now = time.time()
        if self.checks and now - self._checked >= self.check_seconds:
            self._checked = now
            for check in self.checks:
                reason = check()
                if reason:
                    raise BackendLost(reason)


def receive(grid: Grid, msgs: list[Message], timeout: float, on_reply, adaptive: bool = False,
            control: RunControl | None = None) -> float:
    """Push ``msgs``; call ``on_reply(reply, i)`` on each reply as it is pulled (``i``: the index in
    ``msgs`` of the message it answers, so a node that serves several devices is never asked who
    it is), until every reply is in, ``timeout`` seconds have passed, or ``control`` stops the
    run; return the seconds waited.

    ``adaptive`` (``--round-timeout`` unset): once half of the messages have been answered,
    after h seconds, the rest get ``max(ROUND_TIMEOUT_FLOOR, ROUND_TIMEOUT_FACTOR * h)`` more
    seconds (never past ``timeout``), so a hung device costs the round about ten times a
    typical device's time, not an hour.

    Raises
    ------
    settings.interrupt.Interrupted
        When ``control.stop`` is set (Ctrl-C); the round is abandoned at once (its privacy
        events are already in the ledger).
    settings.interrupt.BackendLost
        When a backend check of ``control`` reports a failure (the round is abandoned likewise).
    """
    from settings.config import ROUND_TIMEOUT_FACTOR, ROUND_TIMEOUT_FLOOR

    control = control if control is not None else RunControl()
    index = {mid: i for i, mid in enumerate(grid.push_messages(msgs))}
    ids = set(index)
    total = len(ids)
    del msgs
    start = time.time()
    end = start + timeout
    half_done = False
    control._checked = start
    while ids and time.time() < end:
        got = [m for m in grid.pull_messages(ids) if m.metadata.reply_to_message_id in ids]
        for m in got:
            ids.discard(m.metadata.reply_to_message_id)
            on_reply(m, index[m.metadata.reply_to_message_id])
        control.poll()
        if adaptive and not half_done and total - len(ids) >= (total + 1) // 2:
            half_done = True
            h = time.time() - start
            end = min(end, time.time() + max(ROUND_TIMEOUT_FLOOR, ROUND_TIMEOUT_FACTOR * h))
        if ids:
            time.sleep(0.1)
    return time.time() - start
