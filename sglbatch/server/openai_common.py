"""What the OpenAI routes share: request -> engine sampling parameters, engine finish
reasons and usage in OpenAI's shapes, ids and timestamps."""

from __future__ import annotations

import time
import uuid
from typing import Any

from sglbatch.server.errors import APIError
from sglbatch.server.protocol import SamplingExtras

# OpenAI sampling fields whose SGLang name differs, or that only exist on one side.
_DIRECT = ("n", "stop", "frequency_penalty", "presence_penalty", "regex", "ebnf",
           "json_schema", "stop_token_ids", "ignore_eos", "skip_special_tokens",
           "spaces_between_special_tokens", "no_stop_trim", "custom_params", "logit_bias")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def sampling_params(req: SamplingExtras, max_new_tokens: int) -> dict[str, Any]:
    """An OpenAI request's sampling fields as SGLang sampling parameters. Temperature and
    top_p default to OpenAI's 1.0; `max_new_tokens` is what the caller resolved."""
    params: dict[str, Any] = {name: getattr(req, name) for name in _DIRECT}
    params.update(
        max_new_tokens=max_new_tokens, min_new_tokens=req.min_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
        sampling_seed=req.seed)
    return {k: v for k, v in params.items() if v is not None}


def resolve_max_tokens(value: int | None, context_room: int, name: str) -> int:
    if value is None:
        return context_room  # OpenAI: up to the context; the engine clips per prompt
    if value < 0:
        raise APIError(400, f"{name} must be >= 0, got {value}", name)
    return value


def finish_reason(meta: dict[str, Any]) -> str | None:
    reason = meta.get("finish_reason")
    if reason is None:
        return None
    if reason["type"] == "abort":
        raise APIError(500, f"the request was aborted: {reason.get('message')}")
    return "length" if reason["type"] == "length" else "stop"


def matched_stop(meta: dict[str, Any]) -> Any:
    reason = meta.get("finish_reason") or {}
    return reason.get("matched")


def usage(outputs: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """Prompt tokens count once per prompt (its n samples share it), as OpenAI bills."""
    prompts = outputs[::n]
    prompt_tokens = sum(o["meta_info"]["prompt_tokens"] for o in prompts)
    completion = sum(o["meta_info"]["completion_tokens"] for o in outputs)
    cached = sum(o["meta_info"]["cached_tokens"] for o in prompts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}
