"""API speculative execution on OpenAI chat models (`@sgl.function(num_api_spec_tokens=...)`,
as SGLang's OpenAI backend): the `gen`s and text of an assistant turn are recorded as the
turn runs, and one chat call at the turn's end fills them all, the call's text cut at each
`gen`'s stop. A mixin of the OpenAI backend."""

from __future__ import annotations

import warnings
from typing import Any

from sglbatch.lang.ir import SglSamplingParams


class OpenAISpeculativeExecution:
    """The OpenAI backend's API speculative execution."""

    def __init__(self) -> None:
        super().__init__()
        # The turn recorded so far (not thread-safe, as in SGLang: no run_batch).
        self.spec_kwargs: dict[str, Any] = {}
        self.spec_format: list[dict[str, Any]] = []
        self.spec_max_num_tries = 3

    def _prepare_spec_execution(self, sampling_params: SglSamplingParams,
                                num_api_spec_tokens: int, spec_var_name: str | None):
        if "max_tokens" not in self.spec_kwargs:
            self.spec_kwargs["max_tokens"] = num_api_spec_tokens
        else:
            assert self.spec_kwargs["max_tokens"] == num_api_spec_tokens

        params = self._request_kwargs(sampling_params)
        for key, value in params.items():
            if key in ("stop", "max_completion_tokens"):
                continue
            if key == "max_tokens":
                warnings.warn("The parameter max_tokens will be overwritten by speculated "
                              "number of tokens.")
                continue
            if key not in self.spec_kwargs:
                self.spec_kwargs[key] = value
            else:
                assert value == self.spec_kwargs[key], (
                    "sampling parameters should be consistent if turn on api speculative "
                    "execution.")
        self.spec_format.append({"text": "", "stop": params.get("stop"), "name": spec_var_name})
        return "", {}

    def spec_fill(self, value: str) -> None:
        assert self.is_chat_model
        self.spec_format.append({"text": value, "stop": None, "name": None})

    def spec_pattern_match(self, comp: str) -> bool:
        for i, term in enumerate(self.spec_format):
            text = term["text"]
            if text != "":
                if comp.startswith(text):
                    comp = comp[len(text):]
                else:
                    return False
            else:
                stops = term["stop"]
                stops = [stops] if isinstance(stops, str) else list(stops or [])
                found = [p for p in (comp.find(x) for x in stops) if p != -1]
                if found:
                    pos = min(found)
                    term["text"] = comp[:pos]
                    comp = comp[pos:]
                elif i == len(self.spec_format) - 1:
                    term["text"] = comp
                else:
                    return False
        return True

    def role_end_generate(self, s: Any) -> None:
        if getattr(s, "num_api_spec_tokens", None) is None or not s.text_.endswith(
                self.chat_prefix):
            return
        if not all(x["name"] is None for x in self.spec_format):
            for _ in range(self.spec_max_num_tries):
                comp, _meta = self._completion(s.messages_, **self.spec_kwargs)
                comp_for_match = comp[0] if isinstance(comp, list) else comp
                if self.spec_pattern_match(comp_for_match):
                    break
        for term in self.spec_format:
            s.text_ += term["text"]
            name = term["name"]
            if name is not None:
                s.variables[name] = term["text"]
                s.meta_info[name] = {}
                s.variable_event[name].set()
        self.spec_kwargs = {}
        self.spec_format = []
