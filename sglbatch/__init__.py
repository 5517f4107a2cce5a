"""sglbatch: an LLM inference engine and the command-line suite around it."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["CustomLogitProcessor", "Engine", "EngineConfig", "SamplingParams"]

# The SGLang frontend language (`import sglbatch as sgl; @sgl.function ...`): these names
# are forwarded to sglbatch.lang, which imports no torch until a program runs on an Engine.
_LANG_NAMES = frozenset({
    "function", "gen", "gen_int", "gen_string", "select", "image", "video",
    "system", "user", "assistant", "system_begin", "system_end", "user_begin", "user_end",
    "assistant_begin", "assistant_end", "separate_reasoning", "set_default_backend",
    "flush_cache", "get_server_info", "global_config", "token_length_normalized",
    "greedy_token_selection", "unconditional_likelihood_normalized", "ChoicesDecision",
    "ChoicesSamplingMethod", "BaseBackend", "EngineBackend", "RuntimeEndpoint", "Runtime",
    "OpenAI", "Anthropic", "LiteLLM", "VertexAI", "ProgramState", "SglFunction",
    "SglSamplingParams", "get_chat_template", "get_chat_template_by_model_path",
})


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
    if name in _LANG_NAMES:
        import sglbatch.lang

        return getattr(sglbatch.lang, name)
    raise AttributeError(f"module 'sglbatch' has no attribute {name!r}")
