"""Tool calls through /v1/chat/completions, and an embedding server checked against
sentence-transformers."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.server.conftest import start_server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a city",
    "parameters": {"type": "object", "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 20}}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize("tool_choice", [
    "required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_stream_and_non_stream(client, tool_choice):
    model = client.models.list().data[0].id
    out = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, TIME],
                                         tool_choice=tool_choice, temperature=0, max_tokens=96)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and calls[0].type == "function" and calls[0].id.startswith("call_")
    assert calls[0].function.name in ("get_weather", "get_time")
    if isinstance(tool_choice, dict):
        assert calls[0].function.name == "get_weather"
    assert "city" in json.loads(calls[0].function.arguments)
    # Streamed: the deltas rebuild the same calls.
    names: dict[int, str] = {}
    args: dict[int, str] = {}
    reasons = []
    for chunk in client.chat.completions.create(
            model=model, messages=ASK, tools=[WEATHER, TIME], tool_choice=tool_choice,
            temperature=0, max_tokens=96, stream=True):
        if not chunk.choices:
            continue
        reasons.append(chunk.choices[0].finish_reason)
        for delta in chunk.choices[0].delta.tool_calls or []:
            if delta.function.name:
                names[delta.index] = delta.function.name
            args[delta.index] = args.get(delta.index, "") + (delta.function.arguments or "")
    assert [names[i] for i in sorted(names)] == [c.function.name for c in calls]
    assert [args[i] for i in sorted(args)] == [c.function.arguments for c in calls]
    assert reasons[-1] == "tool_calls"


def test_tool_errors(client):
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER],
                                       tool_choice={"type": "function",
                                                    "function": {"name": "nope"}})
    assert "tool_choice" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=ASK,
                                       tools=[{"type": "function", "function": {}}])
    assert "tools[0]" in e.value.message


@pytest.fixture(scope="module")
def embedding_server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("embed"), "--model-path", "all-minilm-l6-v2",
                       "--is-embedding")
    yield srv
    srv.stop()


def test_embeddings_equal_sentence_transformers(embedding_server):
    from sentence_transformers import SentenceTransformer

    from sglbatch.engine.model_source import resolve_model_path

    texts = ["A cat sits on the mat.", "Stock markets fell sharply today.", "Hello!"]
    client = openai.OpenAI(base_url=embedding_server.v1, api_key="none", max_retries=0)
    out = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
    assert [d.index for d in out.data] == [0, 1, 2] and out.usage.prompt_tokens > 0
    reference = SentenceTransformer(str(resolve_model_path("all-minilm-l6-v2")),
                                    device="cpu").encode(texts)
    for data, ref in zip(out.data, reference):
        vec = data.embedding
        cos = sum(a * b for a, b in zip(vec, ref)) / (
            sum(a * a for a in vec) ** 0.5 * sum(b * b for b in ref) ** 0.5)
        assert cos > 0.999
    single = httpx.post(embedding_server.url + "/encode", json={"text": texts[0]}).json()
    assert single["embedding"] == pytest.approx(out.data[0].embedding, abs=1e-5)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="all-minilm-l6-v2", input="word " * 400)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="other", input="x")
    r = httpx.post(embedding_server.v1 + "/chat/completions",
                   json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "embedding" in r.json()["error"]["message"]
