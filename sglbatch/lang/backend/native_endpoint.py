"""RuntimeEndpoint: the frontend language over SGLang's native HTTP API.

Talks to a `sglbatch serve` (or a real SGLang server) exactly as SGLang's own
`RuntimeEndpoint` does: `/get_model_info` once, `/generate` with `text` and
`sampling_params` (SSE streams whose events carry the cumulative text), `select` as
prefill-only requests with input logprobs and token healing, `/flush_cache`,
`/server_info`, and prefix caching through `max_new_tokens: 0` requests.

HTTP goes through one `httpx.Client` per endpoint (thread-safe, shared by `run_batch`'s
worker threads), with no timeout: generations may take as long as they take.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from typing import Any

import httpx

from sglbatch.lang.backend.base_backend import BaseBackend
from sglbatch.lang.chat_template import get_chat_template, get_chat_template_by_model_path
from sglbatch.lang.choices import (
    ChoicesDecision,
    ChoicesSamplingMethod,
    compute_normalized_prompt_logprobs,
    score_choices,
    token_length_normalized,
)
from sglbatch.lang.ir import SglSamplingParams, handle_dtype_to_regex

__all__ = ["RuntimeEndpoint", "compute_normalized_prompt_logprobs"]

# Request fields SGLang's frontend copies from the sampling parameters to the top level.

def _ssl_verify(verify: Any) -> Any:
    """requests-style `verify` (None/bool, or a CA bundle path) for httpx."""
    if verify is None:
        return True
    if isinstance(verify, str):
        return ssl.create_default_context(cafile=verify)
    return verify


class RuntimeEndpoint(BaseBackend):
    """A backend that sends the program's text to a server speaking SGLang's native API."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        verify: str | bool | None = None,
        chat_template_name: str | None = None,
    ):
        super().__init__()
        # SGLang sets this, but no server (neither SGLang's current one nor ours) serves
        # /concate_and_append_request, so forks are joined as text.
        self.support_concate_and_append = False

        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.verify = verify
        headers = {"Content-Type": "application/json; charset=utf-8"}
        if api_key is not None:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(
            headers=headers, timeout=None, verify=_ssl_verify(verify),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

        res = self._request("/get_model_info")
        self._assert_success(res)
        self.model_info = res.json()

        if chat_template_name:
            self.chat_template = get_chat_template(chat_template_name)
        else:
            self.chat_template = get_chat_template_by_model_path(self.model_info["model_path"])

    # ----------------------------------------------------------------- HTTP plumbing

    def _request(self, path: str, json_body: Any = None, method: str | None = None
                 ) -> httpx.Response:
        """GET without a body, POST with one (as SGLang's http_request), unless `method`."""
        method = method or ("GET" if json_body is None else "POST")
        return self._client.request(method, self.base_url + path, json=json_body)

    def _generate_http_request(self, s: Any, data: dict) -> Any:
        self._add_images(s, data)
        res = self._request("/generate", data)
        self._assert_success(res)
        return res.json()

    def _add_images(self, s: Any, data: dict) -> None:
        images = getattr(s, "images_", None)
        if images:
            assert len(images) == 1, "Only support one image."
            data["image_data"] = images[0][1]

    @staticmethod
    def _assert_success(res: httpx.Response) -> None:
        if res.status_code != 200:
            try:
                content = res.json()
            except (json.JSONDecodeError, ValueError):
                content = res.text
            raise RuntimeError(f"HTTP {res.status_code}: {content}")

    def close(self) -> None:
        """Close the HTTP connections (the endpoint is unusable afterwards)."""
        self._client.close()

    # ----------------------------------------------------------------- server calls

    def get_model_name(self) -> str:
        return self.model_info["model_path"]

    def get_chat_template(self):
        return self.chat_template

    def flush_cache(self) -> None:
        self._assert_success(self._request("/flush_cache", method="POST"))

    def get_server_info(self) -> dict:
        res = self._request("/server_info")
        if res.status_code == 404:  # servers that only know the older name
            res = self._request("/get_server_info")
        self._assert_success(res)
        return res.json()

    def cache_prefix(self, prefix_str: str) -> None:
        self._assert_success(self._request(
            "/generate", {"text": prefix_str, "sampling_params": {"max_new_tokens": 0}}))

    def start_profile(self) -> None:
        self._assert_success(self._request("/start_profile"))

    def stop_profile(self) -> None:
        self._assert_success(self._request("/stop_profile"))

    def commit_lazy_operations(self, s: Any) -> None:
        """Prefill the text so far (forks then share its cached prefix)."""
        data = {"text": s.text_, "sampling_params": {"max_new_tokens": 0}}
        self._generate_http_request(s, data)

    def fill_image(self, s: Any) -> None:
        data = {"text": s.text_, "sampling_params": {"max_new_tokens": 0}}
        self._generate_http_request(s, data)

    def concatenate_and_append(self, src_rids: list[str], dst_rid: str) -> None:
        self._assert_success(self._request(
            "/concate_and_append_request", {"src_rids": src_rids, "dst_rid": dst_rid}))

    # ----------------------------------------------------------------- generation

    def _generate_body(self, s: Any, sampling_params: SglSamplingParams) -> dict:
        handle_dtype_to_regex(sampling_params)
        data = {"text": s.text_, "sampling_params": sampling_params.to_sampling_params().to_json(),
                **sampling_params.logprob_args()}
        self._add_images(s, data)
        return data

    def generate(self, s: Any, sampling_params: SglSamplingParams):
        obj = self._generate_http_request(s, self._generate_body(s, sampling_params))
        if isinstance(obj, list):  # n > 1: one result per sample
            return [o["text"] for o in obj], [o["meta_info"] for o in obj]
        return obj["text"], obj["meta_info"]

    def generate_stream(self, s: Any, sampling_params: SglSamplingParams
                        ) -> Iterator[tuple[str, dict]]:
        data = self._generate_body(s, sampling_params)
        data["stream"] = True
        with self._client.stream("POST", self.base_url + "/generate", json=data) as res:
            if res.status_code != 200:
                res.read()
                self._assert_success(res)
            pos = 0
            for line in res.iter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                if "error" in event and "text" not in event:
                    raise RuntimeError(event["error"])
                # Each event carries the text so far; hand on the new part.
                chunk_text = event["text"][pos:]
                pos += len(chunk_text)
                yield chunk_text, event["meta_info"]

    # ----------------------------------------------------------------- select

    def select(
        self,
        s: Any,
        choices: list[str],
        temperature: float,
        choices_method: ChoicesSamplingMethod | None = None,
    ) -> ChoicesDecision:
        assert temperature <= 1e-5, "select scores the choices: temperature must be 0"
        choices_method = choices_method or token_length_normalized

        # Prefill (and cache) the common prefix; learn its length in tokens.
        obj = self._generate_http_request(
            s, {"text": s.text_, "sampling_params": {"max_new_tokens": 0}})
        prompt_len = obj["meta_info"]["prompt_tokens"]
        logprob_start_len = max(prompt_len - 2, 0)  # for token healing

        # Score every choice after the prefix.
        obj = self._generate_http_request(s, {
            "text": [s.text_ + c for c in choices],
            "sampling_params": {"max_new_tokens": 0, "temperature": 0},
            "return_logprob": True,
            "return_text_in_logprobs": True,
            "logprob_start_len": logprob_start_len,
        })
        input_token_logprobs = [r["meta_info"]["input_token_logprobs"] for r in obj]
        output_token_logprobs = [r["meta_info"]["output_token_logprobs"] for r in obj]
        input_token_logprobs, normalized_prompt_logprobs = score_choices(
            s.text_, input_token_logprobs)

        if choices_method.requires_unconditional_logprobs:
            # The choices' tokens on their own. SGLang's RuntimeEndpoint leaves out
            # logprob_start_len here, so servers answer with the last token's logprob only
            # (their default of -1); asking from 0 gives every token's, which is what
            # UnconditionalLikelihoodNormalized expects (and what EngineBackend sends).
            input_ids = [[el[1] for el in lps] for lps in input_token_logprobs]
            obj = self._generate_http_request(s, {
                "input_ids": input_ids,
                "sampling_params": {"max_new_tokens": 0},
                "return_logprob": True,
                "logprob_start_len": 0,
            })
            unconditional_token_logprobs = [r["meta_info"]["input_token_logprobs"]
                                            for r in obj]
        else:
            unconditional_token_logprobs = None

        return choices_method(
            choices=choices,
            normalized_prompt_logprobs=normalized_prompt_logprobs,
            input_token_logprobs=input_token_logprobs,
            output_token_logprobs=output_token_logprobs,
            unconditional_token_logprobs=unconditional_token_logprobs,
        )
