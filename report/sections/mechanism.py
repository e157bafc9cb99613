"""The "Mechanism parameters" table: schedule, example-level and device-level mechanism, strategy, model, data.

Configured values come from config.toml; the ranges "in the ledger" from the privacy events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from report.blocks import Block, fmt, fmt_range, param
from report.context import Context, Facts
from report.events import LedgerRanges
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

    def to_json(self) -> dict[str, Any]:
        """Nothing of its own in summary.json (the ranges are under ``epsilon.<unit>.mechanism``)."""
        return {}


def compute(ctx: Context) -> Mechanism:
    """The mechanism's configured parameters and the ledger's ranges."""
    return Mechanism(facts=ctx.facts, rounds_planned=ctx.cfg.get("rounds"), rounds_completed=ctx.rounds_completed,
                     num_devices=ctx.num_devices, config=ctx.cfg,
                     example=LedgerRanges.of(ctx.data, "example") if ctx.accounted("example") else None,
                     device=LedgerRanges.of(ctx.data, "device") if ctx.accounted("device") else None)


def render(m: Mechanism, doc: Doc) -> list[Block]:
    """The table: schedule, the example-level rows (:func:`_example_rows`), the device-level rows
    (:func:`_device_rows`), strategy, model and data set."""
    cfg = m.config
    rows = [
        ["rounds (planned / committed)", f"{fmt(m.rounds_planned)} / {m.rounds_completed}"],
        ["expected cohort size", param(cfg, "cohort_size")],
        ["devices", fmt(m.num_devices)],
    ]
    if not m.facts.aggregate:
        rows += [["local epochs", param(cfg, "local_epochs")],
                 ["expected local batch size", param(cfg, "batch_size")]]
    rows += _example_rows(m)
    rows += _device_rows(m)
    rows += [["strategy", param(cfg, "strategy")], ["model", param(cfg, "model")],
             ["dataset", param(cfg, "dataset") if "dataset" in cfg else (param(cfg, "data_dir") if "data_dir" in cfg else "built-in synthetic home-assistant set (generated)")]]
    return [("h", 3, "Mechanism parameters"), ("table", ["parameter", "value"], rows)]


def _example_rows(m: Mechanism) -> list[list[str]]:
    """The example-level rows: where the noise goes, sigma, C, p, and the ledger's ranges."""
    cfg, run = m.config, m.facts
    rows: list[list[str]] = []
    if run.dp_on:
        rows += [
            ["example level: noise added", "on the aggregate (by the server, once per round, to the cohort's sum)"
             if run.aggregate else "on the device (DP-SGD, at every local step)"],
            ["example level: noise multiplier sigma", param(cfg, "noise_multiplier")],
            ["example level: clipping norm C (max_grad_norm)", param(cfg, "max_grad_norm")],
        ]
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


def _device_rows(m: Mechanism) -> list[list[str]]:
    """The device-level rows: whether it is on, sigma_u, S and the ledger's inclusion probabilities."""
    rows = [["device-level DP", fmt(m.facts.device_dp)]]
    if m.facts.device_dp:
        rows += [
            ["device level: noise multiplier sigma_u", param(m.config, "device_noise_multiplier")],
            ["device level: update clip norm S", param(m.config, "update_clip_norm")],
            ["server learning rate", param(m.config, "server_learning_rate")],
        ]
        if m.device is not None:
            rows.append(["device level: inclusion probability q_k per round", fmt_range(m.device.sample_rate)])
    return rows


SECTION = Section("mechanism", Mechanism, compute, render)
