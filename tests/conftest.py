"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF directory (downloaded and converted once, then cached)."""
    from sglbatch.engine.model_source import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def engine(smollm2_dir: Path) -> Iterator:
    """The default model in fp32 (exact comparisons), default scheduling settings."""
    from sglbatch.engine.engine import Engine

    with Engine(model_path=str(smollm2_dir), dtype="float32", kv_cache_gb=0.5) as eng:
        yield eng
