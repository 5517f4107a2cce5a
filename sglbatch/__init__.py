"""sglbatch: an LLM inference engine and the command-line suite around it."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
# The engine's API: the engine, its config, and the typed request/output boundary.
_ENGINE_NAMES = {
    "Engine": "sglbatch.engine.engine",
    "EngineConfig": "sglbatch.engine.config",
    "SamplingParams": "sglbatch.engine.sampling_params",
    "FinishReason": "sglbatch.engine.api_types",
    "GenerateRequest": "sglbatch.engine.api_types",
    "GenerateOutput": "sglbatch.engine.api_types",
    "StreamDelta": "sglbatch.engine.api_types",
    "MetaInfo": "sglbatch.engine.api_types",
    "CustomLogitProcessor": "sglbatch.engine.custom_logit_processor",
}
__all__ = sorted(_ENGINE_NAMES)

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
    if name in _ENGINE_NAMES:
        return getattr(importlib.import_module(_ENGINE_NAMES[name]), name)
    if name in _LANG_NAMES:
        import sglbatch.lang

        return getattr(sglbatch.lang, name)
    raise AttributeError(f"module 'sglbatch' has no attribute {name!r}")
