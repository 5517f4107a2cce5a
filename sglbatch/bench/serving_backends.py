"""`bench serving`: one request function per serving API, each timing one streamed request
(TTFT, the gaps between chunks that carry tokens, end-to-end latency) over aiohttp."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from sglbatch.bench.serving_metrics import RequestOutput
from sglbatch.engine.sampling_params import SamplingParams
from sglbatch.openai_names import to_openai

BACKENDS = ("sglbatch", "sglang", "openai", "openai-chat", "vllm")
NATIVE_BACKENDS = ("sglbatch", "sglang")
# /generate fields that live beside `sampling_params`; other --extra-request-body keys of a
# native backend are sampling parameters.
_NATIVE_TOP_LEVEL = {"rid", "return_logprob", "logprob_start_len", "top_logprobs_num",
                     "token_ids_logprob", "return_text_in_logprobs", "lora_path", "stream",
                     "sampling_params", "text", "input_ids"}


@dataclass
class RequestInput:
    prompt: str | list[int]  # text, or token ids (native backends)
    prompt_len: int  # the dataset's length, used when the server does not say
    output_len: int
    ignore_eos: bool = True
    stop: tuple[str, ...] = ()
    model: str | None = None
    stream: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)


@dataclass
class Client:
    """Where and how requests go: the base URL, headers (API key) and a shared session."""

    session: aiohttp.ClientSession
    base_url: str
    headers: dict[str, str]


RequestFunc = Callable[[Client, RequestInput], Awaitable[RequestOutput]]


async def _sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[Any]:
    """The JSON payloads of a server-sent event stream, up to `data: [DONE]`. Read in raw
    chunks, so an event of any size (cumulative text) parses."""
    buf = b""
    async for chunk in response.content.iter_any():
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, `event:` lines
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            yield json.loads(data)
    if buf.strip().startswith(b"data:") and buf.strip()[5:].strip() != b"[DONE]":
        yield json.loads(buf.strip()[5:])


async def _error_text(response: aiohttp.ClientResponse) -> str:
    body = await response.text()
    try:
        err = json.loads(body)
        message = err.get("error", err.get("detail", err)) if isinstance(err, dict) else err
        if isinstance(message, dict):
            message = message.get("message", message)
    except ValueError:
        message = body.strip()[:500]
    return f"HTTP {response.status}: {message}"


def _event_error(event: Any) -> str | None:
    if isinstance(event, dict) and event.get("error"):
        err = event["error"]
        return str(err.get("message", err) if isinstance(err, dict) else err)
    return None


async def _post(client: Client, path: str, payload: dict[str, Any], out: RequestOutput,
                handle: Callable[[aiohttp.ClientResponse, float], Awaitable[None]]
                ) -> RequestOutput:
    """POST, run `handle` over a 200 response; anything else fails the request with its
    message. Times are measured from just before the request is sent."""
    start = time.perf_counter()
    try:
        async with client.session.post(client.base_url + path, json=payload,
                                       headers=client.headers) as response:
            if response.status != 200:
                out.error = await _error_text(response)
            else:
                await handle(response, start)
                out.success = not out.error
    except Exception as e:  # noqa: BLE001 - connection errors, timeouts, bad events: it fails
        out.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        out.success = False
    out.latency = time.perf_counter() - start
    return out


async def request_native(client: Client, inp: RequestInput) -> RequestOutput:
    """SGLang's /generate: SSE events with the cumulative text and meta_info whose
    completion_tokens counts the tokens so far; a chunk of k new tokens adds k ITL entries of
    gap / k (as SGLang's client does)."""
    params = _sampling_params(inp)
    top = {k: v for k, v in inp.extra_body.items() if k in _NATIVE_TOP_LEVEL}
    params.update({k: v for k, v in inp.extra_body.items() if k not in _NATIVE_TOP_LEVEL})
    key = "text" if isinstance(inp.prompt, str) else "input_ids"
    payload = {key: inp.prompt, "sampling_params": {**params, **top.pop("sampling_params", {})},
               "stream": inp.stream, **top}
    out = RequestOutput(prompt_len=inp.prompt_len)

    def take_meta(meta: dict[str, Any]) -> None:
        if "prompt_tokens" in meta:
            out.prompt_len = meta["prompt_tokens"]
        if "completion_tokens" in meta:
            out.output_len = meta["completion_tokens"]

    async def handle(response: aiohttp.ClientResponse, start: float) -> None:
        if not inp.stream:
            body = await response.json(content_type=None)
            out.ttft = time.perf_counter() - start
            out.generated_text = body.get("text", "")
            take_meta(body.get("meta_info", {}))
            return
        last_tokens, last_time = 0, start
        async for event in _sse_events(response):
            if (error := _event_error(event)) is not None:
                out.error = error
                return
            now = time.perf_counter()
            meta = event.get("meta_info") or {}
            grew = len(event.get("text") or "") > len(out.generated_text)
            out.generated_text = event.get("text") or out.generated_text
            tokens = meta.get("completion_tokens")
            if tokens is None:  # a server without counts: a chunk whose text grew is a step
                tokens = last_tokens + grew
            take_meta(meta)
            new = tokens - last_tokens
            if new <= 0:
                continue
            if last_tokens == 0:
                out.ttft = now - start
            else:
                out.itl.extend([(now - last_time) / new] * new)
            last_tokens, last_time = tokens, now

    return await _post(client, "/generate", payload, out, handle)


def _sampling_params(inp: RequestInput) -> dict[str, Any]:
    """Greedy, `output_len` tokens, SGLang's names (ignore_eos is SGLang's and vLLM's extra
    OpenAI field too)."""
    return SamplingParams(temperature=0.0, max_new_tokens=inp.output_len,
                          ignore_eos=inp.ignore_eos, stop=list(inp.stop)).to_json()


def _openai_payload(inp: RequestInput) -> dict[str, Any]:
    payload = {"model": inp.model, "stream": inp.stream, **to_openai(_sampling_params(inp))}
    if inp.stream:
        payload["stream_options"] = {"include_usage": True}
    return payload


async def _openai_stream(client: Client, path: str, payload: dict[str, Any],
                         inp: RequestInput, chunk_text: Callable[[dict[str, Any]], str],
                         final_text: Callable[[dict[str, Any]], str]) -> RequestOutput:
    """An OpenAI stream: each chunk with text is one step (TTFT, then one ITL entry per
    chunk, as SGLang's client); token counts come from the closing usage chunk."""
    out = RequestOutput(prompt_len=inp.prompt_len)

    def take_usage(usage: dict[str, Any] | None) -> None:
        if usage:
            out.prompt_len = usage.get("prompt_tokens", out.prompt_len)
            out.output_len = usage.get("completion_tokens", out.output_len)

    async def handle(response: aiohttp.ClientResponse, start: float) -> None:
        if not inp.stream:
            body = await response.json(content_type=None)
            out.ttft = time.perf_counter() - start
            out.generated_text = final_text(body["choices"][0]) if body.get("choices") else ""
            take_usage(body.get("usage"))
            return
        texts, last_time = [], start
        async for event in _sse_events(response):
            if (error := _event_error(event)) is not None:
                out.error = error
                return
            now = time.perf_counter()
            take_usage(event.get("usage"))
            text = chunk_text(event["choices"][0]) if event.get("choices") else ""
            if not text:
                continue
            if not texts:
                out.ttft = now - start
            else:
                out.itl.append(now - last_time)
            texts.append(text)
            last_time = now
        out.generated_text = "".join(texts)

    payload.update(inp.extra_body)
    return await _post(client, path, payload, out, handle)


async def request_completions(client: Client, inp: RequestInput) -> RequestOutput:
    """/v1/completions (the `openai` and `vllm` backends)."""
    payload = {**_openai_payload(inp), "prompt": inp.prompt}
    return await _openai_stream(client, "/v1/completions", payload, inp,
                                lambda choice: choice.get("text") or "",
                                lambda choice: choice.get("text") or "")


async def request_chat(client: Client, inp: RequestInput) -> RequestOutput:
    """/v1/chat/completions, the prompt as one user message."""
    payload = {**_openai_payload(inp), "messages": [{"role": "user", "content": inp.prompt}]}
    return await _openai_stream(client, "/v1/chat/completions", payload, inp,
                                lambda choice: (choice.get("delta") or {}).get("content") or "",
                                lambda choice: (choice.get("message") or {}).get("content") or "")


REQUEST_FUNCS: dict[str, RequestFunc] = {
    "sglbatch": request_native, "sglang": request_native, "openai": request_completions,
    "vllm": request_completions, "openai-chat": request_chat,
}
