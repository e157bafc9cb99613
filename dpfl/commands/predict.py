"""``dpfl predict RUN_OR_DIR [TEXT ...]``: label utterances with a run's or an exported model (see
:mod:`dpfl.commands.export`)."""

from __future__ import annotations

from dpfl.commands.export import add_predict_parser as add_parser
from dpfl.commands.export import run_predict as run

__all__ = ["add_parser", "run"]
