"""The privacy budget report of a run directory (``dpfl report RUN_DIR``).

:func:`build_report` reads ``RUN_DIR`` (config.toml, metrics.jsonl, ledger.sqlite,
read-only, so it also works on a run still in progress), recomputes every device's
epsilon from the ledger's privacy events with :mod:`dp.accounting`, and writes
``RUN_DIR/report/``: ``report.md``, ``report.html`` (self-contained), PNG plots and
``summary.json`` (schema in :mod:`report.build`, record :class:`rundir.records.Summary`).

One module per section in :mod:`report.sections` (registered in reading order), each with a typed
``compute`` and its ``render``; :mod:`report.rundata` reads the run, :mod:`report.context` resolves
what the sections share, :mod:`report.render` writes the blocks as Markdown and HTML.
"""

from report.build import ReportError, build_report, compute_summary, read_run

__all__ = ["build_report", "compute_summary", "read_run", "ReportError"]
