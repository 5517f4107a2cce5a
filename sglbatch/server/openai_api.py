"""The OpenAI routes: models, chat completions, completions, embeddings; `dispatch` runs one
request body in-process (the batch runner's path to the same handlers)."""

from __future__ import annotations

import base64
import struct
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError

from sglbatch.server.chat import create_chat_completion, stream_chat_completion
from sglbatch.server.completions import create_completion, stream_completion
from sglbatch.server.errors import APIError, bad_request, error_body
from sglbatch.server.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from sglbatch.server.state import ServerState
from sglbatch.server.streaming import sse_response


def build_router(state: ServerState) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": int(state.started),
            "owned_by": "sglbatch", "root": state.model_path,
            "max_model_len": state.max_model_len}]}

    @router.get("/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        state.check_model(model_id)
        return {"id": state.model_name, "object": "model", "created": int(state.started),
                "owned_by": "sglbatch", "root": state.model_path}

    @router.post("/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Any:
        if req.stream:
            return sse_response(await stream_chat_completion(state, req))
        return await create_chat_completion(state, req, request)

    @router.post("/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        if req.stream:
            return sse_response(await stream_completion(state, req))
        return await create_completion(state, req, request)

    @router.post("/embeddings")
    async def embeddings(req: EmbeddingRequest) -> Any:
        return await create_embeddings(state, req)

    return router


async def create_embeddings(state: ServerState, req: EmbeddingRequest) -> dict[str, Any]:
    embedder = state.require_embedding()
    state.check_model(req.model)
    inputs = req.input
    if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
        inputs = [inputs]
    if not inputs:
        raise APIError(400, "input: must not be empty", "input")
    if req.dimensions is not None and req.dimensions != embedder.dim:
        raise APIError(400, f"dimensions: this model gives {embedder.dim}-dimensional "
                            "vectors only", "dimensions")
    try:
        vectors = await state.embed(inputs)
        tokens = sum(embedder.count_tokens(inputs, truncate=False))
    except ValueError as e:
        raise bad_request(e) from None
    data = [{"object": "embedding", "index": i,
             "embedding": _encode_vector(v, req.encoding_format)}
            for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": state.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _encode_vector(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


_DISPATCH: dict[str, tuple[type[BaseModel], Any]] = {
    "/v1/chat/completions": (ChatCompletionRequest, create_chat_completion),
    "/v1/completions": (CompletionRequest, create_completion),
    "/v1/embeddings": (EmbeddingRequest, create_embeddings),
}


async def dispatch(state: ServerState, url: str, body: dict[str, Any]) -> tuple[int, dict]:
    """Run one request body for `url` without HTTP: (status code, response or error body).
    Streaming is not available here (batch requests get whole responses)."""
    if url not in _DISPATCH:
        return 400, error_body(400, f"url: {url!r} is not one of {list(_DISPATCH)}", "url")
    model, handler = _DISPATCH[url]
    try:
        req = model.model_validate({**body, "stream": False} if url != "/v1/embeddings"
                                   else body)
        return 200, await handler(state, req)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        return 400, error_body(400, f"{param or 'body'}: {first['msg']}", param)
    except APIError as e:
        return e.status, error_body(e.status, e.message, e.param, e.code)
