"""Errors and exit codes of every ``dpfl`` command, in one place.

A command's ``run(ns) -> int`` is wrapped in :func:`exits`, which maps:

- bad input to one line ``dpfl: error: <message>`` on stderr and exit code 2
  (:data:`EXIT_BAD_INPUT`). Bad input is any :data:`BAD_INPUT` exception: every error type the
  project raises for bad settings, data, models, run directories, clusters or audits
  (``ConfigError``, ``DataError``, ``ModelError``, ``RunDirError``, ``ClusterError``,
  ``NodeCheckError``, ``AuditError``, ``ReportError``) is a ``ValueError``, and a missing file is
  a ``FileNotFoundError``. A command line that does not parse (an unknown flag, a value outside a
  flag's choices, a missing argument) is bad input too: :class:`CommandParser` raises
  :class:`UsageError` instead of argparse's usage dump and ``SystemExit``, and :func:`dpfl.cli.main`
  reports it the same way;
- Ctrl-C (:class:`settings.interrupt.Interrupted`, or a second Ctrl-C's ``KeyboardInterrupt``) to
  one line ``dpfl: <message>`` and exit code 130 (:data:`EXIT_INTERRUPTED`, 128 + SIGINT); a
  SIGTERM stops a run the same way, with exit code 143 (128 + SIGTERM: ``Interrupted.exit_code``);
- a backend failure during a run (:class:`settings.interrupt.BackendLost`: Ray processes died) to
  one line ``dpfl: error: <message>`` and exit code 1 (:data:`EXIT_BACKEND_LOST`).

Anything else is a bug and ends in a traceback.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import Any

from settings.interrupt import BackendLost, Interrupted

__all__ = [
    "BAD_INPUT", "EXIT_BACKEND_LOST", "EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "EXIT_OK", "CommandParser", "Interrupted",
    "UsageError", "exits",
]

EXIT_OK = 0
EXIT_BACKEND_LOST = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

#: The exceptions that mean bad input (exit code 2); see the module docstring.
BAD_INPUT: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


class UsageError(ValueError):
    """The command line does not parse (unknown flag, invalid choice, missing argument): bad input, exit code 2."""


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose parse errors raise :class:`UsageError` (naming ``PROG --help``).

    Its subparsers are of the same class (argparse's default), so ``dpfl simulate --partitioner
    bogus`` ends like any other bad input: one ``dpfl: error: ...`` line and exit code 2, without
    the usage dump of every flag. ``--help`` still prints the help and exits 0.
    """

    def error(self, message: str) -> Any:  # type: ignore[override]
        """Raise :class:`UsageError` with argparse's ``message`` and a pointer to ``--help``."""
        raise UsageError(f"{message} (see `{self.prog} --help`)")

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        """Parse ``args``; an unknown flag names the subcommand's ``--help`` that lists the known ones."""
        ns, rest = self.parse_known_args(args, namespace)
        if rest:
            prog = self.prog
            for action in self._actions:
                if isinstance(action, argparse._SubParsersAction) and getattr(ns, action.dest, None) in action.choices:
                    prog = action.choices[getattr(ns, action.dest)].prog
            raise UsageError(f"unrecognized arguments: {' '.join(rest)} (see `{prog} --help`)")
        return ns


def exits(run: Callable[..., int]) -> Callable[..., int]:
    """Wrap a command's ``run(ns) -> int`` so bad input returns 2 and Ctrl-C returns 130.

    The message goes to stderr as ``dpfl: error: <message>`` (bad input) or ``dpfl: <message>``
    (interrupted); the wrapped function's own return value passes through unchanged.
    """

    @functools.wraps(run)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            return run(*args, **kwargs)
        except Interrupted as exc:
            print(f"dpfl: {exc}", file=sys.stderr)
            return exc.exit_code
        except BackendLost as exc:
            print(f"dpfl: error: {exc}", file=sys.stderr)
            return EXIT_BACKEND_LOST
        except KeyboardInterrupt:
            print("dpfl: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except BAD_INPUT as exc:
            print(f"dpfl: error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT

    return wrapper
