"""OpenAI: the frontend language over the OpenAI API, through the official `openai` SDK.

Works with OpenAI itself, Azure OpenAI (`is_azure=True`) and any OpenAI-compatible server
(`base_url=...`, e.g. `sglbatch serve`'s `/v1`). As SGLang's OpenAI backend:

* chat models (the default) send `s.messages_`; `gen` must come right after
  `sgl.assistant(...)` begins, unless the program runs with `num_api_spec_tokens`
  (API speculative execution, `openai_speculative`: one call fills every `gen` of the
  assistant turn);
* completion models (`is_chat_model=False`) continue `s.text_`;
* `regex` is not part of the OpenAI API: warned about and ignored -- unless
  `sglang_extras=True`, which sends regex (and SGLang's other extra sampling fields,
  `gen(dtype=...)` as its regex) in the request body, for servers that take them
  (sglbatch, SGLang);
* `json_schema` becomes `response_format={"type": "json_schema", ...}` on chat models
  (standard OpenAI); on completion models it needs `sglang_extras=True`.

`select` works on chat and completion models: see `openai_select`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any

from sglbatch.lang.backend.base_backend import BaseBackend
from sglbatch.lang.backend.openai_select import OpenAIChoiceSelection
from sglbatch.lang.backend.openai_speculative import OpenAISpeculativeExecution
from sglbatch.lang.chat_template import (
    ChatTemplate,
    get_chat_template,
    get_chat_template_by_model_path,
)
from sglbatch.lang.ir import REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR, SglSamplingParams

__all__ = ["INSTRUCT_MODEL_NAMES", "OpenAI", "TokenUsage"]

INSTRUCT_MODEL_NAMES = ["gpt-3.5-turbo-instruct"]


def _import_openai():
    try:
        import openai
    except ImportError as e:
        raise ImportError(
            "sglbatch's OpenAI backend needs the `openai` package (the official OpenAI "
            "Python SDK): pip install openai") from e
    return openai


@dataclasses.dataclass
class TokenUsage:
    prompt_tokens: int
    completion_tokens: int

    def reset(self) -> None:
        self.prompt_tokens = self.completion_tokens = 0


def _create_logit_bias_int(tokenizer: Any) -> dict[int, int]:
    """tiktoken: a logit bias towards digit tokens (and space, end of text), for
    gen(dtype=int) on OpenAI's own completion models."""
    ids = []
    for token_id in tokenizer._mergeable_ranks.values():
        text = tokenizer.decode([token_id])
        if all(c.isdigit() for c in text) or text == " ":
            ids.append(token_id)
            if len(ids) >= 299:  # OpenAI takes at most 300 biased tokens
                break
    bias = {t: 100 for t in ids}
    bias[tokenizer._special_tokens["<|endoftext|>"]] = 100
    return bias


class OpenAI(OpenAISpeculativeExecution, OpenAIChoiceSelection, BaseBackend):
    """A backend on the OpenAI API (chat or completion models)."""

    def __init__(
        self,
        model_name: str,
        is_chat_model: bool | None = None,
        chat_template: ChatTemplate | str | None = None,
        is_azure: bool = False,
        *args: Any,
        sglang_extras: bool = False,
        **kwargs: Any,
    ):
        """`args`/`kwargs` go to `openai.OpenAI` (or `openai.AzureOpenAI`): base_url,
        api_key, organization, timeout, max_retries, default_headers, ... With a
        `base_url` and no API key anywhere, the key "EMPTY" is sent (local servers)."""
        super().__init__()
        openai = _import_openai()
        self._openai = openai

        if (not is_azure and kwargs.get("base_url") and kwargs.get("api_key") is None
                and not os.environ.get("OPENAI_API_KEY")):
            kwargs["api_key"] = "EMPTY"
        if is_azure:
            self.client = openai.AzureOpenAI(*args, **kwargs)
        else:
            self.client = openai.OpenAI(*args, **kwargs)

        self.model_name = model_name
        self.sglang_extras = sglang_extras
        self.tokenizer = None
        self.logit_bias_int = None
        try:  # exact token ids only exist for OpenAI's own models
            import tiktoken

            try:
                self.tokenizer = tiktoken.encoding_for_model(model_name)
            except KeyError:
                self.tokenizer = tiktoken.get_encoding("cl100k_base")
            self.logit_bias_int = _create_logit_bias_int(self.tokenizer)
        except Exception:  # noqa: BLE001 - not installed, or no network for the encoding
            self.tokenizer = self.logit_bias_int = None

        if isinstance(chat_template, str):
            chat_template = get_chat_template(chat_template)
        self.chat_template = chat_template or get_chat_template_by_model_path(model_name)

        if is_chat_model is not None:
            self.is_chat_model = is_chat_model
        else:
            self.is_chat_model = model_name not in INSTRUCT_MODEL_NAMES

        self.chat_prefix = self.chat_template.role_prefix_and_suffix["assistant"][0]

        self.token_usage = TokenUsage(0, 0)

    def get_model_name(self) -> str:
        return self.model_name

    def get_chat_template(self):
        return self.chat_template

    def _is_reasoning_model(self) -> bool:
        """o-series models take max_completion_tokens instead of max_tokens."""
        name = self.model_name
        return name.startswith(("o1", "o3", "o4")) or "o1" in name

    # ----------------------------------------------------------------- requests

    def _request_kwargs(self, sampling_params: SglSamplingParams,
                        for_chat: bool | None = None) -> dict[str, Any]:
        """Sampling parameters as keyword arguments of the SDK's create()."""
        for_chat = self.is_chat_model if for_chat is None else for_chat
        params = sampling_params
        if self.sglang_extras and params.regex is not None:
            params = dataclasses.replace(params, regex=None)  # sent below; no warning
        kwargs = params.to_openai_kwargs()
        if self._is_reasoning_model():
            kwargs.pop("max_tokens", None)
        else:
            kwargs.pop("max_completion_tokens", None)
        if kwargs.get("stop") is not None and not isinstance(kwargs["stop"], str):
            kwargs["stop"] = list(kwargs["stop"])

        extra: dict[str, Any] = {}
        schema = sampling_params.json_schema
        if schema is not None:
            if for_chat and not self.sglang_extras:
                parsed = json.loads(schema) if isinstance(schema, str) else schema
                kwargs["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "output", "schema": parsed}}
            elif self.sglang_extras:
                extra["json_schema"] = schema if isinstance(schema, str) else json.dumps(schema)
            else:
                warnings.warn("json_schema is not supported by OpenAI completion models; "
                              "ignored (OpenAI(..., sglang_extras=True) sends it).")
        if self.sglang_extras:
            if sampling_params.regex is not None:
                extra["regex"] = sampling_params.regex
            if sampling_params.top_k is not None and sampling_params.top_k > 0:
                extra["top_k"] = sampling_params.top_k
            if sampling_params.min_p:
                extra["min_p"] = sampling_params.min_p
            if sampling_params.min_new_tokens:
                extra["min_tokens"] = sampling_params.min_new_tokens
            if sampling_params.stop_token_ids:
                extra["stop_token_ids"] = list(sampling_params.stop_token_ids)
            if sampling_params.ignore_eos:
                extra["ignore_eos"] = True
        if extra:
            kwargs["extra_body"] = {**kwargs.get("extra_body", {}), **extra}
        return kwargs

    def _count_usage(self, ret: Any) -> None:
        usage = getattr(ret, "usage", None)
        if usage is not None:
            self.token_usage.prompt_tokens += usage.prompt_tokens or 0
            self.token_usage.completion_tokens += usage.completion_tokens or 0

    def _completion(self, prompt: Any, is_chat: bool | None = None, **kwargs: Any
                    ) -> tuple[str | list[str], dict[str, Any]]:
        """One create() call: the text (a list for several choices) and a meta_info."""
        is_chat = self.is_chat_model if is_chat is None else is_chat
        if "ebnf" in kwargs:
            warnings.warn("EBNF is not officially supported by OpenAI endpoints. Ignoring.")
            del kwargs["ebnf"]
        if kwargs.get("stop", 0) is None:
            kwargs.pop("stop")
        if is_chat:
            ret = self.client.chat.completions.create(
                model=self.model_name, messages=prompt, **kwargs)
            texts = [c.message.content or "" for c in ret.choices]
        else:
            ret = self.client.completions.create(model=self.model_name, prompt=prompt, **kwargs)
            texts = [c.text for c in ret.choices]
        self._count_usage(ret)
        meta = {"id": ret.id,
                "finish_reason": [c.finish_reason for c in ret.choices]
                if len(ret.choices) > 1 else ret.choices[0].finish_reason}
        if ret.usage is not None:
            meta["prompt_tokens"] = ret.usage.prompt_tokens
            meta["completion_tokens"] = ret.usage.completion_tokens
        if len(texts) == 1 and not (isinstance(prompt, list) and not is_chat
                                    and prompt and isinstance(prompt[0], str)):
            return texts[0], meta
        return texts, meta

    def _completion_stream(self, prompt: Any, **kwargs: Any):
        if "ebnf" in kwargs:
            warnings.warn("EBNF is not officially supported by OpenAI endpoints. Ignoring.")
            del kwargs["ebnf"]
        if kwargs.get("stop", 0) is None:
            kwargs.pop("stop")
        if self.is_chat_model:
            stream = self.client.chat.completions.create(
                model=self.model_name, messages=prompt, stream=True,
                stream_options={"include_usage": True}, **kwargs)
        else:
            stream = self.client.completions.create(
                model=self.model_name, prompt=prompt, stream=True,
                stream_options={"include_usage": True}, **kwargs)
        for chunk in stream:
            if getattr(chunk, "usage", None) is not None:
                self._count_usage(chunk)
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            if self.is_chat_model:
                content = choice.delta.content if choice.delta is not None else None
            else:
                content = choice.text
            meta = {"finish_reason": choice.finish_reason} if choice.finish_reason else {}
            yield content or "", meta

    def _require_chat_prefix(self, s: Any, what: str = "sgl.gen") -> None:
        if not s.text_.endswith(self.chat_prefix):
            raise RuntimeError(
                "This use case is not supported if api speculative execution is off. "
                f"For OpenAI chat models, {what} must be right after sgl.assistant. "
                "Example of adding api speculative execution: "
                "@function(num_api_spec_tokens=128).")

    # ----------------------------------------------------------------- generation

    def _dtype_as_regex(self, sampling_params: SglSamplingParams) -> SglSamplingParams:
        """gen(dtype=...) as the regex (and stops) RuntimeEndpoint constrains it with."""
        params = dataclasses.replace(sampling_params)
        stop = [] if not params.stop else (
            [params.stop] if isinstance(params.stop, str) else list(params.stop))
        dtype = params.dtype
        if dtype in ("int", int):
            params.regex, stop = REGEX_INT, stop + [" ", "\n"]
        elif dtype in ("float", float):
            params.regex, stop = REGEX_FLOAT, stop + [" ", "\n"]
        elif dtype in ("str", str, "string"):
            params.regex = REGEX_STR
        elif dtype in ("bool", bool):
            params.regex = REGEX_BOOL
        else:
            raise ValueError(f"Unknown dtype: {dtype}")
        params.stop, params.dtype = stop, None
        return params

    def generate(self, s: Any, sampling_params: SglSamplingParams,
                 spec_var_name: str | None = None):
        if sampling_params.dtype is not None and self.sglang_extras:
            sampling_params = self._dtype_as_regex(sampling_params)

        if sampling_params.dtype is None:
            if self.is_chat_model:
                if getattr(s, "num_api_spec_tokens", None) is None:
                    self._require_chat_prefix(s)
                    prompt = s.messages_
                else:
                    return self._prepare_spec_execution(
                        sampling_params, s.num_api_spec_tokens, spec_var_name)
            else:
                prompt = s.text_
            return self._completion(prompt, **self._request_kwargs(sampling_params))

        if sampling_params.dtype in (str, "str", "string"):
            assert not self.is_chat_model, "constrained type not supported on chat model"
            kwargs = self._request_kwargs(sampling_params)
            kwargs.pop("stop", None)
            comp, meta = self._completion(s.text_ + '"', stop='"', **kwargs)
            if isinstance(comp, list):
                return ['"' + x + '"' for x in comp], meta
            return '"' + comp + '"', meta

        if sampling_params.dtype in (int, "int"):
            assert not self.is_chat_model, "constrained type not supported on chat model"
            kwargs = self._request_kwargs(sampling_params)
            kwargs.pop("stop", None)
            if self.logit_bias_int is not None and self.client.base_url.host.endswith(
                    "openai.com"):
                kwargs["logit_bias"] = self.logit_bias_int
            return self._completion(s.text_, stop=[" "], **kwargs)

        raise ValueError(f"Unknown dtype: {sampling_params.dtype}")

    def generate_stream(self, s: Any, sampling_params: SglSamplingParams):
        if sampling_params.dtype is not None:
            if not self.sglang_extras:
                raise ValueError(f"Unknown dtype: {sampling_params.dtype}")
            sampling_params = self._dtype_as_regex(sampling_params)
        if self.is_chat_model:
            if not s.text_.endswith(self.chat_prefix):
                raise RuntimeError(
                    "This use case is not supported. "
                    "For OpenAI chat models, sgl.gen must be right after sgl.assistant")
            prompt = s.messages_
        else:
            prompt = s.text_
        return self._completion_stream(prompt, **self._request_kwargs(sampling_params))

