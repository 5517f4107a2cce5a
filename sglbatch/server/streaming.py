"""Server-sent events and client-disconnect handling shared by the native and OpenAI routes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from sglbatch.engine.errors import EngineError
from sglbatch.server.errors import error_body

T = TypeVar("T")
DONE = "data: [DONE]\n\n"
_DISCONNECT_POLL_S = 0.5


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    """A stream that ends with `data: [DONE]`. When the client goes away Starlette cancels
    the iterator, and the engine's stream aborts its requests (freeing their KV). An engine
    failure mid-stream becomes a `data: {"error": ...}` event, as OpenAI-compatible servers
    send it."""

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except EngineError as e:  # the status line is sent: the error goes in the stream
            yield sse(error_body(500, str(e)))
        yield DONE

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def await_or_abort(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (which aborts its engine requests) if the client
    disconnects first."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise asyncio.CancelledError("client disconnected")
