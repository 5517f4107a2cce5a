"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

# GSM8K for tests and benchmarks, read in place (never copied into the project).
SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "gsm8k"


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


@pytest.fixture(scope="session")
def server(tmp_path_factory, smollm2_dir: Path) -> Iterator:
    """One generation server (the default model, fp32) for the session, with an API key."""
    from tests.server.conftest import API_KEY, start_server

    tmp = tmp_path_factory.mktemp("server")
    srv = start_server(tmp, "--model-path", str(smollm2_dir), "--dtype", "float32",
                       "--kv-cache-gb", "0.5", api_key=API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server):
    """The official OpenAI client pointed at the session server."""
    import openai

    return openai.OpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0)
