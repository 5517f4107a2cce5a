"""/v1/chat/completions: chat template -> engine -> OpenAI's chat.completion objects and
chat.completion.chunk streams."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from sglbatch.engine.api_types import GenerateRequest, MetaInfo, StreamDelta
from sglbatch.engine.chat_messages import validate_messages
from sglbatch.server.errors import APIError, bad_request
from sglbatch.server.openai_common import (
    finish_reason,
    matched_stop,
    new_id,
    now,
    resolve_max_tokens,
    sampling_params,
    usage,
)
from sglbatch.server.protocol import ChatCompletionRequest
from sglbatch.server.state import ServerState
from sglbatch.server.streaming import await_or_abort, sse
from sglbatch.server.tool_calls import ToolCallParser, get_tool_parser
from sglbatch.server.tool_choice import (
    ConstrainedToolCallStream,
    calls_from_constrained_output,
    normalize_tool_choice,
    tool_choice_constraint,
)
from sglbatch.server.tool_prompts import chat_template_supports_tools, prepare_messages


@dataclass
class _ToolPlan:
    """How a request with `tools` is rendered, constrained and parsed."""

    tools: list[dict[str, Any]]
    tool_choice: Any
    parser: ToolCallParser

    @property
    def constrained(self) -> bool:  # "required" or a named function
        return normalize_tool_choice(self.tools, self.tool_choice) not in ("auto", "none")

    def message(self, text: str) -> tuple[dict[str, Any], bool]:
        """The assistant message for `text`, and whether it holds tool calls."""
        if self.constrained:
            try:
                calls = calls_from_constrained_output(text, self.tools, self.tool_choice)
            except ValueError:  # cut short (max_tokens): the text is all there is
                calls, text = [], text
            else:
                text = None
        else:
            text, calls = self.parser.parse(text, self.tools)
            text = text or (None if calls else text)
        return ({"role": "assistant", "content": text,
                 "tool_calls": [c.to_dict() for c in calls] or None}, bool(calls))

    def stream(self) -> Any:
        if self.constrained:
            return ConstrainedToolCallStream(self.tools, self.tool_choice)
        return self.parser.stream(self.tools)


def _tool_plan(state: ServerState, req: ChatCompletionRequest) -> _ToolPlan | None:
    if not req.tools:
        if req.tool_choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice: needs `tools`", "tool_choice")
        return None
    try:
        if normalize_tool_choice(req.tools, req.tool_choice) == "none":
            return None
        return _ToolPlan(req.tools, req.tool_choice, get_tool_parser(state.args.tool_call_parser))
    except ValueError as e:
        raise bad_request(e) from None


def _messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """Messages with list-of-parts content flattened to text (only text parts are served)."""
    try:
        validate_messages(req.messages)
    except ValueError as e:
        raise bad_request(e) from None
    out = []
    for i, message in enumerate(req.messages):
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


async def _start(state: ServerState, req: ChatCompletionRequest, plan: _ToolPlan | None,
                 stream: bool) -> Any:
    engine = state.require_generation()
    state.check_model(req.model)
    messages, template_kwargs = _messages(req), dict(req.chat_template_kwargs or {})
    if plan is not None:
        template = state.chat_template or engine.tokenizer.hf.chat_template
        supports = chat_template_supports_tools(template)
        messages = prepare_messages(messages, plan.tools, state.args.tool_call_parser, supports)
        if supports:
            template_kwargs["tools"] = plan.tools
    try:
        prompt_ids = engine.tokenizer.apply_chat_template(
            messages, chat_template=state.chat_template,
            add_generation_prompt=not req.continue_final_message, **template_kwargs)
        params = sampling_params(req, resolve_max_tokens(
            req.max_completion_tokens if req.max_completion_tokens is not None
            else req.max_tokens, engine.info.max_req_len, "max_tokens"))
        params = dataclasses.replace(params, **_structured(req))
        if plan is not None and plan.constrained:
            if params.constraint is not None:
                raise APIError(400, "tool_choice: a required or named tool call cannot be "
                                    "combined with response_format, json_schema, regex or "
                                    "ebnf", "tool_choice")
            params.json_schema = tool_choice_constraint(plan.tools, plan.tool_choice,
                                                        req.parallel_tool_calls)
        top = req.top_logprobs or 0
        if top and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        request = GenerateRequest(
            input_ids=prompt_ids, sampling_params=params, rid=req.rid,
            return_logprob=req.logprobs, top_logprobs_num=top, return_text_in_logprobs=True,
            custom_logit_processor=req.custom_logit_processor)
        run = engine.stream_async if stream else engine.run_async
        return await run([request])
    except ValueError as e:
        raise bad_request(e) from None


def _logprobs(meta: MetaInfo) -> dict[str, Any] | None:
    entries = meta.logprobs.get("output_token_logprobs")
    if entries is None:
        return None
    tops = meta.logprobs.get("output_top_logprobs") or [None] * len(entries)

    def item(lp: float, text: str) -> dict[str, Any]:
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [
        {**item(lp, text), "top_logprobs": [item(t_lp, t_text) for t_lp, _, t_text in top or []]}
        for (lp, _, text), top in zip(entries, tops)]}


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest,
                                 request: Request | None = None) -> dict[str, Any]:
    plan = _tool_plan(state, req)
    work = _start(state, req, plan, stream=False)
    outputs = await (await_or_abort(request, work) if request else work)
    choices = []
    for i, out in enumerate(outputs):
        reason = finish_reason(out.meta_info)
        message = {"role": "assistant", "content": out.text, "tool_calls": None}
        if plan is not None:
            message, called = plan.message(out.text)
            reason = "tool_calls" if called and reason == "stop" else reason
        choices.append({"index": i, "message": message, "logprobs": _logprobs(out.meta_info),
                        "finish_reason": reason, "matched_stop": matched_stop(out.meta_info)})
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(),
            "model": state.model_name, "choices": choices,
            "usage": usage([out.meta_info for out in outputs], req.n)}


async def stream_chat_completion(state: ServerState,
                                 req: ChatCompletionRequest) -> AsyncIterator[str]:
    plan = _tool_plan(state, req)
    deltas = await _start(state, req, plan, stream=True)
    return _chat_events(state, req, plan, deltas)


async def _chat_events(state: ServerState, req: ChatCompletionRequest, plan: _ToolPlan | None,
                       deltas: AsyncIterator[StreamDelta]) -> AsyncIterator[str]:
    chunk_id, created = new_id("chatcmpl"), now()
    options = req.stream_options
    finals: dict[int, MetaInfo] = {}
    tool_streams = {i: plan.stream() for i in range(req.n)} if plan else {}

    def content_delta(index: int, text: str, finished: bool) -> tuple[dict[str, Any], bool]:
        """The delta for new text (tool calls split out), and whether calls were made."""
        if plan is None:
            return ({"content": text} if text else {}), False
        parser = tool_streams[index]
        text, calls = parser.feed(text)
        if finished:
            more_text, more_calls = parser.finish()
            text, calls = text + more_text, calls + more_calls
        delta: dict[str, Any] = {"content": text} if text else {}
        if calls:
            delta["tool_calls"] = [c.to_dict() for c in calls]
        return delta, bool(parser.tool_calls)

    def chunk(index: int, delta: dict[str, Any], reason: str | None = None,
              logprobs: Any = None, meta: MetaInfo | None = None) -> str:
        body = {"id": chunk_id, "object": "chat.completion.chunk", "created": created,
                "model": state.model_name,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                             "finish_reason": reason}]}
        if reason is not None and meta is not None:
            body["choices"][0]["matched_stop"] = matched_stop(meta)
        if options and options.continuous_usage_stats and meta is not None:
            body["usage"] = usage([meta], 1)
        return sse(body)

    for index in range(req.n):
        yield chunk(index, {"role": "assistant", "content": ""})
    async for delta in deltas:
        index, meta = delta.index, delta.meta_info
        reason = finish_reason(meta)
        if delta.text or delta.output_ids or reason:
            body, called = content_delta(index, delta.text, reason is not None)
            if called and reason == "stop":
                reason = "tool_calls"
            yield chunk(index, body, reason, _logprobs(meta), meta)
        if reason is not None:
            finals[index] = meta
    if options and options.include_usage:
        yield sse({"id": chunk_id, "object": "chat.completion.chunk", "created": created,
                   "model": state.model_name, "choices": [],
                   "usage": usage([finals[i] for i in sorted(finals)], req.n)})
