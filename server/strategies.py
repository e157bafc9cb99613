"""Aggregation strategies (Flower's) and the grid view that restricts them to our cohort.

Cohort selection is ours (server/selection.py: activity-weighted Poisson); message
construction and aggregation are Flower's strategies. :class:`CohortGrid` exposes only the
selected nodes, and the strategy is configured to take every node it sees, so Flower's own
``configure_train`` (which also injects e.g. FedProx's ``proximal-mu`` and lets FedAdam record
the current weights) builds exactly the cohort's messages.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx


class CohortGrid:
    """A read-only view of ``grid`` whose ``get_node_ids`` returns only ``node_ids``."""

    def __init__(self, grid: Grid, node_ids: list[int]):
        self._grid = grid
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    def __getattr__(self, name):
        return getattr(self._grid, name)


def make_strategy(cfg):
    """Flower strategy named by ``cfg.strategy`` ("fedavg", "fedprox", "fedadam"; "auto" resolved by
    :meth:`settings.config.RunConfig.resolved_strategy`).

    Every strategy takes all nodes of the cohort grid (fraction 1, no minimum) and does no
    federated evaluation (the server evaluates the global model centrally). FedAvg weights
    updates by each device's example count (``num-examples``).

    Raises
    ------
    ValueError
        For an unknown strategy name.
    """
    common = dict(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=0,
        min_evaluate_nodes=0,
        min_available_nodes=0,
    )
    name = cfg.resolved_strategy()
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(proximal_mu=cfg.proximal_mu, **common)
    if name == "fedadam":
        return FedAdam(eta=cfg.resolved_server_learning_rate(), **common)
    raise ValueError(f"--strategy: unknown strategy {cfg.strategy!r}")
