"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF directory (downloaded and converted once, then cached)."""
    from sglbatch.engine.model_source import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")
