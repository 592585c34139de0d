"""Shared test fixtures. Real photos from ../shared/fixtures are optional: tests skip without them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"


def _shared(name: str) -> Path:
    path = SHARED_FIXTURES / name
    if not path.is_dir():
        pytest.skip(f"real-photo fixtures not found at {path} (tests only; the product never needs them)")
    return path


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    """8 people x 5 tight 150x150 face crops, subject-folders layout."""
    return _shared("faces")


@pytest.fixture(scope="session")
def people_dir() -> Path:
    """5 people, 1-3 larger photographs each, subject-folders layout."""
    return _shared("people")
