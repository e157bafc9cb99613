"""Shared test settings: offline Hugging Face, paths of the shared real data sets."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    """The shared real data: $DPFL_SHARED_DATA, else ../shared/data beside the checkout, else /work/shared/data."""
    if os.environ.get("DPFL_SHARED_DATA"):
        return Path(os.environ["DPFL_SHARED_DATA"])
    for candidate in (REPO.parent / "shared" / "data", Path("/work/shared/data")):
        if candidate.is_dir():
            return candidate
    return REPO.parent / "shared" / "data"


SHARED_DATA = _shared_data()
BANKING77 = SHARED_DATA / "banking77"
SNIPS = SHARED_DATA / "snips"


@pytest.fixture
def banking77() -> Path:
    if not (BANKING77 / "train.jsonl").exists():
        pytest.skip(f"{BANKING77} is absent")
    return BANKING77


@pytest.fixture
def snips() -> Path:
    if not (SNIPS / "train.jsonl").exists():
        pytest.skip(f"{SNIPS} is absent")
    return SNIPS


@pytest.fixture
def task_identity():
    """Flower's Message() reads the run id and node id of the current task; set them for in-process tests.

    The in-process round-loop suites (tests/inprocess.py) use it on every test:
    ``pytestmark = pytest.mark.usefixtures("task_identity")``.
    """
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = old


@pytest.fixture
def no_dropout(monkeypatch):
    """The devices' models (client.app's cached ``_model``) without dropout: one batched forward then
    equals per-example forwards, and a device's clipped sum is a function of the weights and data only."""
    import torch

    import client.app as capp

    orig = capp._model

    def model_without_dropout(*args, **kwargs):
        model = orig(*args, **kwargs)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        return model

    orig.cache_clear()
    monkeypatch.setattr(capp, "_model", model_without_dropout)
    yield
    orig.cache_clear()  # no dropout-free instance is left for later tests
