"""What several report sections share: the run as read (:class:`~report.rundata.RunData`) and the
facts resolved from it once (DP flags, noise placement, delta, accountant, each accounted unit's
per-device epsilon), with the warnings the sections add while they compute."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dp.accounting import ACCOUNTANTS
from report.events import unit_epsilons
from report.rundata import UNITS, ReportError, RunData

#: Where the example-level noise can be added (``noise_at`` in config.toml): on the device (DP-SGD),
#: on the aggregate (by the server), or in shares on the devices summed under secure aggregation.
NOISE_PLACEMENTS = ("device", "aggregate", "secure")
#: The example-level noise placement of each mechanism that charges example-level events, by the
#: name the ledger records (``privacy_events.mechanism_name``; mechanisms/registry.py
#: ``mechanism_name``: DP-FedAvg runs local DP-SGD on the devices, as --device-dp refuses --noise-at aggregate).
MECHANISM_PLACEMENT = {"local-dpsgd": "device", "dp-fedavg": "device", "aggregate": "aggregate", "secure": "secure"}


def noise_placement(data: RunData) -> str:
    """Where the example-level noise was added: ``noise_at`` from config.toml when recorded, else from
    the mechanism the ledger's example-level events name, else ``"device"`` (the placement of every
    run before ``noise_at`` existed, whose ledgers name no mechanism)."""
    if data.config.get("noise_at"):
        return str(data.config["noise_at"])
    placements = {MECHANISM_PLACEMENT[m] for m in data.example_mechanisms if m in MECHANISM_PLACEMENT}
    return placements.pop() if len(placements) == 1 else "device"


def not_private_reason(any_dp: bool, reproducible: bool, zero_noise: tuple[str, ...] = ()) -> str | None:
    """Why the run has no privacy guarantee (None when it has one); the report's first line states it.

    Parameters
    ----------
    any_dp : bool
        Example-level (``dp``) or device-level (``device_dp``) DP was on.
    reproducible : bool
        ``reproducible_noise`` in config.toml: the noise was derived from the recorded seed.
    zero_noise : tuple of str
        The DP levels that were on with a noise multiplier of 0 (``--allow-zero-noise``):
        ``"example"`` and/or ``"device"``.
    """
    if zero_noise:
        return (f"the {' and '.join(zero_noise)}-level noise multiplier is 0 (--allow-zero-noise): updates were "
                "clipped but no noise was added, so epsilon is infinite and no differential privacy guarantee "
                "holds")
    if not any_dp:
        return ("dp = false and device_dp = false; no noise was added, so no differential privacy "
                "guarantee holds")
    if reproducible:
        return ("this run used --reproducible-noise; its noise can be regenerated from the seed in config.toml "
                "(so can its secret sampling decisions), so no differential privacy guarantee holds")
    return None


def withheld_units(dp_on: bool, device_dp: bool, cfg: dict[str, Any], budget_events: list[dict[str, Any]]) -> tuple[str, ...]:
    """The units whose per-device figures (which device has which epsilon, which device reached its
    budget) the report withholds, in :data:`~report.rundata.UNITS` order.

    Without device-level DP nothing is withheld: no amplification by device selection is claimed,
    and the report names devices as it always has. Under device-level DP the device-level guarantee
    is amplified by the secret Poisson selection of devices, so which devices joined a round is
    secret, and a released per-device figure must not depend on participation:

    - ``"example"`` (when example-level DP is on too): example-level events exist only for the
      devices that joined a round, so a device's example-level epsilon (0 if it never joined), the
      device with the largest one, and its example-level budget events all reveal participation.
    - ``"device"`` only when example-level DP is on with an example-level budget (``max_epsilon`` or
      ``target_epsilon`` in config.toml, or an example-level budget event on record). Otherwise a
      device's device-level events are one per round in which its q_k > 0, selected or not
      (``mechanisms.base.Mechanism.accounted``; q_k from its own activity, its deletion request and
      its device-level budget, itself composed of those events), so its device-level epsilon does not
      depend on participation and is released. But a device whose example-level budget runs out
      (which depends on the rounds it joined) gets q_k = 0 from then on (``server.state.Server.probabilities``)
      and stops accruing device-level events, so its device-level epsilon would reveal how often it joined.
    """
    if not device_dp:
        return ()
    out = []
    if dp_on:
        out.append("example")
        if (cfg.get("max_epsilon") is not None or cfg.get("target_epsilon") is not None
                or any(b.get("unit") == "example" for b in budget_events)):
            out.append("device")
    return tuple(out)


@dataclass(frozen=True)
class Facts:
    """The few facts about a run that most sections branch on, for computing and for rendering.

    ``dp_on`` is example-level DP, ``device_dp`` device-level DP; ``noise_at`` the example-level
    noise placement (``"device"``, ``"aggregate"`` or ``"secure"``; None when ``dp_on`` is false);
    ``reproducible_noise`` as in config.toml; ``delta`` (None only for a run without DP) and
    ``accountant`` (``"pld"`` or ``"rdp"``) are those every epsilon of the report is stated at
    and recomputed with; ``not_private`` says why no guarantee holds (None when one does);
    ``has_baseline`` whether a non-private baseline run was given; ``withheld`` the units whose
    per-device figures the report leaves out (:func:`withheld_units`; empty without device-level DP).
    """

    dp_on: bool
    device_dp: bool
    noise_at: str | None
    reproducible_noise: bool
    delta: float | None
    accountant: str
    not_private: str | None
    has_baseline: bool
    withheld: tuple[str, ...] = ()

    @property
    def participation_secret(self) -> bool:
        """Device-level DP is on: its guarantee is amplified by the secret Poisson selection of devices, so
        which devices joined a round is secret and the report gives no figure tied to one device's participation."""
        return self.device_dp

    @property
    def any_dp(self) -> bool:
        """Whether any guarantee was meant to hold (example level, device level or both)."""
        return self.dp_on or self.device_dp

    @property
    def aggregate(self) -> bool:
        """Example-level noise added on the aggregate (by the server) rather than on the device."""
        return self.dp_on and self.noise_at == "aggregate"

    @property
    def secure(self) -> bool:
        """Example-level noise added in shares on the devices (Skellam) and summed under secure aggregation:
        the server only unmasks the noisy sum."""
        return self.dp_on and self.noise_at == "secure"

    @property
    def cohort_sum(self) -> bool:
        """The example-level release is one noisy sum of the cohort's per-example clipped gradients per round
        (the aggregate or the secure placement): no local steps, one event per round joined, and the server
        divides the sum by the expected number of examples. Who adds the noise differs (:attr:`secure`)."""
        return self.aggregate or self.secure

    @property
    def integer_rdp(self) -> bool:
        """The example-level epsilons are Renyi DP at integer orders whatever ``accountant`` says: a secure
        run's events are the Skellam mechanism's zCDP bound (``ZCDpEvent``), which dp.accounting composes with
        dp-accounting's RDP accountant at integer orders (``INTEGER_RDP_ORDERS``)."""
        return self.secure

    @property
    def reproducible(self) -> bool:
        """A private run whose noise came from the recorded seed (``--reproducible-noise``): no guarantee holds."""
        return self.any_dp and self.reproducible_noise


@dataclass
class Context:
    """What a section's ``compute`` reads: the run, its baseline, the shared facts and epsilons.

    ``epsilons`` maps each accounted unit (example level when ``dp_on``, device level when
    ``device_dp``) to device id -> epsilon (nats, at ``facts.delta``), recomputed from the
    ledger's events. ``warnings`` collects what the sections want the reader told, in order.
    """

    data: RunData
    baseline: RunData | None
    facts: Facts
    rounds_completed: int
    num_devices: int | None
    num_examples: int | None
    max_curve_points: int
    epsilons: dict[str, dict[int, float]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def cfg(self) -> dict[str, Any]:
        """The run's config.toml (empty when absent)."""
        return self.data.config

    @property
    def run(self) -> dict[str, Any]:
        """The ledger's ``runs`` row of this run (empty when absent)."""
        return self.data.run_row or {}

    def accounted(self, unit: str) -> bool:
        """Whether ``unit`` has noise of its own in this run (so per-device epsilons exist)."""
        return unit in self.epsilons


def resolve(data: RunData, baseline: RunData | None, max_curve_points: int) -> Context:
    """Resolve the shared facts of ``data`` and recompute each accounted unit's per-device epsilon.

    Raises
    ------
    ReportError
        If no delta is recorded in the ledger or config of a DP run.
    """
    cfg = data.config
    run = data.run_row or {}
    dp_on = bool(cfg.get("dp", True))
    device_dp = bool(cfg.get("device_dp", bool(data.events["device"])))
    any_dp = dp_on or device_dp
    noise_at = noise_placement(data) if dp_on else None
    reproducible = bool(cfg.get("reproducible_noise", False))
    delta = run.get("target_delta") if run.get("target_delta") is not None else cfg.get("target_delta")
    accountant = run.get("accountant") or cfg.get("accountant") or "pld"
    warnings = list(data.warnings)
    if accountant not in ACCOUNTANTS:
        warnings.append(f"unknown accountant {accountant!r} in the ledger; recomputed with 'pld'")
        accountant = "pld"
    if noise_at is not None and noise_at not in NOISE_PLACEMENTS:
        warnings.append(f"unknown noise placement noise_at = {noise_at!r} in config.toml; the report assumes "
                        "'device' for its wording, and the epsilons come from the ledger's events as recorded")
        noise_at = "device"
    if delta is None and any_dp:
        raise ReportError(
            "no target_delta in ledger.sqlite (runs table) or config.toml: cannot state epsilon"
        )
    zero_noise = tuple(level for level, on, key in (("example", dp_on, "noise_multiplier"),
                                                     ("device", device_dp, "device_noise_multiplier"))
                       if on and cfg.get(key) is not None and float(cfg[key]) == 0.0)
    facts = Facts(dp_on=dp_on, device_dp=device_dp, noise_at=noise_at, reproducible_noise=reproducible,
                  delta=delta, accountant=accountant, not_private=not_private_reason(any_dp, reproducible, zero_noise),
                  has_baseline=baseline is not None,
                  withheld=withheld_units(dp_on, device_dp, cfg, data.budget_events))
    ctx = Context(
        data=data, baseline=baseline, facts=facts, max_curve_points=max_curve_points, warnings=warnings,
        rounds_completed=max([r["round"] for r in data.rounds] + [m["round"] for m in data.metrics], default=0),
        num_devices=len(data.devices) or cfg.get("num_devices"),
        num_examples=sum(int(v["activity"] or 0) for v in data.devices.values()) if data.devices else None,
    )
    for unit, on in zip(UNITS, (dp_on, device_dp)):
        if on:
            ctx.epsilons[unit] = unit_epsilons(data, unit, delta, accountant)
    return ctx
