"""/v1/chat/completions: chat template -> engine -> OpenAI's chat.completion objects and
chat.completion.chunk streams."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from sglbatch.server.errors import APIError, bad_request
from sglbatch.server.openai_common import (finish_reason, matched_stop, new_id, now,
                                           resolve_max_tokens, sampling_params, usage)
from sglbatch.server.protocol import ChatCompletionRequest
from sglbatch.server.state import ServerState
from sglbatch.server.streaming import await_or_abort, sse


def _messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """Messages with list-of-parts content flattened to text (only text parts are served)."""
    out = []
    for i, message in enumerate(req.messages):
        if "role" not in message:
            raise APIError(400, f"messages[{i}]: missing `role`", f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise APIError(400, f"messages[{i}].content[{j}]: only text parts are "
                                        "supported by this server", f"messages[{i}].content")
                texts.append(part.get("text", ""))
            message = {**message, "content": "".join(texts)}
        out.append(message)
    return out


def _structured(req: ChatCompletionRequest) -> dict[str, Any]:
    """response_format as SGLang's json_schema sampling parameter."""
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return {}
    if fmt.type == "json_object":
        return {"json_schema": json.dumps({"type": "object"})}
    schema = (fmt.json_schema or {}).get("schema")
    if schema is None:
        raise APIError(400, "response_format.json_schema.schema is required for "
                            "type json_schema", "response_format")
    return {"json_schema": json.dumps(schema)}


async def _start(state: ServerState, req: ChatCompletionRequest, stream: bool) -> Any:
    engine = state.require_generation()
    state.check_model(req.model)
    try:
        prompt_ids = engine.tokenizer.apply_chat_template(
            _messages(req), chat_template=state.chat_template,
            add_generation_prompt=not req.continue_final_message,
            **(req.chat_template_kwargs or {}))
        params = sampling_params(req, resolve_max_tokens(
            req.max_completion_tokens if req.max_completion_tokens is not None
            else req.max_tokens, engine.model_runner.max_req_len, "max_tokens"))
        params.update(_structured(req))
        top = req.top_logprobs or 0
        if top and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return await engine.async_generate(
            input_ids=[prompt_ids], sampling_params=params, stream=stream,
            return_logprob=req.logprobs, top_logprobs_num=top, return_text_in_logprobs=True,
            custom_logit_processor=req.custom_logit_processor,
            rid=[req.rid] if req.rid else None)
    except ValueError as e:
        raise bad_request(e) from None


def _logprobs(meta: dict[str, Any], start: int = 0) -> dict[str, Any] | None:
    entries = meta.get("output_token_logprobs")
    if entries is None:
        return None
    tops = meta.get("output_top_logprobs") or [None] * len(entries)

    def item(lp: float, text: str) -> dict[str, Any]:
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [
        {**item(lp, text), "top_logprobs": [item(t_lp, t_text) for t_lp, _, t_text in top or []]}
        for (lp, _, text), top in zip(entries[start:], tops[start:])]}


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest,
                                 request: Request | None = None) -> dict[str, Any]:
    work = _start(state, req, stream=False)
    outputs = await (await_or_abort(request, work) if request else work)
    choices = [{"index": i,
                "message": {"role": "assistant", "content": out["text"], "tool_calls": None},
                "logprobs": _logprobs(out["meta_info"]),
                "finish_reason": finish_reason(out["meta_info"]),
                "matched_stop": matched_stop(out["meta_info"])}
               for i, out in enumerate(outputs)]
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(),
            "model": state.model_name, "choices": choices, "usage": usage(outputs, req.n)}


async def stream_chat_completion(state: ServerState,
                                 req: ChatCompletionRequest) -> AsyncIterator[str]:
    deltas = await _start(state, req, stream=True)
    return _chat_events(state, req, deltas)


async def _chat_events(state: ServerState, req: ChatCompletionRequest,
                       deltas: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    chunk_id, created = new_id("chatcmpl"), now()
    options = req.stream_options
    finals: dict[int, dict[str, Any]] = {}

    def chunk(index: int, delta: dict[str, Any], reason: str | None = None,
              logprobs: Any = None, meta: dict[str, Any] | None = None) -> str:
        body = {"id": chunk_id, "object": "chat.completion.chunk", "created": created,
                "model": state.model_name,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                             "finish_reason": reason}]}
        if reason is not None:
            body["choices"][0]["matched_stop"] = matched_stop(meta or {})
        if options and options.continuous_usage_stats and meta is not None:
            body["usage"] = usage([{"meta_info": meta}], 1)
        return sse(body)

    for index in range(req.n):
        yield chunk(index, {"role": "assistant", "content": ""})
    async for delta in deltas:
        index, meta = delta.get("index", 0), delta["meta_info"]
        reason = finish_reason(meta)
        if delta["text"] or delta["output_ids"] or reason:
            yield chunk(index, {"content": delta["text"]} if delta["text"] else {}, reason,
                        _logprobs(meta), meta)
        if reason is not None:
            finals[index] = {"meta_info": meta}
    if options and options.include_usage:
        yield sse({"id": chunk_id, "object": "chat.completion.chunk", "created": created,
                   "model": state.model_name, "choices": [],
                   "usage": usage([finals[i] for i in sorted(finals)], req.n)})
