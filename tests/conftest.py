"""Shared test settings: offline Hugging Face, paths of the shared real data sets."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DPFL_SHARED_DATA", REPO.parent / "shared" / "data"))
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
