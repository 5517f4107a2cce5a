"""What the OpenAI routes share: request -> engine sampling parameters, engine finish
reasons and usage in OpenAI's shapes, ids and timestamps."""

from __future__ import annotations

import time
import uuid
from typing import Any

from sglbatch.engine.api_types import MetaInfo
from sglbatch.engine.sampling_params import SamplingParams
from sglbatch.openai_names import from_openai
from sglbatch.server.errors import APIError
from sglbatch.server.protocol import SamplingExtras


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def sampling_params(req: SamplingExtras, max_new_tokens: int) -> SamplingParams:
    """An OpenAI request's sampling fields as SGLang sampling parameters. Temperature and
    top_p default to OpenAI's 1.0; `max_new_tokens` is what the caller resolved."""
    fields = req.model_dump(exclude={"max_tokens", "max_completion_tokens"})
    params = {"temperature": 1.0, "top_p": 1.0, **from_openai(fields)}
    return SamplingParams.from_dict({**params, "max_new_tokens": max_new_tokens})


def resolve_max_tokens(value: int | None, context_room: int, name: str) -> int:
    if value is None:
        return context_room  # OpenAI: up to the context; the engine clips per prompt
    if value < 0:
        raise APIError(400, f"{name} must be >= 0, got {value}", name)
    return value


def finish_reason(meta: MetaInfo) -> str | None:
    reason = meta.finish_reason
    if reason is None:
        return None
    if reason.kind == "abort":
        raise APIError(500, f"the request was aborted: {reason.message}")
    return "length" if reason.kind == "length" else "stop"


def matched_stop(meta: MetaInfo) -> int | str | None:
    return None if meta.finish_reason is None else meta.finish_reason.matched


def usage(metas: list[MetaInfo], n: int) -> dict[str, Any]:
    """Prompt tokens count once per prompt (its n samples share it), as OpenAI bills."""
    prompts = metas[::n]
    prompt_tokens = sum(m.prompt_tokens for m in prompts)
    completion = sum(m.completion_tokens for m in metas)
    cached = sum(m.cached_tokens for m in prompts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}
