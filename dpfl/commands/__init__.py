"""The ``dpfl`` subcommands, one module each, dispatched by :mod:`dpfl.cli`.

Every command module has ``add_parser(subparsers)`` and ``run(ns) -> int`` (wrapped in
:func:`dpfl.commands.errors.exits`):

simulate
    the federated DP run on one machine; also :func:`~dpfl.commands.simulate.simulate`,
    :func:`~dpfl.commands.simulate.preflight` for programs and tests.
launch
    the same run on an existing multi-node Ray cluster (node checks first).
report
    the privacy budget report of a run directory.
audit
    measured leakage of a finished run (membership inference, canaries).
partitions
    a device partition's sizes, skew and plots, without training.

Shared pieces: :mod:`~dpfl.commands.flags` (the RunConfig flags), :mod:`~dpfl.commands.errors`
(exit codes), :mod:`~dpfl.commands.logs` (quiet process setup). Command modules import each
other's public names only.
"""
