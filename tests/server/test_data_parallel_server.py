"""`sglbatch serve --dp-size 2`: one server over two replica processes. Metrics and server
info show each replica's load; killing a replica while 32 streams run gives every client an
answer or an error, and the server keeps serving."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.conftest import start_server


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory, smollm2_dir: Path):
    srv = start_server(tmp_path_factory.mktemp("dp"), "--model-path", str(smollm2_dir),
                       "--kv-cache-gb", "0.25", "--dp-size", "2")
    yield srv
    assert srv.stop(timeout=90) in (0, -signal.SIGTERM)


def _model(srv) -> str:
    return httpx.get(f"{srv.v1}/models", timeout=60).json()["data"][0]["id"]


def _server_info(srv) -> dict:
    return httpx.get(f"{srv.url}/get_server_info", timeout=60).json()


def test_each_replica_reports_its_load(dp_server):
    client = openai.OpenAI(base_url=dp_server.v1, api_key="none", max_retries=0)
    out = client.completions.create(model=_model(dp_server), prompt="Hello", max_tokens=4,
                                    temperature=0)
    assert out.usage.completion_tokens == 4
    info = _server_info(dp_server)
    assert info["dp_size"] == 2
    assert [s["dp_rank"] for s in info["internal_states"]] == [0, 1]
    metrics = httpx.get(f"{dp_server.url}/metrics", timeout=60).text
    assert 'sglang:num_running_reqs{model_name="' in metrics and 'dp_rank="1"' in metrics


def test_killing_a_replica_under_32_streams_answers_everyone_and_serves_on(dp_server):
    model = _model(dp_server)

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=dp_server.v1, api_key="none", max_retries=0,
                                    timeout=120)
        first_chunks = asyncio.Event()
        started = 0

        async def one(i: int) -> str:
            nonlocal started
            try:
                stream = await client.completions.create(
                    model=model, prompt=f"{i} little stories, number {i * 7919}:",
                    max_tokens=120, temperature=0, stream=True,
                    extra_body={"ignore_eos": True})
                count = 0
                async for _ in stream:
                    count += 1
                    if count == 1:
                        started += 1
                        if started == 32:
                            first_chunks.set()
                return "done"
            except openai.APIError as e:
                return f"error: {e}"

        tasks = [asyncio.create_task(one(i)) for i in range(32)]
        await asyncio.wait_for(first_chunks.wait(), 120)
        victim = (await asyncio.to_thread(_server_info, dp_server))["internal_states"][1]["pid"]
        os.kill(victim, signal.SIGKILL)
        return await asyncio.wait_for(asyncio.gather(*tasks), 180)

    results = asyncio.run(run())
    assert len(results) == 32  # every client got an answer or an error, none hung
    errors = [r for r in results if r.startswith("error")]
    assert errors, "the killed replica had no streams"
    assert all("replica 1 died" in e for e in errors)
    assert httpx.get(f"{dp_server.url}/health", timeout=30).status_code == 200
    client = openai.OpenAI(base_url=dp_server.v1, api_key="none", max_retries=0)
    out = client.completions.create(model=_model(dp_server), prompt="Hello", max_tokens=4)
    assert out.usage.completion_tokens == 4
    assert [s["dp_rank"] for s in _server_info(dp_server)["internal_states"]] == [0]
