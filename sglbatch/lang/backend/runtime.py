"""Runtime: `sglbatch serve` in a child process, driven through a RuntimeEndpoint.

As SGLang's `sgl.Runtime`: build it with the server's arguments (SGLang's names,
e.g. `model_path=`, `context_length=`, `disable_radix_cache=`), use it as a backend
(`sgl.set_default_backend(runtime)`; the interpreter talks to `runtime.endpoint`), and
`shutdown()` it, or let interpreter exit do that. The server runs on loopback on a free
port unless `host`/`port` say otherwise; its output goes to `runtime.log_path`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import httpx

from sglbatch.lang.backend.native_endpoint import RuntimeEndpoint

__all__ = ["Runtime"]

READY_MARKER = "sglbatch serving"

# SGLang server arguments that have no meaning here (GPU memory, parallelism, logging
# knobs...): dropped with a warning instead of refusing the program.
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _server_flags(server_args: dict[str, Any]) -> list[str]:
    """Keyword arguments -> `sglbatch serve` flags (from the ServerArgs and EngineConfig
    fields); names serve does not take are dropped with a warning."""
    from sglbatch.config_flags import to_flags
    from sglbatch.engine.config import EngineConfig  # imports torch: only when launching
    from sglbatch.server.args import ServerArgs

    try:
        flags, ignored = to_flags(server_args, ServerArgs, EngineConfig)
    except TypeError as e:
        raise TypeError(f"Runtime: {e}") from None
    if ignored:
        warnings.warn("Runtime: ignoring server argument(s) that sglbatch serve does not take: "
                      + ", ".join(sorted(ignored)), stacklevel=3)
    return flags


class Runtime:
    """A `sglbatch serve` child process for the frontend language (SGLang's Runtime)."""

    def __init__(
        self,
        model_path: str | None = None,
        log_level: str = "error",
        launch_timeout: float = 300.0,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        api_key: str | None = None,
        data_dir: str | None = None,
        shutdown_timeout: float = 30.0,
        **server_args: Any,
    ):
        """`model_path` and `server_args` are `sglbatch serve`'s options by their Python
        names (SGLang's ServerArgs names where they match). `launch_timeout`: seconds to
        wait for the server; `shutdown_timeout`: seconds SIGTERM gets before SIGKILL.
        `data_dir`: the server's /v1/files and /v1/batches store (a temporary directory,
        removed on shutdown, by default)."""
        self.pid: int | None = None
        self._proc: subprocess.Popen | None = None
        self._tmp_dir: str | None = None
        self.endpoint: RuntimeEndpoint | None = None
        self.shutdown_timeout = shutdown_timeout
        self.log_level = log_level if log_level in _LOG_LEVELS else "error"

        if model_path is not None:
            server_args["model_path"] = model_path
        if port is None:
            port = _free_port(host)
        self.host, self.port, self.api_key = host, int(port), api_key
        self.server_args = dict(server_args, host=host, port=self.port)

        self._tmp_dir = tempfile.mkdtemp(prefix="sglbatch-runtime-")
        self.log_path = Path(self._tmp_dir) / "server.log"
        flags = _server_flags({**server_args, "host": host, "port": self.port,
                               "api_key": api_key,
                               "data_dir": data_dir or os.path.join(self._tmp_dir, "data")})

        url_host = f"[{host}]" if ":" in host else host
        if host in ("0.0.0.0", "::"):
            url_host = "127.0.0.1"
        self.url = f"http://{url_host}:{self.port}"
        self.generate_url = self.url + "/generate"

        cmd = [sys.executable, "-m", "sglbatch", "serve", *flags]
        with open(self.log_path, "w") as log:
            # A session of its own: shutdown() can reach anything the server started.
            self._proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        self.pid = self._proc.pid
        # Before the interpreter exits, stop the server (callers need not shutdown()).
        atexit.register(self.shutdown)

        try:
            self._wait_ready(launch_timeout)
            self.endpoint = RuntimeEndpoint(self.url, api_key=api_key)
        except BaseException:
            self.shutdown()
            raise

    # ----------------------------------------------------------------- lifecycle

    def _log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY_MARKER in self._log_tail(chars=1 << 20):
                return
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"Initialization failed: sglbatch serve exited with "
                    f"{self._proc.returncode}:\n{self._log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"Server failed to start within {timeout}s:\n{self._log_tail()}")

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def shutdown(self) -> None:
        """Stop the server: SIGTERM (running requests finish), then SIGKILL after
        `shutdown_timeout`; anything left in its process group is killed too."""
        proc, self._proc = self._proc, None
        if self.endpoint is not None:
            self.endpoint.close()
        if proc is not None:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(self.shutdown_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                except ProcessLookupError:
                    pass
            try:  # leftovers of the server's session (e.g. compiler jobs)
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.pid = None
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None
        with contextlib.suppress(Exception):  # interpreter teardown
            atexit.unregister(self.shutdown)

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        # Only reached once shutdown() unregistered the atexit hook, or if __init__ failed
        # early; never block here.
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(Exception):
                proc.kill()

    # ----------------------------------------------------------------- as a backend

    def __getattr__(self, name: str) -> Any:
        # Anything else a backend has (select, generate_stream, get_chat_template, ...) is
        # the endpoint's, so a Runtime works wherever a backend is expected.
        if name.startswith("_") or name == "endpoint":
            raise AttributeError(name)
        endpoint = self.__dict__.get("endpoint")
        if endpoint is None:
            raise AttributeError(name)
        return getattr(endpoint, name)

    def cache_prefix(self, prefix: str) -> None:
        self.endpoint.cache_prefix(prefix)

    def start_profile(self) -> None:
        self.endpoint.start_profile()

    def stop_profile(self) -> None:
        self.endpoint.stop_profile()

    def get_tokenizer(self):
        """The served model's Hugging Face tokenizer."""
        from transformers import AutoTokenizer

        from sglbatch.engine.model_source import resolve_model_path

        path = self.server_args.get("tokenizer_path") or self.server_args.get(
            "model_path", "smollm2-135m-instruct")
        return AutoTokenizer.from_pretrained(str(resolve_model_path(path)))

    # ----------------------------------------------------------------- direct requests

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def async_generate(
        self,
        prompt: str | list[int],
        sampling_params: dict | None = None,
        session_id: str | None = None,
    ):
        """Stream one generation: yields the new text of each event."""
        key = "input_ids" if isinstance(prompt, list) and prompt and isinstance(
            prompt[0], int) else "text"
        body = {key: prompt, "sampling_params": sampling_params or {}, "stream": True}
        if session_id is not None:
            body["session_id"] = session_id
        pos = 0
        async with (httpx.AsyncClient(timeout=3 * 3600, headers=self._headers()) as client,
                    client.stream("POST", self.generate_url, json=body) as response):
            if response.status_code != 200:
                await response.aread()
                RuntimeEndpoint._assert_success(response)
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                data = json.loads(payload)
                if "text" in data:
                    cur = data["text"][pos:]
                    if cur:
                        yield cur
                    pos += len(cur)
                else:
                    yield data

    add_request = async_generate

    def generate(
        self,
        prompt: str | list[str],
        sampling_params: dict | None = None,
        return_logprob: list[bool] | bool | None = False,
        logprob_start_len: list[int] | int | None = None,
        top_logprobs_num: list[int] | int | None = None,
        lora_path: list[str | None] | None = None,
        session_id: str | None = None,
    ) -> str:
        """POST /generate; returns the response as a JSON string (as SGLang's Runtime)."""
        assert not isinstance(lora_path, list) or len(lora_path) == len(prompt)
        body = {"text": prompt, "sampling_params": sampling_params,
                "return_logprob": return_logprob, "logprob_start_len": logprob_start_len,
                "top_logprobs_num": top_logprobs_num, "lora_path": lora_path,
                "session_id": session_id}
        body = {k: v for k, v in body.items() if v is not None}
        response = httpx.post(self.generate_url, json=body, headers=self._headers(),
                              timeout=None)
        return json.dumps(response.json())

    def encode(self, prompt: str | list[str] | list[dict] | list[list[dict]]) -> str:
        response = httpx.post(self.url + "/encode", json={"text": prompt},
                              headers=self._headers(), timeout=None)
        return json.dumps(response.json())

    async def get_server_info(self) -> dict:
        async with httpx.AsyncClient(headers=self._headers(), timeout=None) as client:
            response = await client.get(f"{self.url}/server_info")
            if response.status_code == 200:
                return response.json()
            try:
                message = response.json()["error"]["message"]
            except Exception:  # noqa: BLE001 - not the JSON error shape
                message = response.text
            raise RuntimeError(f"Failed to get server info. {message}")
