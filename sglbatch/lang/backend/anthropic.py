"""Anthropic (Claude) backend of the frontend language, on the official
``anthropic`` SDK (``pip install "sglbatch[anthropic]"``).

Like SGLang's ``sgl.Anthropic``: each ``sgl.gen`` is one Messages API call with
the program's chat messages; a system message goes to the top-level ``system``
parameter (the Messages API has no "system" role); ``stop`` becomes
``stop_sequences`` and ``max_tokens`` is sent as is. ``sgl.select`` is not
supported (the API returns no token log-probabilities).

Differences from SGLang's backend:

* the program's messages are not modified (SGLang pops the system message out
  of ``s.messages_``), and every system message goes to ``system``;
* text already written inside the open assistant turn before ``sgl.gen``
  (``sgl.assistant("The answer is " + sgl.gen(...))``) is sent as an assistant
  prefill, which the Messages API continues, instead of being dropped;
* OpenAI-style image parts (``sgl.image``) become Anthropic image blocks;
* sampling parameters: only ``temperature``/``top_p``/``top_k`` that differ from
  the defaults (1.0 / 1.0 / disabled, which are also the API's) are sent, through
  ``extra_body`` since the SDK's typed arguments dropped them (anthropic 1.0).
  API version 2026-10-21 (sent by anthropic>=2) rejects them at any value, so
  with that version they are left out with a warning; to send them, pin an older
  version: ``Anthropic(model, default_headers={"anthropic-version": "2023-06-01"})``;
* meta_info carries ``id``, ``finish_reason`` (``{"type": "stop", "matched": ...}``
  or ``{"type": "length", ...}``, as the local runtime), ``prompt_tokens`` and
  ``completion_tokens``; a stream ends with an empty chunk carrying it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from sglbatch.lang.backend.base_backend import BaseBackend
from sglbatch.lang.chat_template import get_chat_template
from sglbatch.lang.ir import SglSamplingParams

if TYPE_CHECKING:  # pragma: no cover
    from sglbatch.lang.interpreter import StreamExecutor

INSTALL_HINT = 'pip install "sglbatch[anthropic]"'

# From this API version on, temperature/top_p/top_k are rejected (HTTP 400).
_NO_SAMPLING_API_VERSION = "2026-10-21"


def _import_anthropic():
    try:
        import anthropic
    except ImportError as e:
        raise ImportError(
            "sglbatch.lang.backend.Anthropic needs the Anthropic SDK, which is not "
            f"installed: {INSTALL_HINT}"
        ) from e
    return anthropic


def _text_of(content: Any) -> str:
    """The text of a message content (a string or OpenAI-style parts)."""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def _to_anthropic_content(content: Any) -> Any:
    """OpenAI chat content (str, or text / image_url parts) -> Anthropic content."""
    if isinstance(content, str):
        return content
    blocks: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            if part.get("text"):  # the API rejects empty text blocks
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            url = part["image_url"]["url"]
            if url.startswith("data:"):
                header, data = url.split(",", 1)
                media_type = header[len("data:"):].split(";")[0] or "image/jpeg"
                source = {"type": "base64", "media_type": media_type, "data": data}
            else:
                source = {"type": "url", "url": url}
            blocks.append({"type": "image", "source": source})
        else:  # already an Anthropic block
            blocks.append(part)
    return blocks


def _open_assistant_text(s: StreamExecutor) -> str:
    """Text written in the still-open assistant turn before this gen, if any."""
    if getattr(s, "cur_role", None) != "assistant":
        return ""
    begin = getattr(s, "cur_role_begin_pos", None)
    if begin is None:
        return ""
    return s.text_[begin:]


def _finish_reason(stop_reason: str | None, stop_sequence: str | None,
                   completion_tokens: int | None) -> dict[str, Any] | None:
    if stop_reason is None:
        return None
    if stop_reason == "max_tokens":
        return {"type": "length", "length": completion_tokens}
    return {"type": "stop", "matched": stop_sequence, "stop_reason": stop_reason}


def _meta_info(message: Any) -> dict[str, Any]:
    usage = getattr(message, "usage", None)
    completion_tokens = getattr(usage, "output_tokens", None)
    return {
        "id": getattr(message, "id", None),
        "finish_reason": _finish_reason(
            getattr(message, "stop_reason", None),
            getattr(message, "stop_sequence", None),
            completion_tokens,
        ),
        "prompt_tokens": getattr(usage, "input_tokens", None),
        "completion_tokens": completion_tokens,
    }


class Anthropic(BaseBackend):
    """``Anthropic(model_name, *args, **kwargs)``: the extra arguments go to
    ``anthropic.Anthropic`` (``api_key``, ``base_url``, ``timeout``,
    ``max_retries``, ``default_headers``, ...)."""

    def __init__(self, model_name: str, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        anthropic = _import_anthropic()
        self.model_name = model_name
        self.chat_template = get_chat_template("claude")
        self.client = anthropic.Anthropic(*args, **kwargs)
        self._warned_sampling = False

    def get_model_name(self) -> str:
        return self.model_name

    def get_chat_template(self):
        return self.chat_template

    # ---- request building -------------------------------------------------

    def _api_accepts_sampling(self) -> bool:
        version = getattr(self.client, "default_headers", {}).get("anthropic-version")
        return not (isinstance(version, str) and version >= _NO_SAMPLING_API_VERSION)

    def _sampling_kwargs(self, sampling_params: SglSamplingParams) -> dict[str, Any]:
        kwargs = sampling_params.to_anthropic_kwargs()
        out: dict[str, Any] = {"max_tokens": kwargs["max_tokens"]}
        stops = [x for x in (kwargs.get("stop_sequences") or ()) if x]
        if stops:
            out["stop_sequences"] = stops
        sampling: dict[str, Any] = {}
        temperature, top_p, top_k = (kwargs.get(k) for k in ("temperature", "top_p", "top_k"))
        if temperature is not None and temperature != 1.0:
            sampling["temperature"] = temperature
        if top_p is not None and top_p < 1.0:
            sampling["top_p"] = top_p
        if top_k is not None and top_k > 0:
            sampling["top_k"] = top_k
        if sampling:
            if self._api_accepts_sampling():
                out["extra_body"] = sampling
            elif not self._warned_sampling:
                self._warned_sampling = True
                warnings.warn(
                    f"Anthropic API version {_NO_SAMPLING_API_VERSION} and later reject "
                    f"sampling parameters; not sending {sorted(sampling)}. To send them, "
                    "pin an older API version: Anthropic(model, default_headers="
                    "{'anthropic-version': '2023-06-01'}).",
                    stacklevel=3,
                )
        return out

    def _request(self, s: StreamExecutor,
                 sampling_params: SglSamplingParams) -> tuple[dict[str, Any], bool]:
        """The messages.create arguments, and whether an assistant prefill ended
        in whitespace (the API wants it stripped; the reply then starts with it)."""
        source = s.messages_ if s.messages_ else [{"role": "user", "content": s.text_}]
        system_parts: list[str] = []
        messages: list[dict[str, Any]] = []
        for msg in source:
            if msg["role"] == "system":
                system_parts.append(_text_of(msg["content"]))
            else:
                messages.append(
                    {"role": msg["role"], "content": _to_anthropic_content(msg["content"])}
                )

        prefill_stripped_space = False
        partial = _open_assistant_text(s)
        if s.messages_ and partial.strip():
            # The API rejects a final assistant message ending in whitespace.
            messages.append({"role": "assistant", "content": partial.strip()})
            prefill_stripped_space = partial != partial.rstrip()

        request: dict[str, Any] = {"model": self.model_name, "messages": messages}
        system = "\n\n".join(p for p in system_parts if p)
        if system:
            request["system"] = system
        request.update(self._sampling_kwargs(sampling_params))
        return request, prefill_stripped_space

    # ---- BaseBackend --------------------------------------------------------

    def generate(self, s: StreamExecutor, sampling_params: SglSamplingParams):
        request, strip_lead = self._request(s, sampling_params)
        message = self.client.messages.create(**request)
        text = "".join(
            block.text for block in message.content if getattr(block, "type", None) == "text"
        )
        if strip_lead:
            text = text.lstrip()
        return text, _meta_info(message)

    def generate_stream(
        self, s: StreamExecutor, sampling_params: SglSamplingParams
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        request, strip_lead = self._request(s, sampling_params)
        with self.client.messages.stream(**request) as stream:
            for text in stream.text_stream:
                if strip_lead:
                    text = text.lstrip()
                    if not text:
                        continue
                    strip_lead = False
                yield text, {}
            final = stream.get_final_message()
        yield "", _meta_info(final)

    def select(self, s, choices, temperature, choices_method=None):
        raise NotImplementedError(
            "sgl.select is not supported by the Anthropic backend: the Messages API "
            "returns no token log-probabilities to score the choices. Use sgl.gen and "
            "parse the answer, or a backend with logprobs (sgl.RuntimeEndpoint)."
        )


__all__ = ["Anthropic"]
