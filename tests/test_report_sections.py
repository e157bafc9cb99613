"""The report's section registry: reading order, typed computes, and every summary.json key owned by a section."""

import dataclasses
import json
import re

import pytest

from report.build import SUMMARY_KEYS, build_report
from report.context import resolve
from report.rundata import read_run
from report.sections import SECTIONS, Section, compute_all
from test_report import make_run

READING_ORDER = ["title", "lineage", "summary", "setting", "units", "accountant", "mechanism", "selection",
                 "epsilon", "audit", "budgets", "utility", "rounds", "references", "releases", "holdout", "out_of_scope",
                 "deletions"]
# The headings a section opens with, for the sections every report has.
HEADINGS = {"summary": "Summary", "setting": "Setting and threat model", "units": "Privacy units and adjacency",
            "accountant": "Accountant and delta", "mechanism": "Mechanism parameters", "selection": "Selection",
            "epsilon": "Epsilon per privacy unit", "audit": "Measured leakage: privacy audit",
            "budgets": "Budgets", "utility": "Utility beside privacy"}
VARIANTS = [dict(), dict(dp=False, device_dp=False), dict(dp=False, device_dp=True), dict(device_dp=False),
            dict(noise_at="aggregate", device_dp=False), dict(reproducible_noise=True, rounds_done=2)]


def test_sections_are_registered_once_in_reading_order():
    names = [s.name for s in SECTIONS]
    assert names == READING_ORDER
    assert len(set(names)) == len(names)


def test_report_headings_follow_the_registry(tmp_path):
    run = make_run(tmp_path)
    build_report(run)
    md = (run / "report" / "report.md").read_text()
    headings = re.findall(r"^#{2,3} (.+)$", md, flags=re.M)
    expected = [HEADINGS[n] for n in READING_ORDER if n in HEADINGS]
    assert [h for h in headings if h in expected] == expected


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_each_compute_returns_its_frozen_dataclass_or_none(tmp_path, kwargs):
    data = read_run(make_run(tmp_path, **kwargs))
    ctx = resolve(data, None, 4)
    for s in SECTIONS:
        assert dataclasses.is_dataclass(s.cls) and s.cls.__dataclass_params__.frozen, s.name
    objects = compute_all(ctx)
    for s in SECTIONS:
        obj = objects[s.name]
        assert obj is None or type(obj) is s.cls, (s.name, type(obj))
        assert set(s.to_json(obj)) <= set(s.keys), s.name


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_every_summary_key_is_owned_by_one_section(tmp_path, kwargs):
    owners: dict[str, str] = {}
    for s in SECTIONS:
        for k in s.keys:
            assert k not in owners, f"{k!r} declared by {owners.get(k)!r} and {s.name!r}"
            owners[k] = s.name
    assert set(owners) == set(SUMMARY_KEYS)
    run = make_run(tmp_path, **kwargs)
    js = build_report(run)
    on_file = json.loads((run / "report" / "summary.json").read_text())
    # "plots" names the PNGs build_report drew (report.plots); every other key comes from a section
    assert set(on_file) - {"plots"} <= set(owners)
    assert list(js) == [k for k in SUMMARY_KEYS if k in js] + ["plots"]


def test_a_section_cannot_give_an_undeclared_key():
    @dataclasses.dataclass(frozen=True)
    class Stray:
        def to_json(self):
            return {"mine": 1, "not_declared": 2}

    s = Section("stray", Stray, lambda ctx: Stray(), lambda obj, doc: [], keys=("mine",))
    with pytest.raises(ValueError, match="not_declared"):
        s.to_json(Stray())
    assert s.to_json(None) == {"mine": None}


def _without_noise_at(run):
    cfg = run / "config.toml"
    cfg.write_text("".join(line + "\n" for line in cfg.read_text().splitlines() if not line.startswith("noise_at")))


def test_noise_placement_without_noise_at_comes_from_the_ledger(tmp_path):
    import sqlite3

    old = make_run(tmp_path, name="old", noise_at="aggregate", device_dp=False)
    _without_noise_at(old)  # a ledger whose events name no mechanism: the pre-noise_at placement, on the device
    assert build_report(old)["noise_at"] == "device"
    named = make_run(tmp_path, name="named", noise_at="aggregate", device_dp=False)
    _without_noise_at(named)
    conn = sqlite3.connect(named / "ledger.sqlite")
    conn.execute("ALTER TABLE privacy_events ADD COLUMN mechanism_name TEXT")
    conn.execute("ALTER TABLE privacy_events ADD COLUMN dp_event TEXT")
    conn.execute("UPDATE privacy_events SET mechanism_name = 'aggregate'")
    conn.commit()
    conn.close()
    js = build_report(named)
    assert js["noise_at"] == "aggregate" and js["trust_model"]["example"]["name"].startswith("central DP")


@pytest.mark.parametrize("head_init", ["label-names", "random", None])
def test_the_setting_states_how_the_head_started_and_the_participation_cap(tmp_path, head_init):
    import tomllib

    import tomli_w

    run = make_run(tmp_path, device_dp=False, noise_at="aggregate")
    cfg = tomllib.loads((run / "config.toml").read_text())
    if head_init:
        cfg["head_init"] = head_init
    cfg["participation_cap"] = 3
    (run / "config.toml").write_text(tomli_w.dumps(cfg))
    build_report(run)
    md = (run / "report" / "report.md").read_text()
    assert "calibrated for at most 3 of a device's rounds" in md
    said = "only the public label schema was read, no training example" in md
    assert said == (head_init == "label-names")
    assert ("seeded random initialisation" in md) == (head_init == "random")
