"""The mechanism registry (mechanisms/registry.py): which mechanism each combination of the placement
flags selects, that every registered mechanism is documented, and that the package needs no Flower."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest

import mechanisms
from settings.config import ConfigError, RunConfig
from mechanisms.aggregate import AggregateNoise
from mechanisms.base import Mechanism
from mechanisms.dp_fedavg import DPFedAvg
from mechanisms.fedavg import FedAvg
from mechanisms.fedsgd import FedSGD
from mechanisms.local_dpsgd import LocalDPSGD

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _expected(dp: bool, noise_at: str, device_dp: bool):
    """(class, units) the flags select, written out from the flags' documented meaning."""
    if device_dp:
        return DPFedAvg, (("example", "device") if dp else ("device",))
    if not dp:  # the placement's algorithm without DP
        return {"device": FedAvg, "aggregate": FedSGD}[noise_at], ()
    return {"device": LocalDPSGD, "aggregate": AggregateNoise}[noise_at], ("example",)


@pytest.mark.parametrize("dp, noise_at, device_dp", list(itertools.product([True, False], ["device", "aggregate"], [True, False])))
def test_mechanism_for_picks_the_class_of_each_flag_combination(dp, noise_at, device_dp):
    kw = dict(dp=dp, noise_at=noise_at, device_dp=device_dp)
    if dp and device_dp and noise_at == "aggregate":
        # two different releases: the settings are refused before any mechanism is looked up
        with pytest.raises(ConfigError, match="--device-dp"):
            RunConfig(**kw).validate()
        return
    cfg = RunConfig(**kw).validate()
    cls, units = _expected(dp, noise_at, device_dp)
    mech = mechanisms.mechanism_for(cfg)
    assert type(mech) is cls
    assert mechanisms.mechanism_name(cfg) == cls.name
    assert mech.cfg is cfg
    assert tuple(mech.units) == units
    assert mech.private is bool(units)


def test_dp_fedavg_units_follow_dp():
    with_dp = mechanisms.mechanism_for(RunConfig(device_dp=True, noise_at="device").validate())
    without = mechanisms.mechanism_for(RunConfig(device_dp=True, dp=False).validate())
    assert with_dp.units == ("example", "device")
    assert without.units == ("device",)
    # the instance's units, not a class attribute shared between runs
    assert DPFedAvg.units == ()


def test_registry_holds_the_six_mechanisms_under_their_names():
    assert set(mechanisms.MECHANISMS) == {"fedavg", "fedsgd", "local-dpsgd", "aggregate", "dp-fedavg", "secure"}
    for name, cls in mechanisms.MECHANISMS.items():
        assert issubclass(cls, Mechanism) and cls is not Mechanism
        assert cls.name == name


def test_an_unregistered_placement_is_a_key_error():
    with pytest.raises(KeyError):
        mechanisms.mechanism_for(RunConfig().replace(noise_at="nowhere"))


@pytest.mark.parametrize("name", sorted(mechanisms.MECHANISMS))
def test_every_registered_mechanism_has_module_and_class_docstrings(name):
    cls = mechanisms.MECHANISMS[name]
    module = sys.modules[cls.__module__]
    assert module.__name__.startswith("mechanisms.")
    assert module.__doc__ and module.__doc__.strip(), f"{module.__name__} has no module docstring"
    # a class docstring is not inherited: cls.__doc__ is None unless the class itself has one
    assert "__doc__" in vars(cls) and cls.__doc__ and cls.__doc__.strip(), f"{cls.__name__} has no docstring"


def test_mechanisms_imports_no_flower():
    code = "import mechanisms, sys; assert not any(m.split('.')[0] == 'flwr' for m in sys.modules), " \
           "sorted(m for m in sys.modules if m.split('.')[0] == 'flwr')[:5]"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_an_unknown_privacy_unit_is_refused():
    """A misspelt unit never silently gets another unit's event or clip norm."""
    from settings.config import RunConfig
    from mechanisms import mechanism_for

    mech = mechanism_for(RunConfig(noise_at="device", noise_multiplier=1.0).validate())
    with pytest.raises(ValueError, match="unknown privacy unit 'examples'"):
        mech.event("examples", 10, 0.5)
    with pytest.raises(ValueError, match="unknown privacy unit"):
        mech.clip_norm("user")
