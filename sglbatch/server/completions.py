"""/v1/completions: prompts (text, token ids, or lists of either) -> text_completion objects
and streams, with echo and OpenAI's legacy logprobs shape."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from sglbatch.engine.api_types import GenerateRequest, MetaInfo, StreamDelta
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
from sglbatch.server.protocol import CompletionRequest
from sglbatch.server.state import ServerState
from sglbatch.server.streaming import await_or_abort, sse


def _prompt_ids(state: ServerState, prompt: Any) -> list[list[int]]:
    tokenizer = state.engine.tokenizer
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    if not prompt:
        raise APIError(400, "prompt: must not be empty", "prompt")
    return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]


async def _start(state: ServerState, req: CompletionRequest, stream: bool) -> Any:
    engine = state.require_generation()
    state.check_model(req.model)
    if req.suffix:
        raise APIError(400, "suffix: not supported by this server", "suffix")
    if req.best_of not in (None, req.n):
        raise APIError(400, "best_of: only best_of == n is supported", "best_of")
    if req.echo and stream and req.logprobs:
        raise APIError(400, "echo with logprobs is not supported when streaming", "echo")
    prompts = _prompt_ids(state, req.prompt)
    try:
        params = sampling_params(req, resolve_max_tokens(
            req.max_tokens, engine.info.max_req_len, "max_tokens"))
        requests = [GenerateRequest(
            input_ids=ids, sampling_params=params, return_logprob=req.logprobs is not None,
            logprob_start_len=0 if req.echo else -1, top_logprobs_num=req.logprobs or 0,
            return_text_in_logprobs=True, custom_logit_processor=req.custom_logit_processor)
            for ids in prompts]
        run = engine.stream_async if stream else engine.run_async
        result = await run(requests)
    except ValueError as e:
        raise bad_request(e) from None
    return prompts, result


def _legacy_logprobs(meta: MetaInfo, echo: bool, offset: int) -> dict[str, Any] | None:
    fields = meta.logprobs
    if "output_token_logprobs" not in fields:
        return None
    entries = (fields["input_token_logprobs"] if echo else []) + fields["output_token_logprobs"]
    tops = ((fields.get("input_top_logprobs") or [None] * len(fields["input_token_logprobs"]))
            if echo else []) + (fields.get("output_top_logprobs") or
                                [None] * len(fields["output_token_logprobs"]))
    text_offset = []
    for _, _, text in entries:
        text_offset.append(offset)
        offset += len(text)
    return {"tokens": [text for _, _, text in entries],
            "token_logprobs": [lp for lp, _, _ in entries],
            "top_logprobs": [None if top is None else {t: lp for lp, _, t in top}
                             for top in tops],
            "text_offset": text_offset}


async def create_completion(state: ServerState, req: CompletionRequest,
                            request: Request | None = None) -> dict[str, Any]:
    work = _start(state, req, stream=False)
    prompts, outputs = await (await_or_abort(request, work) if request else work)
    choices = []
    for i, out in enumerate(outputs):
        meta = out.meta_info
        prefix = state.engine.tokenizer.decode(prompts[i // req.n]) if req.echo else ""
        choices.append({"index": i, "text": prefix + out.text,
                        "logprobs": _legacy_logprobs(meta, req.echo, 0),
                        "finish_reason": finish_reason(meta), "matched_stop": matched_stop(meta)})
    return {"id": new_id("cmpl"), "object": "text_completion", "created": now(),
            "model": state.model_name, "choices": choices,
            "usage": usage([out.meta_info for out in outputs], req.n)}


async def stream_completion(state: ServerState, req: CompletionRequest) -> AsyncIterator[str]:
    prompts, deltas = await _start(state, req, stream=True)
    return _completion_events(state, req, prompts, deltas)


async def _completion_events(state: ServerState, req: CompletionRequest,
                             prompts: list[list[int]], deltas: AsyncIterator[StreamDelta]
                             ) -> AsyncIterator[str]:
    cmpl_id, created = new_id("cmpl"), now()
    finals: dict[int, MetaInfo] = {}
    offsets: dict[int, int] = {}
    echoed: set[int] = set()
    async for delta in deltas:
        index, meta = delta.index, delta.meta_info
        text = delta.text
        if req.echo and index not in echoed:
            echoed.add(index)
            text = state.engine.tokenizer.decode(prompts[index // req.n]) + text
        reason = finish_reason(meta)
        logprobs = _legacy_logprobs(meta, False, offsets.get(index, 0))
        offsets[index] = offsets.get(index, 0) + len(delta.text)
        if text or reason:
            yield sse({"id": cmpl_id, "object": "text_completion", "created": created,
                       "model": state.model_name,
                       "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                    "finish_reason": reason,
                                    "matched_stop": matched_stop(meta) if reason else None}]})
        if reason is not None:
            finals[index] = meta
    if req.stream_options and req.stream_options.include_usage:
        yield sse({"id": cmpl_id, "object": "text_completion", "created": created,
                   "model": state.model_name, "choices": [],
                   "usage": usage([finals[i] for i in sorted(finals)], req.n)})
