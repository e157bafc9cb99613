"""The registry of privacy mechanisms and the one lookup from a run's settings to its mechanism.

Each mechanism module registers its class with :func:`register`; :func:`mechanism_for` is the
only place that reads the placement flags (``--no-dp``, ``--noise-at``, ``--device-dp``).
"""

from __future__ import annotations

MECHANISMS: dict[str, type] = {}


def register(cls):
    """Class decorator: make a :class:`mechanisms.base.Mechanism` subclass findable by its ``name``."""
    MECHANISMS[cls.name] = cls
    return cls


def mechanism_name(cfg) -> str:
    """The name of the mechanism a RunConfig selects.

    ``--device-dp``: DP-FedAvg (with local DP-SGD on the devices unless ``--no-dp``);
    ``--no-dp``: the algorithm of ``--noise-at`` without clipping or noise (FedSGD for
    ``aggregate``, FedAvg of local training for ``device``); else the example-level placement of
    ``--noise-at`` (``secure``: noise from the devices under secure aggregation).
    """
    if cfg.device_dp:
        return "dp-fedavg"
    if not cfg.dp:
        return {"device": "fedavg", "aggregate": "fedsgd"}[cfg.noise_at]
    return {"device": "local-dpsgd", "aggregate": "aggregate", "secure": "secure"}[cfg.noise_at]


def mechanism_for(cfg):
    """The run's mechanism, built from its settings.

    Raises
    ------
    KeyError
        If no mechanism is registered under the selected name.
    """
    return MECHANISMS[mechanism_name(cfg)](cfg)
