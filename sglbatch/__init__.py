"""sglbatch: an LLM inference engine and the command-line suite around it."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["CustomLogitProcessor", "Engine", "EngineConfig", "SamplingParams"]


def __getattr__(name: str) -> Any:
    # Lazy, so `sglbatch --help` and light imports do not pay for torch.
    if name == "Engine":
        from sglbatch.engine.engine import Engine

        return Engine
    if name == "EngineConfig":
        from sglbatch.engine.config import EngineConfig

        return EngineConfig
    if name == "SamplingParams":
        from sglbatch.engine.request import SamplingParams

        return SamplingParams
    if name == "CustomLogitProcessor":
        from sglbatch.engine.custom_logit_processor import CustomLogitProcessor

        return CustomLogitProcessor
    raise AttributeError(f"module 'sglbatch' has no attribute {name!r}")
