"""The SGLang frontend language on sglbatch: ``import sglbatch as sgl`` runs SGLang
programs unchanged.

```python
import sglbatch as sgl

@sgl.function
def qa(s, question):
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=64))

sgl.set_default_backend(sgl.Engine())           # in-process; or sgl.RuntimeEndpoint(url)
print(qa.run(question="What is 2+2?", temperature=0)["answer"])
```

Backends (imported on first use): ``Engine`` (an ``sglbatch.Engine`` passed as is),
``EngineBackend``, ``RuntimeEndpoint``, ``Runtime``, ``OpenAI``, ``Anthropic``,
``LiteLLM``, ``VertexAI``.
"""

from __future__ import annotations

import importlib
from typing import Any

from sglbatch.lang.api import (
    assistant,
    assistant_begin,
    assistant_end,
    flush_cache,
    function,
    gen,
    gen_int,
    gen_string,
    get_server_info,
    image,
    select,
    separate_reasoning,
    set_default_backend,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
    video,
)
from sglbatch.lang.backend.base_backend import BaseBackend
from sglbatch.lang.chat_template import get_chat_template, get_chat_template_by_model_path
from sglbatch.lang.choices import (
    ChoicesDecision,
    ChoicesSamplingMethod,
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)
from sglbatch.lang.function import SglFunction
from sglbatch.lang.global_config import global_config
from sglbatch.lang.ir import SglSamplingParams

# name -> (module, attribute), imported on first access.
_LAZY = {
    "Engine": ("sglbatch.engine.engine", "Engine"),
    "EngineBackend": ("sglbatch.lang.backend.engine", "EngineBackend"),
    "RuntimeEndpoint": ("sglbatch.lang.backend.runtime_endpoint", "RuntimeEndpoint"),
    "Runtime": ("sglbatch.lang.backend.runtime", "Runtime"),
    "OpenAI": ("sglbatch.lang.backend.openai", "OpenAI"),
    "Anthropic": ("sglbatch.lang.backend.anthropic", "Anthropic"),
    "LiteLLM": ("sglbatch.lang.backend.litellm", "LiteLLM"),
    "VertexAI": ("sglbatch.lang.backend.vertexai", "VertexAI"),
    "ProgramState": ("sglbatch.lang.program_state", "ProgramState"),
}

__all__ = [
    "Anthropic",
    "BaseBackend",
    "ChoicesDecision",
    "ChoicesSamplingMethod",
    "Engine",
    "EngineBackend",
    "LiteLLM",
    "OpenAI",
    "ProgramState",
    "Runtime",
    "RuntimeEndpoint",
    "SglFunction",
    "SglSamplingParams",
    "VertexAI",
    "assistant",
    "assistant_begin",
    "assistant_end",
    "flush_cache",
    "function",
    "gen",
    "gen_int",
    "gen_string",
    "get_chat_template",
    "get_chat_template_by_model_path",
    "get_server_info",
    "global_config",
    "greedy_token_selection",
    "image",
    "select",
    "separate_reasoning",
    "set_default_backend",
    "system",
    "system_begin",
    "system_end",
    "token_length_normalized",
    "unconditional_likelihood_normalized",
    "user",
    "user_begin",
    "user_end",
    "video",
]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = target
    return getattr(importlib.import_module(module), attr)


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
