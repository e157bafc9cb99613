"""Example-level epsilon over training examples instead of devices (static data, or the continual
setting's example holdings)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dp.accounting import compute_epsilons
from report.events import device_events
from report.rundata import RunData


@dataclass(frozen=True)
class OverExamples:
    """The distribution of example-level epsilon (nats, at delta) over examples.

    ``examples`` counts the examples the statistics are over (static: every example on a device;
    continual: every example some training device held), ``examples_trained`` those with at least
    one event; ``source`` is ``"holdings"`` or ``"device activity"``.
    """

    max: float
    median: float
    p90: float
    mean: float
    examples: int
    examples_trained: int
    source: str

    def to_json(self) -> dict[str, Any]:
        """``{"max", "median", "p90", "mean", "examples", "examples_trained", "source"}``."""
        return {"max": self.max, "median": self.median, "p90": self.p90, "mean": self.mean,
                "examples": self.examples, "examples_trained": self.examples_trained, "source": self.source}


def over_examples(data: RunData, delta: float, accountant: str, device_eps: dict[int, float]) -> OverExamples:
    """Example-level epsilon of each training example (not each device), at ``delta``.

    An example's privacy loss composes only the device events of the rounds in which its device
    trained *while holding it*: in the static setting that is every event of its device (so
    each example inherits its device's epsilon, and the distribution is the per-device one
    weighted by activity); in the continual setting the ledger's ``example_holdings`` say which
    examples (by stable uid) each device held in each round, so an example that arrived late or
    was deleted early composes fewer events. Examples with identical (device, rounds) histories
    are accounted once.
    """
    values: list[tuple[float, int]] = []  # (epsilon, number of examples with it)
    if data.holdings:
        rounds_of: dict[tuple[int, int], list[int]] = {}
        for t, d, u in data.holdings:
            rounds_of.setdefault((d, u), []).append(t)
        groups: dict[tuple, int] = {}
        for (d, _u), ts in rounds_of.items():
            key = (d, tuple(sorted(set(ts))))
            groups[key] = groups.get(key, 0) + 1
        histories = {}
        for i, (d, ts) in enumerate(groups):
            held = set(ts)
            histories[i] = device_events(data, "example", d, held.__contains__)
        eps = compute_epsilons(histories, delta, accountant)
        values = [(eps[i], n) for i, n in enumerate(groups.values())]
        source = "holdings"
    else:
        for d, info in data.devices.items():
            n = int(info.get("activity") or 0)
            if n:
                values.append((float(device_eps.get(d, 0.0)), n))
        source = "device activity"
    total = sum(n for _, n in values)
    if not total:
        return OverExamples(max=0.0, median=0.0, p90=0.0, mean=0.0, examples=0, examples_trained=0, source=source)
    values.sort()

    def weighted_quantile(p: float) -> float:
        need, seen = p * total, 0
        for e, n in values:
            seen += n
            if seen >= need:
                return e
        return values[-1][0]

    return OverExamples(
        max=values[-1][0],
        median=weighted_quantile(0.5),
        p90=weighted_quantile(0.9),
        mean=sum(e * n for e, n in values) / total,
        examples=total,
        examples_trained=sum(n for e, n in values if e > 0),
        source=source,
    )
