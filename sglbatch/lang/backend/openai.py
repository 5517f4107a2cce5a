"""OpenAI: the frontend language over the OpenAI API, through the official `openai` SDK.

Works with OpenAI itself, Azure OpenAI (`is_azure=True`) and any OpenAI-compatible server
(`base_url=...`, e.g. `sglbatch serve`'s `/v1`). As SGLang's OpenAI backend:

* chat models (the default) send `s.messages_`; `gen` must come right after
  `sgl.assistant(...)` begins, unless the program runs with `num_api_spec_tokens`
  (API speculative execution: one call fills every `gen` of the assistant turn);
* completion models (`is_chat_model=False`) continue `s.text_`;
* `regex` is not part of the OpenAI API: warned about and ignored -- unless
  `sglang_extras=True`, which sends regex (and SGLang's other extra sampling fields,
  `gen(dtype=...)` as its regex) in the request body, for servers that take them
  (sglbatch, SGLang);
* `json_schema` becomes `response_format={"type": "json_schema", ...}` on chat models
  (standard OpenAI); on completion models it needs `sglang_extras=True`.

`select` (SGLang's raises for chat models and needs tiktoken's exact tokenization):

* completion models: the choices are scored by their prompt logprobs (`echo=True`,
  `logprobs=0`, `max_tokens=0`), with the same token healing and `choices_method` as the
  native backend, so against an sglbatch/SGLang server it decides as RuntimeEndpoint does;
  where the server gives no prompt logprobs, as below;
* otherwise (chat models, or no logprobs): the model generates the continuation (greedy
  by default) and the choice it starts with, or names, is taken; for chat models where
  nothing matches, the model is asked once more with the options listed in the last user
  message; where that fails too, the most similar choice wins.
  `meta_info["select_method"]` says which way a decision was reached.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import re
import warnings
from typing import Any

from sglbatch.lang.backend.base_backend import BaseBackend
from sglbatch.lang.chat_template import (
    ChatTemplate,
    get_chat_template,
    get_chat_template_by_model_path,
)
from sglbatch.lang.choices import ChoicesDecision, ChoicesSamplingMethod
from sglbatch.lang.ir import REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR, SglSamplingParams

logger = logging.getLogger(__name__)

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


def _is_reasoning_model(name: str) -> bool:
    """o-series models take max_completion_tokens instead of max_tokens."""
    return name.startswith(("o1", "o3", "o4")) or "o1" in name


class OpenAI(BaseBackend):
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

        # API speculative execution (not thread-safe, as in SGLang: no run_batch).
        self.spec_kwargs: dict[str, Any] = {}
        self.spec_format: list[dict[str, Any]] = []
        self.spec_max_num_tries = 3

        # Whether the server scores prompts (echo + logprobs); learnt on first select.
        self._echo_logprobs: bool | None = None

    def get_model_name(self) -> str:
        return self.model_name

    def get_chat_template(self):
        return self.chat_template

    # ----------------------------------------------------------------- requests

    def _request_kwargs(self, sampling_params: SglSamplingParams,
                        for_chat: bool | None = None) -> dict[str, Any]:
        """Sampling parameters as keyword arguments of the SDK's create()."""
        for_chat = self.is_chat_model if for_chat is None else for_chat
        params = sampling_params
        if self.sglang_extras and params.regex is not None:
            params = dataclasses.replace(params, regex=None)  # sent below; no warning
        kwargs = params.to_openai_kwargs()
        if _is_reasoning_model(self.model_name):
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

    # ----------------------------------------------------------------- API speculative execution

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

    # ----------------------------------------------------------------- select

    def select(
        self,
        s: Any,
        choices: list[str],
        temperature: float,
        choices_method: ChoicesSamplingMethod | None = None,
    ) -> ChoicesDecision:
        if choices_method is None:
            from sglbatch.lang.choices import token_length_normalized

            choices_method = token_length_normalized
        if not self.is_chat_model and temperature <= 1e-5 and self._echo_logprobs is not False:
            decision = self._select_by_logprobs(s, choices, choices_method)
            if decision is not None:
                return decision
        return self._select_by_generation(s, choices, temperature)

    def _prompt_logprobs(self, prompts: list[str]) -> list[list[list]] | None:
        """Per prompt, [logprob, None, token_text] for each of its tokens (the first has
        logprob None), from a completions request with echo; None where unsupported."""
        openai = self._openai
        if self._echo_logprobs is False:
            return None
        try:
            ret = self.client.completions.create(
                model=self.model_name, prompt=prompts, max_tokens=0, echo=True, logprobs=0,
                temperature=0)
        except (openai.BadRequestError, openai.NotFoundError,
                openai.UnprocessableEntityError) as e:
            logger.info("prompt logprobs unavailable (%s); select generates instead", e)
            self._echo_logprobs = False
            return None
        self._count_usage(ret)
        out: list[list[list] | None] = [None] * len(prompts)
        for choice in ret.choices:
            lp = choice.logprobs
            if lp is None or not lp.tokens or lp.token_logprobs is None:
                self._echo_logprobs = False
                return None
            out[choice.index] = [[p, None, t] for p, t in zip(lp.token_logprobs, lp.tokens)]
        if any(o is None for o in out):
            self._echo_logprobs = False
            return None
        self._echo_logprobs = True
        return out  # type: ignore[return-value]

    def _select_by_logprobs(self, s: Any, choices: list[str],
                            choices_method: ChoicesSamplingMethod
                            ) -> ChoicesDecision | None:
        """RuntimeEndpoint.select's scoring, with the echoed prompt logprobs of
        /v1/completions in place of /generate's input logprobs."""
        prompts = ([s.text_] if s.text_ else []) + [s.text_ + c for c in choices]
        scored = self._prompt_logprobs(prompts)
        if scored is None:
            return None
        prompt_len = len(scored[0]) if s.text_ else 0
        scored = scored[1:] if s.text_ else scored
        start = max(prompt_len - 2, 0)  # for token healing

        input_token_logprobs = [entries[start:] for entries in scored]
        normalized = [_normalized_logprob(x) for x in input_token_logprobs]
        for i, entries in enumerate(input_token_logprobs):
            if len(entries) > 1 and entries[0][2] and s.text_.endswith(entries[0][2]):
                # No token healing happened: drop the prefix's token.
                first = entries[0][0] or 0.0
                n = len(entries)
                normalized[i] = (normalized[i] * n - first) / (n - 1)
                input_token_logprobs[i] = entries[1:]

        unconditional = None
        if choices_method.requires_unconditional_logprobs:
            # The choices' tokens on their own (re-tokenized from their texts: the legacy
            # logprobs format has no token ids), every token's logprob, the first None.
            texts = ["".join(e[2] for e in entries) for entries in input_token_logprobs]
            unconditional = self._prompt_logprobs(texts)
            if unconditional is None or any(
                    len(u) != len(c) for u, c in zip(unconditional, input_token_logprobs)):
                raise RuntimeError(
                    "select with unconditional_likelihood_normalized needs the choices' "
                    "token logprobs without the prompt, which this server did not give "
                    "token for token")
        decision = choices_method(
            choices=choices,
            normalized_prompt_logprobs=normalized,
            input_token_logprobs=input_token_logprobs,
            output_token_logprobs=[[] for _ in choices],
            unconditional_token_logprobs=unconditional,
        )
        decision.meta_info = {**(decision.meta_info or {}), "select_method": "logprobs"}
        return decision

    def _select_by_generation(self, s: Any, choices: list[str],
                              temperature: float) -> ChoicesDecision:
        max_tokens = min(max(len(c) for c in choices) + 8, 1024)
        kwargs: dict[str, Any] = {"temperature": temperature}
        if _is_reasoning_model(self.model_name):
            kwargs["max_completion_tokens"] = max_tokens
        else:
            kwargs["max_tokens"] = max_tokens
        generated: list[str] = []
        if self.is_chat_model:
            self._require_chat_prefix(s, "sgl.gen(choices=...)/sgl.select")
            text, _ = self._completion(s.messages_, **kwargs)
            generated.append(text)
            decision, how = _match_choice(text, choices)
            if decision is None:  # ask again, with the options spelt out
                kwargs[("max_completion_tokens" if "max_completion_tokens" in kwargs
                        else "max_tokens")] = max_tokens + 16
                text, _ = self._completion(_with_options(s.messages_, choices), **kwargs)
                generated.append(text)
                decision, how = _match_choice(text, choices)
                how = how and how + "_after_prompting"
        else:
            text, _ = self._completion(s.text_, **kwargs)
            generated.append(text)
            decision, how = _match_choice(text, choices)
        if decision is None:
            decision, how = _closest_choice(generated[-1], choices), "closest"
        return ChoicesDecision(decision=decision, meta_info={
            "select_method": f"generation:{how}", "generated_texts": generated})


def _normalized_logprob(entries: list[list]) -> float:
    values = [x[0] for x in entries if x[0]]
    return sum(values) / len(values) if values else 0.0


def _match_choice(text: str, choices: list[str]) -> tuple[str | None, str | None]:
    """The choice the generated text starts with (the longest such), else the one it names
    first; case-sensitive before case-insensitive."""
    stripped = text.lstrip()

    def starts(fold: bool) -> list[str]:
        f = (lambda x: x.lower()) if fold else (lambda x: x)
        return [c for c in choices if c.strip() and (
            f(text).startswith(f(c)) or f(stripped).startswith(f(c.strip())))]

    for fold, how in ((False, "prefix"), (True, "prefix_nocase")):
        hits = starts(fold)
        if hits:
            return max(hits, key=lambda c: len(c.strip())), how
    found = []
    for i, c in enumerate(choices):
        word = c.strip()
        if not word:
            continue
        # A whole-word mention ("no" is not in "not"), case-insensitive.
        pattern = (r"(?<!\w)" if word[0].isalnum() else "") + re.escape(word) + (
            r"(?!\w)" if word[-1].isalnum() else "")
        m = re.search(pattern, stripped, flags=re.IGNORECASE)
        if m:
            found.append((m.start(), -len(word), i))
    if found:
        return choices[min(found)[2]], "mention"
    return None, None


def _closest_choice(text: str, choices: list[str]) -> str:
    stripped = text.strip().lower()

    def score(c: str) -> float:
        target = c.strip().lower()
        return difflib.SequenceMatcher(None, stripped[:max(len(target) * 2, 1)],
                                       target).ratio()

    return max(choices, key=score)


def _with_options(messages: list[dict[str, Any]], choices: list[str]) -> list[dict[str, Any]]:
    """The messages with the options listed in the last user message."""
    note = ("\n\nAnswer with exactly one of the following options, and nothing else:\n"
            + "\n".join(f"- {c.strip()}" for c in choices))
    messages = [dict(m) for m in messages]
    for m in reversed(messages):
        if m.get("role") == "user" and isinstance(m.get("content"), str):
            m["content"] += note
            return messages
    return messages + [{"role": "user", "content": note.strip()}]
