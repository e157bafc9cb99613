"""Activity quartiles: the one split of the devices by how much data they hold, used by the report's
epsilon-by-quartile table and the holdout evaluation's accuracy by quartile."""

from __future__ import annotations

__all__ = ["activity_quartiles"]


def activity_quartiles(activity: dict[int, int]) -> list[list[int]]:
    """The devices holding data, by activity quartile: four lists of device ids, Q1 the lightest.

    Devices with activity > 0 are sorted by (activity, device id) and cut into four groups of
    (nearly) equal size, group q holding sorted positions ``q n // 4 .. (q + 1) n // 4 - 1``.
    Empty list with fewer than 4 such devices.
    """
    held = sorted((int(a), int(d)) for d, a in activity.items() if int(a) > 0)
    n = len(held)
    if n < 4:
        return []
    return [[d for _, d in held[q * n // 4:(q + 1) * n // 4]] for q in range(4)]

