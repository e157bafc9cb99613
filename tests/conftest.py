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
