"""The privacy budget report of a ``--noise-at secure`` run (noise shares on the devices, summed under
secure aggregation): every sentence true of it.

* The trust model names secure aggregation and the dropout tolerance; summary.json's ``noise_at`` is
  "secure" and ``trust_model.example`` the secure entry.
* No sentence says the server adds the noise or sees the devices' clipped sums or updates; nothing of
  the device placement (DP-SGD, local batches) or of the aggregate placement is said.
* The accountant line says Renyi DP at integer orders (the Skellam bound); summary.json's accountant
  is the one the epsilons were composed with ("rdp"), though config.toml names "pld".
* The reported epsilon equals the ledger's (composed from the ledger's ZCDpEvents, not from the
  nominal (sigma, 1, 1) columns) and dp-accounting's RDP accountant at integer orders.
* The mechanism table gives SecAgg or SecAgg+ with k, the bits, the dropout tolerance and the
  rounds abandoned (from metrics.jsonl); an abandoned round is marked in the per-round table and
  its events are still composed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import client.app as capp
from dp.accounting import INTEGER_RDP_ORDERS
from inprocess import run_rounds, toy_config, write_lamp_data
from mechanisms import secure
from report import build_report
from report.sections.setting import TRUST_MODELS
from rundir import LedgerReader

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower's Message() in-process (tests/conftest.py)
SIGMA = 0.5

#: Phrases of the other placements that would be false of a secure run.
FALSE_FOR_SECURE = (
    "The server adds", "the server adds", "server added", "by the server, once per round", "simulates the noise",
    "sees each device's clipped", "sees each device's individual", "individual clipped sums", "not to look at",
    "trusts the aggregator", "trusts nobody", "trains with DP-SGD", "Poisson-sampled", "local batches",
    "sampling: Poisson", "It assumes Poisson sampling", "noise on the aggregate", "noise on the device",
    "Gaussian noise", "local epochs", "FedAvg weights",
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_lamp_data(tmp_path_factory.mktemp("securereportdata"))


def _secure_run(tmp_path: Path, data_dir: Path, **kw) -> Path:
    settings = dict(noise_at="secure", trainable="head", num_devices=6, cohort_size=6, rounds=2,
                    noise_multiplier=SIGMA)
    settings.update(kw)
    cfg = toy_config(tmp_path / "run", data_dir, **settings)
    run_rounds(cfg)
    return Path(cfg.run_dir)


def _sentences(md: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.:;])\s+|\n", md) if s.strip()]


def _rdp_epsilon(rounds: int, delta: float) -> float:
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = rdp_privacy_accountant.RdpAccountant(list(INTEGER_RDP_ORDERS))
    acc.compose(secure.secure_event(SIGMA), rounds)
    return acc.get_epsilon(delta)


def test_report_of_a_secure_run_says_what_it_did(tmp_path, data_dir):
    run = _secure_run(tmp_path, data_dir)
    summary = build_report(run)
    md = (run / "report" / "report.md").read_text()
    on_disk = json.loads((run / "report" / "summary.json").read_text())

    # placement and trust model
    assert summary["noise_at"] == on_disk["noise_at"] == "secure"
    assert on_disk["trust_model"]["example"] == TRUST_MODELS["secure"].to_json()
    assert on_disk["trust_model"]["device"] is None
    trust = TRUST_MODELS["secure"]
    assert "secure aggregation" in trust.name and "dropout tolerance" in trust.name
    assert "floor(f n)" in trust.trusted and "honest-but-curious" in trust.trusted
    assert "sees only masked vectors" in trust.holds_against and "colluders know their own noise shares" in trust.holds_against
    assert f"Trust model: example level: {trust.name}." in md
    assert f"Trust model at example level: {trust.name}. Trusted: {trust.trusted}." in md
    assert "Here f = 0.1." in md
    assert "SecAgg (Bonawitz et al. 2017): each device shares its secrets with every other device of the round" in md
    assert "The server does not add noise and sees no device's clipped sum" in md
    assert "n_min = n - floor(f n)" in md and "is abandoned: no noisy sum is released, the model is kept" in md

    # nothing of the other placements
    for phrase in FALSE_FOR_SECURE:
        assert phrase not in md, phrase
    for s in _sentences(md):
        low = s.lower()
        assert not ("server" in low and re.search(r"\badds?\b.*\bnoise\b", low) and "does not add" not in low), s
        assert not re.search(r"server sees each device's", low), s

    # accountant: RDP at integer orders, whatever config.toml names
    assert on_disk["config"]["accountant"] == "pld"
    assert on_disk["accountant"] == "rdp"
    assert "Accountant: Renyi DP at integer orders (2 to 1024;" in md
    assert "Accountant: RDP at integer orders, whichever accountant the run names (here 'pld')" in md
    assert "Theorem 3.5" in md and "ZCDpEvent(rho, xi)" in md
    assert "conditional randomised rounding (Kairouz, Liu & Steinke 2021)" in md
    assert "The wrap-around mod 2^b is post-processing: it can cost accuracy, not privacy." in md

    # epsilon: the ledger's, and dp-accounting's RDP at integer orders of two Skellam events
    with LedgerReader(run / "ledger.sqlite") as ledger:
        cached = ledger.device_epsilons("example")
        delta = ledger.runs()[0].target_delta
    ex = on_disk["epsilon"]["example"]
    assert set(map(int, ex["per_device"])) == set(cached) and len(cached) == 6
    for d, e in ex["per_device"].items():
        assert e == pytest.approx(cached[int(d)], rel=1e-9)
    assert ex["max"] == pytest.approx(ex["ledger_max"], rel=1e-9)
    assert ex["max"] == pytest.approx(_rdp_epsilon(2, delta), rel=1e-9)
    assert on_disk["curves"]["example"][-1]["max"] == pytest.approx(ex["max"], rel=1e-9)
    assert not any("exceeds the value recomputed" in w for w in on_disk["warnings"])
    assert not any("unknown noise placement" in w for w in on_disk["warnings"])
    assert f"epsilon = {_fmt(ex['max'])} at delta" in md

    # the mechanism table, selection and references
    ev = secure.secure_event(SIGMA)
    for row in ("| secure aggregation | SecAgg (Bonawitz et al. 2017)",
                "| secure aggregation: bits per coordinate b | 20 (the sum is taken mod 2^b) |",
                "| secure aggregation: dropout tolerance f | 0.1 (noise sized for n_min = n - floor(f n) devices",
                "| secure aggregation: rounds abandoned (no noisy sum released) | 0 of 2 |",
                "| example level: example sampling rate p | 1 ",
                f"| example level: event per round joined, in the ledger | ZCDpEvent(rho = {_fmt(ev.rho)}, "
                f"xi = {_fmt(ev.xi)})",
                "| example level: rounds composed, most-trained device | 2 |"):
        assert row in md, row
    assert "each device composes one event for each round it was selected for" in md
    for ref in ("Bonawitz et al. 2017", "Bell et al. 2020", "Agarwal, Kairouz & Liu 2021", "Kairouz, Liu & Steinke 2021"):
        assert ref in md.split("Sources: ")[1], ref
    assert "the quantisation scale gamma" in md


def test_secagg_plus_and_an_abandoned_round_are_reported(tmp_path, data_dir, monkeypatch):
    """SecAgg+ with k ring neighbours; round 2 loses two of six devices after training (f = 0.2 tolerates one),
    so it is abandoned: the table says so, and its events are still composed."""
    orig = capp.fault_for
    monkeypatch.setattr(capp, "fault_for", lambda seed, r, d, rate, kind:
                        "raise" if r == 2 and d in (1, 4) else orig(seed, r, d, rate, kind))
    run = _secure_run(tmp_path, data_dir, secagg_neighbours=2, dropout_tolerance=0.2)
    summary = build_report(run)
    md = (run / "report" / "report.md").read_text()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["secure_abandoned"] for m in metrics] == [False, True]

    assert ("| secure aggregation | SecAgg+ (Bell et al. 2020): secrets shared with k = 2 ring neighbours (with every "
            "other device when the cohort has at most 3) |") in md
    assert "SecAgg+ (Bell et al. 2020): each device shares its secrets with its 2 neighbours on a ring" in md
    assert "| secure aggregation: rounds abandoned (no noisy sum released) | 1 of 2 (round 2) |" in md
    assert "Here f = 0.2." in md
    header = next(line for line in md.splitlines() if line.startswith("| round | skipped |"))
    assert header.startswith("| round | skipped | abandoned |")
    row2 = next(line for line in md.splitlines() if line.startswith("| 2 |"))
    assert row2.startswith("| 2 |  | yes |")
    assert "An abandoned round (secure aggregation" in md
    assert "Round 2 was abandoned (secure aggregation): no new noisy sum went into its release" in md

    with LedgerReader(run / "ledger.sqlite") as ledger:
        cached = ledger.device_epsilons("example")
        delta = ledger.runs()[0].target_delta
    ex = summary["epsilon"]["example"]
    assert ex["max"] == pytest.approx(max(cached.values()), rel=1e-9)
    assert ex["max"] == pytest.approx(_rdp_epsilon(2, delta), rel=1e-9)  # the abandoned round is charged
    for phrase in FALSE_FOR_SECURE:
        assert phrase not in md, phrase


def _fmt(x: float) -> str:
    from report.blocks import fmt

    return fmt(x)
