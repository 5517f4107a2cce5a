"""SGLang's native HTTP API: /generate (SSE streams with cumulative text, as SGLang's own
frontend reads them), model and server info, health, cache flush, abort, /encode,
/start_profile + /stop_profile (torch profiler traces of the engine thread)."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

import sglbatch
from sglbatch.server.errors import APIError, bad_request
from sglbatch.server.metrics import render_metrics
from sglbatch.server.state import ServerState
from sglbatch.server.streaming import await_or_abort, sse, sse_response

# /generate fields the engine takes, and SGLang fields that are accepted only when unset.
_GENERATE_FIELDS = {"text", "input_ids", "sampling_params", "rid", "stream", "return_logprob",
                    "logprob_start_len", "top_logprobs_num", "token_ids_logprob",
                    "return_text_in_logprobs", "custom_logit_processor"}
_UNSUPPORTED_WHEN_SET = {"image_data", "audio_data", "video_data", "lora_path", "lora_id",
                         "input_embeds", "session_params", "return_hidden_states",
                         "bootstrap_host", "bootstrap_port", "bootstrap_room",
                         "data_parallel_rank"}
_IGNORED = {"modalities", "log_metrics", "background", "no_logs", "custom_labels",
            "priority", "routed_dp_rank", "extra_key"}


async def read_json_object(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as e:
        raise APIError(400, f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def build_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @router.get("/health_generate")
    async def health_generate(request: Request) -> Response:
        if state.engine is not None:
            await await_or_abort(request, state.engine.async_generate(
                input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0}))
        else:
            await state.embed(["health"])
        return Response(status_code=200)

    @router.get("/get_model_info")
    async def model_info() -> dict[str, Any]:
        return {"model_path": state.model_path, "tokenizer_path": state.model_path,
                "served_model_name": state.model_name,
                "is_generation": state.engine is not None, "preferred_sampling_params": None,
                "weight_version": "default"}

    @router.get("/server_info")  # what SGLang's RuntimeEndpoint calls
    @router.get("/get_server_info")
    async def server_info() -> dict[str, Any]:
        info: dict[str, Any] = {"version": sglbatch.__version__,
                                **dataclasses.asdict(state.args), "api_key": None}
        if state.engine_config is not None:
            info.update(dataclasses.asdict(state.engine_config))
        if state.engine is not None:
            info["max_total_num_tokens"] = state.engine.info.max_total_num_tokens
            info["internal_states"] = state.engine.loads()  # one per data-parallel replica
        return info

    @router.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        engine = state.require_generation()
        if await asyncio.to_thread(engine.flush_cache):
            return PlainTextResponse("Cache flushed.\n")
        raise APIError(400, "Cache not flushed: requests are in flight; retry when idle.")

    @router.post("/start_profile")
    async def start_profile(request: Request) -> Any:
        body = await read_json_object(request) if await request.body() else {}
        engine = state.require_generation()
        kwargs = _start_profile_kwargs(body)
        try:
            path = await asyncio.to_thread(engine.start_profile, **kwargs)
        except ValueError as e:  # already running, a bad argument or output_dir
            raise APIError(400, str(e)) from None
        return {"message": "Start profiling.", "trace_path": str(path),
                "num_steps": kwargs.get("num_steps")}

    @router.post("/stop_profile")
    async def stop_profile() -> Any:
        engine = state.require_generation()
        try:
            path = await asyncio.to_thread(engine.stop_profile)
        except ValueError as e:  # none running
            raise APIError(400, str(e)) from None
        return {"message": "Stop profiling.", "trace_path": str(path)}

    @router.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        body = await read_json_object(request)
        engine = state.require_generation()
        if body.get("abort_all"):
            engine.abort_all()
        elif isinstance(body.get("rid"), str):
            engine.abort(body["rid"])
        else:
            raise APIError(400, "abort_request: give `rid` (a string) or `abort_all: true`",
                           "rid")
        return Response(status_code=200)

    @router.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(render_metrics(state),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @router.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request) -> Any:
        body = await read_json_object(request)
        engine = state.require_generation()
        kwargs = _generate_kwargs(body)
        stream = bool(kwargs.pop("stream", False))
        try:
            if stream:
                deltas = await engine.async_generate(stream=True, **kwargs)
                return sse_response(_cumulative_stream(deltas))
            return JSONResponse(await await_or_abort(request, engine.async_generate(**kwargs)))
        except ValueError as e:
            raise bad_request(e) from None

    @router.post("/encode")
    async def encode(request: Request) -> Any:
        body = await read_json_object(request)
        state.require_embedding()
        text = body.get("text", body.get("input_ids"))
        single = isinstance(text, str) or (isinstance(text, list) and text and
                                           isinstance(text[0], int))
        inputs = [text] if single else text
        if not inputs:
            raise APIError(400, "encode: give `text` (a string or a list of them) or "
                                "`input_ids`", "text")
        try:
            vectors = await state.embed(inputs)
            counts = state.embedder.count_tokens(inputs, truncate=False)
        except ValueError as e:
            raise bad_request(e) from None
        out = [{"embedding": v, "meta_info": {"id": uuid.uuid4().hex, "prompt_tokens": n,
                                              "finish_reason": None}}
               for v, n in zip(vectors, counts)]
        return out[0] if single else out

    return router


def _generate_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    """/generate's JSON -> Engine.generate keyword arguments, refusing what is not served."""
    unknown = set(body) - _GENERATE_FIELDS - _UNSUPPORTED_WHEN_SET - _IGNORED
    if unknown:
        raise APIError(400, f"generate: unknown field(s) {sorted(unknown)}", sorted(unknown)[0])
    for name in _UNSUPPORTED_WHEN_SET:
        if body.get(name):
            raise APIError(400, f"{name}: not supported by this server", name)
    kwargs = {k: v for k, v in body.items() if k in _GENERATE_FIELDS and v is not None}
    if "text" in kwargs:
        kwargs["prompt"] = kwargs.pop("text")
    return kwargs


# SGLang's /start_profile fields: those served, and those accepted only when unset.
_PROFILE_FIELDS = {"output_dir": str, "num_steps": int, "record_shapes": bool,
                   "with_stack": bool, "activities": list}
_PROFILE_UNSUPPORTED_WHEN_SET = {"start_step", "profile_by_stage", "merge_profiles"}
_PROFILE_IGNORED = {"profile_id", "profile_prefix", "profile_stages"}


def _start_profile_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    unknown = set(body) - set(_PROFILE_FIELDS) - _PROFILE_UNSUPPORTED_WHEN_SET - _PROFILE_IGNORED
    if unknown:
        raise APIError(400, f"start_profile: unknown field(s) {sorted(unknown)}; accepted: "
                            f"{sorted(_PROFILE_FIELDS)}", min(unknown))
    for name in _PROFILE_UNSUPPORTED_WHEN_SET:
        if body.get(name):
            raise APIError(400, f"start_profile: {name} is not supported by this server", name)
    kwargs = {}
    for name, kind in _PROFILE_FIELDS.items():
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise APIError(400, f"start_profile: {name} must be a {kind.__name__}, got "
                                f"{value!r}", name)
        kwargs[name] = value
    return kwargs


async def _cumulative_stream(deltas: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """SGLang streams the text and ids so far in each event (its frontend slices the new part
    off itself); the engine gives deltas, so they are accumulated per prompt index."""
    texts: dict[int, str] = {}
    ids: dict[int, list[int]] = {}
    async for delta in deltas:
        index = delta.get("index", 0)
        texts[index] = texts.get(index, "") + delta["text"]
        ids[index] = ids.get(index, []) + delta["output_ids"]
        yield sse({**delta, "text": texts[index], "output_ids": ids[index]})
