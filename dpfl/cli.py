"""The ``dpfl`` command's front door: the argparse parser, dispatching to :mod:`dpfl.commands`.

Each subcommand is one module of :mod:`dpfl.commands` with ``add_parser(subparsers)`` and
``run(ns) -> int``; errors and exit codes (2 for bad input, 130 for Ctrl-C) are handled in
:mod:`dpfl.commands.errors`. Nothing imports this module but the ``dpfl`` console script.
"""

from __future__ import annotations

import argparse
import os
import sys

from dpfl.commands import audit, export, launch, partitions, predict, report, retrain, simulate
from dpfl.commands.errors import EXIT_BAD_INPUT, CommandParser, UsageError
from dpfl.commands.logs import quiet

__all__ = ["COMMANDS", "build_parser", "main"]

#: The subcommands, in the order ``dpfl --help`` lists them.
COMMANDS = {"simulate": simulate, "retrain": retrain, "report": report, "launch": launch, "partitions": partitions,
            "audit": audit, "export": export, "predict": predict}


def build_parser() -> argparse.ArgumentParser:
    """The ``dpfl`` parser with every subcommand of :data:`COMMANDS` (parse errors raise :class:`UsageError`)."""
    parser = CommandParser(prog="dpfl", description="Federated NLU training with differential privacy")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``dpfl``): parse ``argv``, run the subcommand, return its exit code.

    A command line that does not parse returns 2 after one ``dpfl: error: ...`` line, as any bad input.
    """
    try:
        ns = build_parser().parse_args(argv)
    except UsageError as exc:
        print(f"dpfl: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    quiet()
    code = COMMANDS[ns.command].run(ns)
    if simulate.STUCK.is_set():
        # a device task never returned: end now instead of waiting for Flower's hung threads
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
