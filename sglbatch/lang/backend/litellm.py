"""LiteLLM backend of the frontend language, on the ``litellm`` SDK
(``pip install "sglbatch[litellm]"``): one backend for the many providers LiteLLM
routes to (``"gpt-4o"``, ``"anthropic/claude-..."``, ``"openai/<model>"`` with a
``base_url`` for any OpenAI-compatible server, ...).

As SGLang's ``sgl.LiteLLM``: each ``sgl.gen`` is one ``litellm.completion`` call
on the program's chat messages (OpenAI format; a program without roles is sent
as one user message), with the client parameters given here. ``sgl.select`` is
not supported.

Differences from SGLang's backend:

* parameters at their no-op defaults are left out of the request
  (``top_p=1``, zero frequency/presence penalties, no stop), so that providers
  which do not take them do not fail; ``max_tokens`` and ``temperature`` are
  always sent; client parameters left as None are not passed;
* ``default_headers`` are sent as LiteLLM's ``extra_headers``;
* a reply with no content reads as ""; meta_info carries ``id``,
  ``finish_reason`` (as the local runtime's) and token counts; a stream ends with
  an empty chunk carrying it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from sglbatch.lang.backend.base_backend import BaseBackend
from sglbatch.lang.chat_template import get_chat_template_by_model_path
from sglbatch.lang.ir import SglSamplingParams

if TYPE_CHECKING:  # pragma: no cover
    from sglbatch.lang.interpreter import StreamExecutor

INSTALL_HINT = 'pip install "sglbatch[litellm]"'


def _import_litellm():
    try:
        import litellm
    except ImportError as e:
        raise ImportError(
            "sglbatch.lang.backend.LiteLLM needs the LiteLLM SDK, which is not "
            f"installed: {INSTALL_HINT}"
        ) from e
    return litellm


def _finish_reason(reason: str | None, completion_tokens: int | None):
    if reason is None:
        return None
    if reason == "length":
        return {"type": "length", "length": completion_tokens}
    return {"type": "stop", "matched": None, "stop_reason": reason}


def _meta_info(response_id: Any, reason: str | None, usage: Any) -> dict[str, Any]:
    completion_tokens = getattr(usage, "completion_tokens", None)
    return {
        "id": response_id,
        "finish_reason": _finish_reason(reason, completion_tokens),
        "prompt_tokens": getattr(usage, "prompt_tokens", None),
        "completion_tokens": completion_tokens,
    }


class LiteLLM(BaseBackend):
    def __init__(
        self,
        model_name: str,
        chat_template=None,
        api_key: str | None = None,
        organization: str | None = None,
        base_url: str | None = None,
        timeout: float | None = 600,
        max_retries: int | None = None,
        default_headers: Mapping[str, str] | None = None,
    ) -> None:
        """``max_retries=None`` keeps LiteLLM's own default (``litellm.num_retries``)."""
        super().__init__()
        self._litellm = _import_litellm()
        self.model_name = model_name
        self.chat_template = chat_template or get_chat_template_by_model_path(model_name)
        params = {
            "api_key": api_key,
            "organization": organization,
            "base_url": base_url,
            "timeout": timeout,
            "max_retries": max_retries,
            "extra_headers": dict(default_headers) if default_headers else None,
        }
        self.client_params = {k: v for k, v in params.items() if v is not None}

    def get_model_name(self) -> str:
        return self.model_name

    def get_chat_template(self):
        return self.chat_template

    def _request(self, s: StreamExecutor, sampling_params: SglSamplingParams):
        messages = s.messages_ if s.messages_ else [{"role": "user", "content": s.text_}]
        kwargs = sampling_params.to_litellm_kwargs()
        if kwargs.get("top_p") == 1.0:
            del kwargs["top_p"]
        for key in ("frequency_penalty", "presence_penalty"):
            if not kwargs.get(key):
                kwargs.pop(key, None)
        stop = kwargs.get("stop")
        if not stop:
            kwargs.pop("stop", None)
        elif isinstance(stop, tuple):
            kwargs["stop"] = list(stop)
        return {
            "model": self.model_name,
            "messages": [dict(m) for m in messages],
            **self.client_params,
            **{k: v for k, v in kwargs.items() if v is not None},
        }

    def generate(self, s: StreamExecutor, sampling_params: SglSamplingParams):
        ret = self._litellm.completion(**self._request(s, sampling_params))
        choice = ret.choices[0]
        text = choice.message.content or ""
        return text, _meta_info(getattr(ret, "id", None), choice.finish_reason,
                                getattr(ret, "usage", None))

    def generate_stream(
        self, s: StreamExecutor, sampling_params: SglSamplingParams
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        ret = self._litellm.completion(stream=True, **self._request(s, sampling_params))
        response_id = reason = usage = None
        for chunk in ret:
            response_id = getattr(chunk, "id", None) or response_id
            usage = getattr(chunk, "usage", None) or usage
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            reason = choice.finish_reason or reason
            text = choice.delta.content
            if text:
                yield text, {}
        yield "", _meta_info(response_id, reason, usage)

    def select(self, s, choices, temperature, choices_method=None):
        raise NotImplementedError(
            "sgl.select is not supported by the LiteLLM backend: chat completion APIs "
            "give no prompt log-probabilities to score the choices. Use sgl.gen and "
            "parse the answer, or a backend with logprobs (sgl.RuntimeEndpoint)."
        )


__all__ = ["LiteLLM"]
