"""The "Mechanism parameters" table: schedule, example-level and device-level mechanism, strategy, model, data.

Configured values come from config.toml; the ranges "in the ledger" from the privacy events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from report.blocks import Block, fmt, fmt_range, param
from report.context import Context, Facts
from report.events import LedgerRanges, Range, zcdp_events
from report.sections.base import Doc, Section


@dataclass(frozen=True)
class Mechanism:
    """The schedule (``rounds_planned`` / ``rounds_completed``), ``num_devices``, the run's config.toml,
    and the ledger's parameter ranges of each accounted unit (None when that unit has no noise)."""

    facts: Facts
    rounds_planned: int | None
    rounds_completed: int
    num_devices: int | None
    config: dict[str, Any]
    example: LedgerRanges | None
    device: LedgerRanges | None
    secure: "SecureRounds | None" = None

    def to_json(self) -> dict[str, Any]:
        """Nothing of its own in summary.json (the ranges are under ``epsilon.<unit>.mechanism``)."""
        return {}


@dataclass(frozen=True)
class SecureRounds:
    """What a secure run's metrics.jsonl and ledger say of its rounds (``--noise-at secure``): the rounds
    with a ``secure_*`` record (``rounds``), those abandoned (``abandoned``), the mean bytes a device sent
    per round (``bytes_per_device``, over the cohort and all exchanges), and the distinct zCDP events
    ``(rho, xi)`` the ledger's example-level events hold (``zcdp``)."""

    rounds: int
    abandoned: tuple[int, ...]
    bytes_per_device: Range | None
    zcdp: tuple[tuple[float, float], ...]

    @classmethod
    def of(cls, ctx: Context) -> "SecureRounds":
        """The secure rounds of ``ctx``'s run."""
        lines = [m for m in ctx.data.metrics if "secure_abandoned" in m]
        return cls(rounds=len(lines), abandoned=tuple(int(m["round"]) for m in lines if m.get("secure_abandoned")),
                   bytes_per_device=Range.of([float(m["secure_bytes_per_device"]) for m in lines
                                              if m.get("secure_bytes_per_device") is not None]),
                   zcdp=tuple(sorted((float(e.rho), float(e.xi)) for e in zcdp_events(ctx.data, "example"))))


def compute(ctx: Context) -> Mechanism:
    """The mechanism's configured parameters and the ledger's ranges."""
    return Mechanism(facts=ctx.facts, rounds_planned=ctx.cfg.get("rounds"), rounds_completed=ctx.rounds_completed,
                     num_devices=ctx.num_devices, config=ctx.cfg,
                     example=LedgerRanges.of(ctx.data, "example") if ctx.accounted("example") else None,
                     device=LedgerRanges.of(ctx.data, "device") if ctx.accounted("device") else None,
                     secure=SecureRounds.of(ctx) if ctx.facts.secure else None)


def render(m: Mechanism, doc: Doc) -> list[Block]:
    """The table: schedule, the example-level rows (:func:`_example_rows`), the device-level rows
    (:func:`_device_rows`), strategy, model and data set."""
    cfg = m.config
    rows = [
        ["rounds (planned / committed)", f"{fmt(m.rounds_planned)} / {m.rounds_completed}"],
        ["expected cohort size", param(cfg, "cohort_size")],
        ["devices", fmt(m.num_devices)],
    ]
    if not m.facts.cohort_sum:
        rows += [["local epochs", param(cfg, "local_epochs")],
                 ["expected local batch size", param(cfg, "batch_size")]]
    rows += _example_rows(m)
    rows += _device_rows(m)
    rows += _correlation_rows(m)
    rows += [["strategy", param(cfg, "strategy")], ["model", param(cfg, "model")],
             ["dataset", param(cfg, "dataset") if "dataset" in cfg else (param(cfg, "data_dir") if "data_dir" in cfg else "built-in synthetic home-assistant set (generated)")]]
    return [("h", 3, "Mechanism parameters"), ("table", ["parameter", "value"], rows)]


def _example_rows(m: Mechanism) -> list[list[str]]:
    """The example-level rows: where the noise goes, sigma, C, p, and the ledger's ranges."""
    cfg, run = m.config, m.facts
    rows: list[list[str]] = []
    if run.secure:
        return _secure_rows(m)
    if run.dp_on:
        rows += [
            ["example level: noise added", "on the aggregate (by the server, once per round, to the cohort's sum)"
             if run.aggregate else "on the device (DP-SGD, at every local step)"],
            ["example level: noise multiplier sigma", param(cfg, "noise_multiplier")],
            ["example level: clipping norm C (max_grad_norm)", param(cfg, "max_grad_norm")
             + (" (where the adaptive clip started)" if _adaptive(cfg) and not run.device_dp else "")],
        ]
        if _adaptive(cfg) and not run.device_dp:
            rows += _adaptive_rows(cfg, "noise_multiplier", "C", "example gradient norms" if run.aggregate else
                                   "example gradient norms, after every local step on each device (each round "
                                   "starts from the geometric mean of the devices' final C)", m.example)
        if run.aggregate:
            rows += [["example level: example sampling rate p", param(cfg, "sample_rate")],
                     ["server learning rate", param(cfg, "server_learning_rate")]]
    else:
        rows.append(["example-level noise and clipping", "not applied (dp = false)"])
    r = m.example
    if r is not None:
        if run.aggregate:
            rows += [
                ["example level: sampling rate p in the ledger", fmt_range(r.sample_rate)],
                ["example level: noisy sums per round joined", fmt_range(r.steps_per_event)],
                ["example level: rounds composed, most-trained device", fmt(r.total_steps_max_device)],
            ]
        else:
            rows += [
                ["example level: sigma in the ledger", fmt_range(r.noise_multiplier)],
                ["example level: sample rate q = batch / examples held", fmt_range(r.sample_rate)],
                ["example level: local steps per round", fmt_range(r.steps_per_event)],
                ["example level: total steps, most-trained device", fmt(r.total_steps_max_device)],
            ]
    return rows


def _secure_rows(m: Mechanism) -> list[list[str]]:
    """The example-level rows of ``--noise-at secure``: the Skellam noise, the quantisation, secure aggregation
    (SecAgg or SecAgg+, bits, dropout tolerance, abandoned rounds) and the ledger's events."""
    cfg, sec, r = m.config, m.secure, m.example
    k = cfg.get("secagg_neighbours")
    rows = [
        ["example level: noise added", "on the devices, in shares (each selected device adds Skellam noise of "
         "variance mu / n_min per coordinate to its rounded sum); the server only unmasks their sum"],
        ["example level: noise multiplier sigma", param(cfg, "noise_multiplier")],
        ["example level: clipping norm C (max_grad_norm)", param(cfg, "max_grad_norm")],
        ["example level: example sampling rate p", param(cfg, "sample_rate")
         + " (every example of a selected device is in the sum)"],
        ["example level: noise in the sum", "Skellam, variance at least mu = (sigma Delta_2)^2 per coordinate when at "
         "least n_min devices are in the sum (decoded: standard deviation at least sigma C), fresh each round"],
        ["example level: quantisation", "randomised Hadamard rotation, scale gamma, conditional randomised rounding "
         "of each example to L2 norm at most Delta_2 (Kairouz, Liu & Steinke 2021)"],
        ["secure aggregation", f"SecAgg+ (Bell et al. 2020): secrets shared with k = {int(k)} ring neighbours (with "
         f"every other device when the cohort has at most {int(k) + 1})" if k is not None else
         "SecAgg (Bonawitz et al. 2017): secrets shared with every other device of the round"],
        ["secure aggregation: bits per coordinate b", param(cfg, "secure_bits") + " (the sum is taken mod 2^b)"],
        ["secure aggregation: dropout tolerance f", param(cfg, "dropout_tolerance")
         + " (noise sized for n_min = n - floor(f n) devices of a cohort of n)"],
    ]
    if sec is not None and sec.rounds:
        rows.append(["secure aggregation: rounds abandoned (no noisy sum released)", f"{len(sec.abandoned)} of {sec.rounds}"
                     + (f" (round{'s' if len(sec.abandoned) > 1 else ''} {', '.join(map(str, sec.abandoned))})"
                        if sec.abandoned else "")])
        if sec.bytes_per_device is not None:
            rows.append(["secure aggregation: bytes a device sent per round (mean over the cohort, all exchanges)",
                         fmt_range(sec.bytes_per_device)])
    rows.append(["server learning rate", param(cfg, "server_learning_rate")])
    if sec is not None and sec.zcdp:
        rows.append(["example level: event per round joined, in the ledger", "; ".join(
            f"ZCDpEvent(rho = {fmt(rho)}, xi = {fmt(xi)}), the Skellam bound (Agarwal, Kairouz & Liu 2021, "
            "Theorem 3.5)" for rho, xi in sec.zcdp)])
    if r is not None:
        rows += [["example level: events per round joined", fmt_range(r.steps_per_event)],
                 ["example level: rounds composed, most-trained device", fmt(r.total_steps_max_device)]]
    return rows


def _device_rows(m: Mechanism) -> list[list[str]]:
    """The device-level rows: whether it is on, sigma_u, S and the ledger's inclusion probabilities."""
    rows = [["device-level DP", fmt(m.facts.device_dp)]]
    if m.facts.device_dp:
        rows += [
            ["device level: noise multiplier sigma_u", param(m.config, "device_noise_multiplier")],
            ["device level: update clip norm S", param(m.config, "update_clip_norm")
             + (" (where the adaptive clip started)" if _adaptive(m.config) else "")],
            ["server learning rate", param(m.config, "server_learning_rate")],
        ]
        if _adaptive(m.config):
            rows += _adaptive_rows(m.config, "device_noise_multiplier", "S", "device update norms", m.device)
        if m.device is not None:
            rows.append(["device level: inclusion probability q_k per round", fmt_range(m.device.sample_rate)])
    return rows


def _correlation_rows(m: Mechanism) -> list[list[str]]:
    """How the server's noise relates across rounds: independent (DP-SGD) or banded matrix factorization
    (``--bands``, mechanisms/correlated_noise.py) with its cyclic selection."""
    run, bands = m.facts, int(m.config.get("bands") or 1)
    if not (run.aggregate or run.device_dp):
        return []
    rounds = m.rounds_planned
    most = f"ceil({fmt(rounds)} / {bands}) = {-(-int(rounds) // bands)}" if rounds else "ceil(rounds / b)"
    cyclic = ["cyclic selection", f"{bands} device groups of about equal data (ranked by examples held, dealt in snake "
              f"order); round t selects only from group (t - 1) mod {bands}: at most {most} rounds per device, each "
              f"at least {bands} rounds apart"]
    if bands <= 1 or (m.config.get("bands_noise") or "correlated") != "correlated":
        return [["server noise across rounds", "independent each round (a fresh Gaussian per round)"]] + (
            [cyclic] if bands > 1 else [])
    return [
        ["server noise across rounds", f"correlated: banded matrix factorization with b = {bands} bands (round t's "
         "noise is row t of C^-1 z, C the column-normalised b-banded Toeplitz strategy jax-privacy optimises for the "
         "prefix sums of the planned rounds; Choquette-Choo et al. 2023); the noise of past rounds is kept in the "
         "server's memory only, and a resumed run starts a new stream"],
        cyclic,
    ]


def _adaptive(cfg: dict) -> bool:
    return cfg.get("adaptive_clip_quantile") is not None


def _adaptive_rows(cfg: dict, sigma_field: str, name: str, what: str, ranges: LedgerRanges | None) -> list[list[str]]:
    """Adaptive clipping's rows (mechanisms/adaptive_clip.py): the quantile, the count's noise, the sum's
    noise multiplier sigma_g, and the clip norms the ledger recorded."""
    from mechanisms.adaptive_clip import gradient_noise_multiplier

    sigma, sigma_b = cfg.get(sigma_field), cfg.get("clipped_count_stddev")
    try:
        sigma_g = fmt(gradient_noise_multiplier(float(sigma), float(sigma_b))) if sigma is not None and sigma_b else "-"
    except ValueError:
        sigma_g = "-"
    rows = [
        [f"adaptive clipping of {name}", f"to the {fmt(cfg['adaptive_clip_quantile'])} quantile of the {what}, geometric "
         f"update with learning rate {param(cfg, 'adaptive_clip_lr')} on the noised fraction of unclipped norms (Andrew "
         "et al. 2021); " + ("each round's clip norm is a function of noised counts only and is released"
                             if sigma_b else "the count was NOT noised (sigma = 0): the clip norms are not private")],
        ["adaptive clipping: noise std of the count of unclipped norms sigma_b", param(cfg, "clipped_count_stddev")],
        [f"adaptive clipping: noise multiplier of the clipped sum sigma_g (sigma_g^-2 + (2 sigma_b)^-2 = {sigma_field}^-2, "
         "the accounted event)", sigma_g],
    ]
    if ranges is not None and ranges.max_grad_norm is not None:
        rows.append([f"adaptive clipping: {name} at the start of each round, in the ledger", fmt_range(ranges.max_grad_norm)])
    return rows


SECTION = Section("mechanism", Mechanism, compute, render)
