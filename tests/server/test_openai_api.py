"""The OpenAI API on a real server, driven by the official `openai` client."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

CHAT = [{"role": "user", "content": "Name three colors."}]


def test_models(client, server):
    models = client.models.list().data
    assert len(models) == 1
    assert client.models.retrieve(models[0].id).id == models[0].id


def test_chat_stream_equals_non_stream_at_temperature_0(client):
    model = client.models.list().data[0].id
    full = client.chat.completions.create(model=model, messages=CHAT, temperature=0,
                                          max_tokens=24)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert full.usage.completion_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(client.chat.completions.create(
        model=model, messages=CHAT, temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason


def test_chat_sampling_fields(client):
    model = client.models.list().data[0].id
    many = client.chat.completions.create(model=model, messages=CHAT, n=3, temperature=1.0,
                                          seed=7, max_completion_tokens=16)
    again = client.chat.completions.create(model=model, messages=CHAT, n=3, temperature=1.0,
                                           seed=7, max_completion_tokens=16)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.message.content for c in many.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in many.choices}) > 1
    stopped = client.chat.completions.create(model=model, messages=CHAT, temperature=0,
                                             max_tokens=64, stop=["\n"])
    assert "\n" not in stopped.choices[0].message.content
    assert stopped.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model=model, messages=CHAT, temperature=0,
                                           max_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_chat_logprobs(client):
    model = client.models.list().data[0].id
    out = client.chat.completions.create(model=model, messages=CHAT, temperature=0,
                                         max_tokens=6, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert item.top_logprobs[0].token == item.token
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-4)


def test_structured_outputs(client):
    model = client.models.list().data[0].id
    schema = {"type": "object", "properties": {"color": {"type": "string", "maxLength": 12}},
              "required": ["color"]}
    out = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Pick a color, as JSON."}],
        temperature=0, max_tokens=64,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    assert isinstance(json.loads(out.choices[0].message.content)["color"], str)
    out = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": 'Reply with {"name": "Bob"}'}],
        temperature=0, max_tokens=64, response_format={"type": "json_object"})
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    out = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "A date?"}], temperature=0,
        max_tokens=16, extra_body={"regex": r"\d{4}-\d{2}-\d{2}", "top_k": 5})
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", out.choices[0].message.content)


def test_completions(client, server):
    model = client.models.list().data[0].id
    prompt = "The capital of France is"
    one = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    assert one.object == "text_completion" and one.choices[0].text
    many = client.completions.create(model=model, prompt=[prompt, "1, 2, 3,"], max_tokens=8,
                                     temperature=0, n=2)
    assert len(many.choices) == 4 and many.choices[0].text == one.choices[0].text
    ids = httpx.post(server.v1 + "/completions", headers=server.headers, json={
        "prompt": [1, 504, 3575, 282, 4649, 314], "max_tokens": 2}).json()
    assert ids["usage"]["prompt_tokens"] == 6
    echoed = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0,
                                       echo=True, logprobs=2)
    assert echoed.choices[0].text.startswith(prompt)
    lp = echoed.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(lp.token_logprobs)
    assert "".join(lp.tokens) == echoed.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt=prompt, max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == one.choices[0].text


@pytest.mark.parametrize("messages,param,says", [
    ([{"role": "wizard", "content": "Hi"}], "messages[0].role", "'wizard' is not one of"),
    ([{"content": "Hi"}], "messages[0].role", "missing"),
    ([{"role": "user", "content": 42}], "messages[0].content", "got int"),
    ([{"role": "user", "content": {"text": "Hi"}}], "messages[0].content", "got dict"),
    ([{"role": "user", "content": [{"text": "Hi"}]}], "messages[0].content[0]", "content part"),
    ([{"role": "system", "content": "Be brief."}, {"role": "user"}], "messages[1].content",
     "missing"),
    ([{"role": "user", "content": "Hi"}, {"role": "tool", "content": "42"}],
     "messages[1].tool_call_id", "needs the id"),
    (["Hi"], "messages[0]", "expected an object"),
])
def test_bad_chat_messages_are_400s_naming_the_field(client, messages, param, says):
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=messages, max_tokens=4)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param and says in e.value.body["message"]
    # The server keeps serving; developer and tool messages of the right shape pass.
    ok = client.chat.completions.create(model=model, max_tokens=2, messages=[
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    assert ok.choices[0].message.content is not None


def test_errors(client, server):
    model = client.models.list().data[0].id
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=CHAT)
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[
            {"role": "user", "content": "word " * 9000}])
    assert "context" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=CHAT, temperature=-1)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=CHAT, extra_body={"bogus": 1})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.v1, api_key="wrong", max_retries=0).models.list()
    r = httpx.post(server.v1 + "/chat/completions", headers=server.headers,
                   content=b'{"messages": [')
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert client.chat.completions.create(model=model, messages=CHAT, max_tokens=1).choices
