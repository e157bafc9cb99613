"""The bottom layer: a run's settings (:mod:`settings.config`, the one RunConfig) and the
exceptions that end a run early (:mod:`settings.interrupt`). Everything above imports these;
they import nothing of the project."""
