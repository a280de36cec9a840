"""Shared fixtures: the embedded tiny checkpoint, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` default checkpoint, in a cache dir private to this test session."""
    from models.default_model import make_default

    cache = tmp_path_factory.mktemp("tiered-cache")
    os.environ["TIERED_CACHE_DIR"] = str(cache)
    return make_default("tiny", cache / "tiny")
