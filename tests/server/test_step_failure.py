"""A real `sglbatch serve` whose forward pass fails for some requests (`python -m
tests.fault_injection serve` from the repo root): each of those gets a 500 JSON error, in a
stream an error event, and the server keeps serving everyone else, through the official
openai client too."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import openai
import pytest

from tests.fault_injection import MESSAGE, POISON
from tests.server.conftest import start_server


@pytest.fixture(scope="module")
def poisoned_server(tmp_path_factory, smollm2_dir: Path):
    srv = start_server(tmp_path_factory.mktemp("poisoned"), "--model-path", str(smollm2_dir),
                       "--dtype", "float32", "--kv-cache-gb", "0.2",
                       entry=("-m", "tests.fault_injection"))
    yield srv
    # It still shuts down cleanly: uvicorn drains, then re-raises SIGTERM.
    assert srv.stop(timeout=60) in (0, -signal.SIGTERM)


GREEDY = {"temperature": 0, "max_new_tokens": 8}


def test_failed_request_gets_500_json_and_the_server_keeps_serving(poisoned_server):
    url = poisoned_server.url
    bad = httpx.post(f"{url}/generate", json={"text": "Hello", "rid": f"{POISON}-1",
                                              "sampling_params": GREEDY}, timeout=120)
    assert bad.status_code == 500
    error = bad.json()["error"]
    assert MESSAGE in error["message"] and error["type"] == "server_error"

    good = httpx.post(f"{url}/generate", json={"text": "Hello", "sampling_params": GREEDY},
                      timeout=120)
    assert good.status_code == 200 and good.json()["meta_info"]["completion_tokens"] == 8
    client = openai.OpenAI(base_url=poisoned_server.v1, api_key="none", max_retries=0)
    chat = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": "Say hi."}], max_tokens=4,
        temperature=0)
    assert chat.usage.completion_tokens > 0


def test_failed_stream_ends_with_an_error_event(poisoned_server):
    with httpx.stream("POST", f"{poisoned_server.url}/generate", timeout=120, json={
            "text": "Hello", "rid": f"{POISON}-2", "sampling_params": GREEDY,
            "stream": True}) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    assert MESSAGE in json.loads(events[-2])["error"]["message"]
    health = httpx.get(f"{poisoned_server.url}/health_generate", timeout=120)
    assert health.status_code == 200
