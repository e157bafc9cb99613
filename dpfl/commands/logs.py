"""Quiet process setup for every ``dpfl`` command: offline hub, no telemetry, only useful log lines."""

from __future__ import annotations

import logging
import os
import warnings

__all__ = ["DpflFormatter", "DropFlowerNoise", "quiet"]


def quiet() -> None:
    """Set the environment and loggers so a run prints only what concerns a dpfl user.

    Sets (unless already set) offline Hugging Face hub, no progress bars or telemetry, no
    tokenizer threads, Ray log de-duplication; silences Opacus and deprecation warnings; logs
    dpfl's own INFO lines and other libraries' WARNING and above (:class:`DpflFormatter`), and
    drops Flower's own noise (:class:`DropFlowerNoise`).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    warnings.filterwarnings("ignore", module="opacus")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    handler = logging.StreamHandler()
    handler.setFormatter(DpflFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])  # no-op where the root logger has handlers
    logging.getLogger("dpfl").setLevel(logging.INFO)  # dpfl's own information; other libraries' warnings
    for name in ("flwr", "flower", "ray", "opacus", "transformers", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
    flwr_log = logging.getLogger("flwr")
    flwr_log.propagate = False  # Flower has its own console handler
    flwr_log.addFilter(DropFlowerNoise())


class DropFlowerNoise(logging.Filter):
    """Drop Flower's messages that do not concern a dpfl user (deprecations, debug chatter)."""

    #: Flower's own tracebacks of a device task that failed because Ray did (the round loop reports
    #: the lost device in one line, and a failed backend ends the run with one error line).
    RAY_FAILURES = ("ray.exceptions.", "ActorPool is empty")
    NOISE = ("DEPRECATED FEATURE", "fraction_evaluate is set to 0.0", "deprecated feature", "injected fault",
             *RAY_FAILURES)

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep INFO and above unless the message is one of :attr:`NOISE`."""
        msg = str(record.msg)
        return record.levelno >= logging.INFO and not any(n in msg for n in self.NOISE)


class DpflFormatter(logging.Formatter):
    """``dpfl: MESSAGE`` for information (noise calibration, resume, deletions in effect) and
    ``dpfl: warning: MESSAGE`` for what may need the user's attention (a failed device, an
    empty cohort of devices without examples); errors end a command elsewhere (``dpfl: error:``)."""

    def format(self, record: logging.LogRecord) -> str:
        """dpfl's records (logger ``dpfl.*``): the prefix by level, then the message; others as
        the format given."""
        if record.name != "dpfl" and not record.name.startswith("dpfl."):
            return super().format(record)
        prefix = "dpfl: " if record.levelno < logging.WARNING else "dpfl: warning: "
        return prefix + record.getMessage()
