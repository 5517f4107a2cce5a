"""Backends of the frontend language.

Imported lazily: ``from sglbatch.lang.backend import RuntimeEndpoint`` loads
only that module (and its client libraries)."""

from __future__ import annotations

import importlib
from typing import Any

from sglbatch.lang.backend.base_backend import BaseBackend

_LAZY = {
    "EngineBackend": "sglbatch.lang.backend.engine",
    "RuntimeEndpoint": "sglbatch.lang.backend.runtime_endpoint",
    "Runtime": "sglbatch.lang.backend.runtime",
    "OpenAI": "sglbatch.lang.backend.openai",
    "Anthropic": "sglbatch.lang.backend.anthropic",
    "LiteLLM": "sglbatch.lang.backend.litellm",
    "VertexAI": "sglbatch.lang.backend.vertexai",
}

__all__ = ["Anthropic", "BaseBackend", "EngineBackend", "LiteLLM", "OpenAI", "Runtime",
           "RuntimeEndpoint", "VertexAI"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
