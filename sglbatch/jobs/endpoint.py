"""A running server as a job's engine: `run_async` over HTTP, with typed results.

`api: native` posts prompts to SGLang's /generate (ours or SGLang's); `api: openai` posts
prompts to /v1/completions and messages to /v1/chat/completions of any OpenAI-compatible
server, with SGLang's sampling names mapped to OpenAI's (the rest travel as extra fields,
which SGLang and sglbatch read). A 4xx answer is the row's fault and becomes its error
record; a server that is down or failing (connection error, 5xx, 429) is retried, then stops
the run, so the rows it could not finish stay unwritten and a resumed run sends them again.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import httpx

from sglbatch.engine.api_types import FinishReason, GenerateOutput, GenerateRequest, MetaInfo
from sglbatch.jobs.spec import EndpointSpec
from sglbatch.openai_names import to_openai

logger = logging.getLogger(__name__)

_RETRIES = 4


class EndpointUnavailable(RuntimeError):
    """The server could not be reached or kept failing; the run stops (resumable)."""


class EndpointClient:
    def __init__(self, spec: EndpointSpec, timeout: float = 3600):
        self.spec = spec
        headers = {}
        if spec.api_key_env:
            key = os.environ.get(spec.api_key_env)
            if not key:
                raise ValueError(f"endpoint.api_key_env: the environment variable "
                                 f"{spec.api_key_env} is not set")
            headers["Authorization"] = f"Bearer {key}"
        self._headers = headers
        self._timeout = timeout
        self._client: httpx.AsyncClient | None = None

    async def run_async(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        """As `Engine.run_async`: the server tokenizes, so requests carry a prompt or
        messages."""
        return list(await asyncio.gather(*map(self._generate, requests)))

    async def _generate(self, request: GenerateRequest) -> GenerateOutput:
        params = request.sampling_params.to_json()
        if self.spec.api == "native":
            if request.messages is not None:
                raise ValueError("endpoint.api native takes prompts; use api: openai for "
                                 "messages jobs")
            body = await self._post("/generate", {"text": request.prompt,
                                                  "sampling_params": params})
            return GenerateOutput(body["text"], body.get("output_ids") or [],
                                  MetaInfo.from_json(body["meta_info"]))
        openai_params = to_openai(params)
        if self.spec.model:
            openai_params["model"] = self.spec.model
        if request.messages is not None:
            body = await self._post("/v1/chat/completions",
                                    {"messages": request.messages, **openai_params})
            text = body["choices"][0]["message"]["content"] or ""
        else:
            body = await self._post("/v1/completions", {"prompt": request.prompt,
                                                        **openai_params})
            text = body["choices"][0]["text"]
        return GenerateOutput(text, [], _openai_meta(body))

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.spec.url.rstrip("/"),
                                             headers=self._headers, timeout=self._timeout)
        for attempt in range(_RETRIES + 1):
            try:
                response = await self._client.post(path, json=body)
            except httpx.TransportError as e:
                problem = f"{type(e).__name__}: {e}"
            else:
                if response.status_code == 200:
                    return response.json()
                if 400 <= response.status_code < 500 and response.status_code != 429:
                    raise ValueError(f"{self.spec.url}{path} answered "
                                     f"{response.status_code}: {_message(response)}")
                problem = f"{response.status_code}: {_message(response)}"
            if attempt < _RETRIES:
                logger.warning("%s%s: %s; retrying (%d/%d)", self.spec.url, path, problem,
                               attempt + 1, _RETRIES)
                await asyncio.sleep(0.5 * 2 ** attempt)
        raise EndpointUnavailable(f"{self.spec.url}{path}: {problem} (after {_RETRIES} "
                                  "retries; start the server and run the job again: it "
                                  "resumes)")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        return error.get("message", str(error)) if isinstance(error, dict) else str(error)
    except ValueError:
        return response.text[:300]


def _openai_meta(body: dict[str, Any]) -> MetaInfo:
    """OpenAI usage and finish reason as meta_info."""
    usage = body.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    reason = body["choices"][0]["finish_reason"]
    return MetaInfo(body.get("id"), FinishReason.from_json({"type": reason}),
                    prompt_tokens=usage.get("prompt_tokens", 0),
                    completion_tokens=usage.get("completion_tokens", 0),
                    cached_tokens=details.get("cached_tokens") or 0)
