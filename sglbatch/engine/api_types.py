"""The engine's typed boundary: one request in, one output out (or stream deltas), and
why a request finished. No torch here: light callers import it too.

Every caller (server routes, jobs, the frontend language, bench) builds `GenerateRequest`s
and reads `GenerateOutput`s. Dicts exist only at the edges: `Engine.generate` takes
SGLang's dict arguments and returns SGLang's dicts (`to_json`) for compatibility, and the
HTTP and file writers call `to_json` themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from sglbatch.engine.errors import ENGINE_ERROR_STATUS
from sglbatch.engine.sampling_params import SamplingParams

FinishKind = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class FinishReason:
    """Why a request stopped; `to_json` gives SGLang's `meta_info.finish_reason` shape."""

    kind: FinishKind
    matched: int | str | None = None  # the stop token or string ("stop")
    length: int | None = None  # output tokens ("length")
    message: str | None = None  # why ("abort")
    status_code: int | None = None  # set on aborts the engine caused (500), as SGLang

    @classmethod
    def stop(cls, matched: int | str) -> FinishReason:
        return cls("stop", matched=matched)

    @classmethod
    def max_length(cls, length: int) -> FinishReason:
        return cls("length", length=length)

    @classmethod
    def abort(cls, message: str, status_code: int | None = None) -> FinishReason:
        return cls("abort", message=message, status_code=status_code)

    @property
    def engine_error(self) -> str | None:
        """The message of an abort that an engine failure caused, else None."""
        if self.kind == "abort" and (self.status_code or 0) >= ENGINE_ERROR_STATUS:
            return self.message or "engine error"
        return None

    def to_json(self) -> dict[str, Any]:
        if self.kind == "stop":
            return {"type": "stop", "matched": self.matched}
        if self.kind == "length":
            return {"type": "length", "length": self.length}
        if self.status_code is None:
            return {"type": "abort", "message": self.message}
        return {"type": "abort", "message": self.message, "status_code": self.status_code}

    @classmethod
    def from_json(cls, value: dict[str, Any] | None) -> FinishReason | None:
        """SGLang's shape back into a reason (a server's answer); unknown types read as
        "stop", as OpenAI's "tool_calls" and "content_filter" end a completion normally."""
        if value is None:
            return None
        kind = value.get("type")
        if kind == "length":
            return cls.max_length(value.get("length"))
        if kind == "abort":
            return cls.abort(value.get("message"), value.get("status_code"))
        return cls.stop(value.get("matched"))


_CORE_META = ("id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens",
              "e2e_latency")


@dataclass
class GenerateRequest:
    """One prompt: exactly one of `prompt`, `input_ids` or `messages`. The logprob fields
    and `custom_logit_processor` are SGLang's `generate` arguments of the same names."""

    prompt: str | None = None
    input_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    rid: str | None = None
    return_logprob: bool = False
    logprob_start_len: int | None = None
    top_logprobs_num: int | None = None
    token_ids_logprob: list[int] | None = None
    return_text_in_logprobs: bool = False
    custom_logit_processor: str | None = None


@dataclass
class MetaInfo:
    """SGLang's `meta_info`: `to_json()` gives the dict SGLang's engine and server return."""

    id: str | None
    finish_reason: FinishReason | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    e2e_latency: float | None = None
    # SGLang's logprob fields (input_token_logprobs, output_top_logprobs, ...), when asked.
    logprobs: dict[str, Any] = field(default_factory=dict)
    # Fields another server sent that this engine does not produce, kept as they came.
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "finish_reason": self.finish_reason.to_json() if self.finish_reason else None,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
        }
        if self.e2e_latency is not None:
            out["e2e_latency"] = self.e2e_latency
        return {**out, **self.logprobs, **self.extra}

    @classmethod
    def from_json(cls, meta: dict[str, Any]) -> MetaInfo:
        """A server's `meta_info` (SGLang's or ours)."""
        logprobs = {k: v for k, v in meta.items() if "logprob" in k}
        return cls(id=meta.get("id"),
                   finish_reason=FinishReason.from_json(meta.get("finish_reason")),
                   prompt_tokens=meta.get("prompt_tokens") or 0,
                   completion_tokens=meta.get("completion_tokens") or 0,
                   cached_tokens=meta.get("cached_tokens") or 0,
                   e2e_latency=meta.get("e2e_latency"), logprobs=logprobs,
                   extra={k: v for k, v in meta.items()
                          if k not in _CORE_META and k not in logprobs})


@dataclass
class GenerateOutput:
    """A finished request: its text, its token ids and its meta_info."""

    text: str
    output_ids: list[int]
    meta_info: MetaInfo

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.meta_info.finish_reason

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "output_ids": self.output_ids,
                "meta_info": self.meta_info.to_json()}


@dataclass
class StreamDelta(GenerateOutput):
    """What a stream sends: the text and ids since the last delta (meta_info is cumulative),
    and which of the call's requests it belongs to."""

    index: int = 0

    @property
    def finished(self) -> bool:
        return self.meta_info.finish_reason is not None

    def to_json(self, with_index: bool = False) -> dict[str, Any]:
        """SGLang's delta dict; batches carry `index`."""
        out = super().to_json()
        return {**out, "index": self.index} if with_index else out


@dataclass(frozen=True)
class EngineInfo:
    """What callers may ask about an engine's model and memory, however it runs (one engine,
    tensor-parallel ranks, or data-parallel replicas: then per replica)."""

    model_dir: str
    context_len: int
    max_req_len: int  # longest prompt + output one request may take
    vocab_size: int
    max_total_num_tokens: int  # KV slots
    dtype: str
    device: str
    flops_per_token: int  # of the model's linear layers, for compute ceilings


Sink = Callable[[int, GenerateOutput], None]  # (index within the caller's call, the output)
