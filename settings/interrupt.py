"""The one ``Interrupted`` exception: Ctrl-C stopped a run, and its run directory is resumable.

It sits at the bottom layer (beside :mod:`settings.config`) so that every layer may raise it: the
server's round loop when the stop event is set, ``dpfl simulate`` and ``dpfl launch`` when the
simulation ended because of Ctrl-C. :mod:`dpfl.commands.errors` turns it into exit code 130.
"""

from __future__ import annotations

__all__ = ["BackendLost", "Interrupted"]


class Interrupted(Exception):
    """Ctrl-C stopped the run; its directory is resumable (the message says how)."""


class BackendLost(Exception):
    """The simulation backend (Ray) failed during a run; the run directory is resumable (the message says how).

    Raised by the round loop when a backend check (:class:`server.control.RunControl`) reports
    a failure, and by ``dpfl simulate`` when the simulation ended because of one.
    :mod:`dpfl.commands.errors` turns it into one ``dpfl: error:`` line and exit code 1.
    """
