"""The one error type partitions/ raises for bad input data.

The command line maps :class:`DataError` to exit code 2 ("bad input"), so every
problem a user can fix by editing their data files, or by choosing another data
source, is reported as a ``DataError`` whose message names the file and, where
there is one, the 1-based line.
"""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Input data is missing, unreadable or malformed.

    The message is meant for the user as is, e.g.
    ``"train.jsonl:17: not valid JSON: Expecting ',' delimiter (column 12)"``.
    It subclasses :class:`ValueError` so callers that only know about
    ``ValueError`` still catch it.
    """
