"""Under load: many concurrent streaming clients, a responsive /health, disconnects that free
their KV, and a SIGTERM that lets running requests finish."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import openai

from tests.server.conftest import start_server

CLIENTS, REQUESTS_EACH = 32, 4


def _kv_after_flush(server) -> dict:
    assert httpx.post(server.url + "/flush_cache", headers=server.headers).status_code == 200
    info = httpx.get(server.url + "/get_server_info", headers=server.headers).json()
    return info["internal_states"][0]


def test_32_streaming_clients_and_a_responsive_health_check(server):
    health_times: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            start = time.perf_counter()
            assert httpx.get(server.url + "/health", timeout=10).status_code == 200
            health_times.append(time.perf_counter() - start)
            time.sleep(0.2)

    async def one_client(client: openai.AsyncOpenAI, i: int) -> list[str]:
        texts = []
        for j in range(REQUESTS_EACH):
            stream = await client.chat.completions.create(
                model=server_model, messages=[{"role": "user", "content": f"Count to {i + j}."}],
                max_tokens=16, temperature=0.7, seed=i * 10 + j, stream=True)
            parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            texts.append("".join(parts))
        return texts

    async def main() -> list[list[str]]:
        async with openai.AsyncOpenAI(base_url=server.v1, api_key=server.api_key,
                                      max_retries=0, timeout=600) as client:
            return await asyncio.gather(*(one_client(client, i) for i in range(CLIENTS)))

    server_model = openai.OpenAI(base_url=server.v1, api_key=server.api_key).models.list() \
        .data[0].id
    prober = threading.Thread(target=probe)
    prober.start()
    try:
        results = asyncio.run(main())
    finally:
        stop.set()
        prober.join()
    assert sum(len(r) for r in results) == CLIENTS * REQUESTS_EACH
    assert all(t for r in results for t in r)
    assert len(health_times) > 5 and max(health_times) < 1.0, max(health_times)
    load = _kv_after_flush(server)
    assert load["num_used_tokens"] == 0 and load["num_running_reqs"] == 0


def test_a_client_that_disconnects_mid_stream_frees_its_request(server):
    with httpx.stream("POST", server.v1 + "/chat/completions", headers=server.headers,
                      timeout=60, json={"messages": [{"role": "user", "content": "Tell a story"}],
                                        "max_tokens": 4000, "ignore_eos": True,
                                        "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 3:
                break  # leaving the block closes the connection
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = httpx.get(server.url + "/get_server_info", headers=server.headers).json()
        if info["internal_states"][0]["num_running_reqs"] == 0:
            break
        time.sleep(0.2)
    assert _kv_after_flush(server)["num_used_tokens"] == 0


def test_sigterm_lets_running_requests_finish(tmp_path, smollm2_dir):
    srv = start_server(tmp_path, "--model-path", str(smollm2_dir), "--kv-cache-gb", "0.2")
    result: dict = {}

    def request() -> None:
        try:
            r = httpx.post(srv.url + "/generate", timeout=120, json={
                "text": "Once upon a time", "sampling_params": {"max_new_tokens": 64,
                                                                "ignore_eos": True}})
            result["status"], result["body"] = r.status_code, r.text
        except httpx.HTTPError as e:
            result["error"] = repr(e)

    worker = threading.Thread(target=request)
    worker.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # SIGTERM only once the request is running
        info = httpx.get(srv.url + "/get_server_info").json()
        if info["internal_states"][0]["num_running_reqs"]:
            break
        time.sleep(0.05)
    # uvicorn re-raises the signal once drained, so the exit status is the signal's.
    assert srv.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    worker.join()
    assert result.get("status") == 200, (result, srv.log.read_text()[-2000:])
    assert json.loads(result["body"])["meta_info"]["completion_tokens"] == 64
