"""Privacy mechanisms: one module each (see :mod:`mechanisms.base` for what a mechanism owns).

* :mod:`mechanisms.fedsgd`: the aggregate placement's algorithm without DP (``--no-dp``, default placement).
* :mod:`mechanisms.fedavg`: FedAvg of local training without DP (``--no-dp --noise-at device``).
* :mod:`mechanisms.local_dpsgd`: local DP-SGD, the noise on the device (``--noise-at device``).
* :mod:`mechanisms.aggregate`: the noise on the aggregate (``--noise-at aggregate``, default).
* :mod:`mechanisms.dp_fedavg`: device-level DP-FedAvg (``--device-dp``).
* :mod:`mechanisms.secure`: noise from the devices under secure aggregation (``--noise-at secure``; SecAgg+ in
  :mod:`mechanisms.secagg`, the discrete noise in :mod:`dp.discrete`).

:func:`mechanism_for` (mechanisms/registry.py) is the one lookup from settings to mechanism.
Plain PyTorch / numpy and dp-accounting: no Flower here.
"""

from mechanisms import aggregate, dp_fedavg, fedavg, fedsgd, local_dpsgd, secure  # noqa: F401  (registers the mechanisms)
from mechanisms.base import Aggregator, Calibration, DeviceReply, DeviceWork, Mechanism, ReplySpec, RoundPlan
from mechanisms.registry import MECHANISMS, mechanism_for, mechanism_name

__all__ = [
    "MECHANISMS", "Aggregator", "Calibration", "DeviceReply", "DeviceWork", "Mechanism", "ReplySpec", "RoundPlan",
    "mechanism_for", "mechanism_name",
]
