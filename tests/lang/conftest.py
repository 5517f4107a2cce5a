"""Fixtures of the frontend-language tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _restore_default_backend():
    """A test that calls sgl.set_default_backend leaves no trace."""
    from sglbatch.lang.global_config import global_config

    saved = global_config.default_backend
    yield
    global_config.default_backend = saved


@pytest.fixture
def engine_backend(engine):
    """The in-process backend over the session engine (SmolLM2-135M, fp32)."""
    from sglbatch.lang.backend.engine import EngineBackend

    return EngineBackend.for_engine(engine)
