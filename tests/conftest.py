"""Shared test settings: keep torch to the machine's 2 cores, paths to shared data and the model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REAL_DATA = (REPO.parent / "shared" / "data" / "real").resolve()
MODEL_DIR = REPO / "models" / "osteoplan-spine"

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real CT data not found at {REAL_DATA} (it lives in ../shared/data/real beside the checkout)")
    return REAL_DATA


@pytest.fixture(scope="session")
def shipped_model() -> Path:
    if not (MODEL_DIR / "metadata.json").is_file():
        pytest.skip("shipped model bundle models/osteoplan-spine is missing")
    return MODEL_DIR


@pytest.fixture(autouse=True)
def _unfreeze_gc():
    """A StudyRunner freezes the objects alive when it starts (pipeline.study.freeze_long_lived):
    right for a worker process, not for the test process, whose fixtures come and go. Undo it
    after each test so garbage cycles of later tests are collected as usual."""
    yield
    import gc

    if gc.get_freeze_count():
        gc.unfreeze()
