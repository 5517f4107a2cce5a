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



@pytest.fixture
def record_stream(monkeypatch):
    """record_stream(backend) -> the non-empty pieces `backend.generate_stream` yields,
    recorded as the executor takes them. text_iter polls the executor, so when the consumer
    thread is slow every piece arrives before its first poll and it yields one; counting
    here does not race."""

    def record(backend) -> list[str]:
        pieces: list[str] = []
        original = backend.generate_stream

        def recording(s, sampling_params):
            for comp, meta_info in original(s, sampling_params=sampling_params):
                if comp:
                    pieces.append(comp)
                yield comp, meta_info

        monkeypatch.setattr(backend, "generate_stream", recording)
        return pieces

    return record
