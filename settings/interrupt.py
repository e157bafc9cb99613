"""The one ``Interrupted`` exception: Ctrl-C stopped a run, and its run directory is resumable.

It sits at the bottom layer (beside :mod:`settings.config`) so that every layer may raise it: the
server's round loop when the stop event is set, ``dpfl simulate`` and ``dpfl launch`` when the
simulation ended because of Ctrl-C. :mod:`dpfl.commands.errors` turns it into exit code 130.
"""

from __future__ import annotations

__all__ = ["BackendLost", "Interrupted"]


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) stopped the run; its directory is resumable (the message says how).

    ``exit_code``: what the command exits with, 128 + the signal (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str = "interrupted", exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class BackendLost(Exception):
    """The simulation backend (Ray) failed during a run; the run directory is resumable (the message says how).

    Raised by the round loop when a backend check (:class:`server.control.RunControl`) reports
    a failure, and by ``dpfl simulate`` when the simulation ended because of one.
    :mod:`dpfl.commands.errors` turns it into one ``dpfl: error:`` line and exit code 1.
    """
