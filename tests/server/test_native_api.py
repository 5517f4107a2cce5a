"""SGLang's native API on a real server over loopback."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

PROMPT = "The capital of France is"
GREEDY = {"temperature": 0, "max_new_tokens": 12}


def post(server, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=server.headers, timeout=120, **kw)


def sse_events(response: httpx.Response) -> list[dict]:
    events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_health_needs_no_key_but_everything_else_does(server):
    assert httpx.get(server.url + "/health").status_code == 200
    for path in ("/get_model_info", "/metrics", "/v1/models"):
        r = httpx.get(server.url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.get(server.url + path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
    r = httpx.post(server.url + "/generate", json={"text": PROMPT})
    assert r.status_code == 401


def test_generate_stream_and_batch_agree(server):
    single = post(server, "/generate", {"text": PROMPT, "sampling_params": GREEDY}).json()
    assert single["meta_info"]["completion_tokens"] == len(single["output_ids"]) > 0
    with httpx.stream("POST", server.url + "/generate", headers=server.headers, timeout=120,
                      json={"text": PROMPT, "sampling_params": GREEDY, "stream": True}) as r:
        events = sse_events(r)
    # Each event carries the text so far (SGLang's frontend slices the new part itself).
    assert events[-1]["text"] == single["text"]
    assert all(b["text"].startswith(a["text"]) for a, b in zip(events, events[1:]))
    assert events[-1]["meta_info"]["finish_reason"] is not None
    batch = post(server, "/generate", {"text": [PROMPT, "1, 2, 3,"],
                                       "sampling_params": GREEDY}).json()
    assert isinstance(batch, list) and batch[0]["text"] == single["text"]
    ids = post(server, "/generate", {"input_ids": [1, 504, 3575, 282, 4649, 314],
                                     "sampling_params": {"max_new_tokens": 2}}).json()
    assert ids["meta_info"]["prompt_tokens"] == 6


def test_generate_logprobs_and_select_style_requests(server):
    # What SGLang's RuntimeEndpoint.select sends: prefill-only requests with input logprobs.
    out = post(server, "/generate", {
        "text": [PROMPT + " Paris", PROMPT + " London"],
        "sampling_params": {"max_new_tokens": 0, "temperature": 0},
        "return_logprob": True, "return_text_in_logprobs": True, "logprob_start_len": 3}).json()
    assert len(out) == 2
    for o in out:
        entries = o["meta_info"]["input_token_logprobs"]
        assert entries and all(isinstance(e[2], str) for e in entries)
        assert o["meta_info"]["output_token_logprobs"] == []
    paris, london = (o["meta_info"]["normalized_prompt_logprob"] for o in out)
    assert paris > london


def test_info_flush_and_metrics(server):
    info = httpx.get(server.url + "/get_model_info", headers=server.headers).json()
    assert info["is_generation"] is True and info["model_path"]
    sinfo = httpx.get(server.url + "/get_server_info", headers=server.headers).json()
    assert sinfo["max_total_num_tokens"] > 0 and sinfo["api_key"] is None
    assert httpx.get(server.url + "/server_info", headers=server.headers).status_code == 200
    assert httpx.post(server.url + "/flush_cache", headers=server.headers).status_code == 200
    before = _metric(server, "sglang:generation_tokens_total")
    post(server, "/generate", {"text": PROMPT, "sampling_params": GREEDY})
    text = httpx.get(server.url + "/metrics", headers=server.headers).text
    assert _metric(server, "sglang:generation_tokens_total") == before + GREEDY["max_new_tokens"]
    for name in ("sglang:prompt_tokens_total", "sglang:time_to_first_token_seconds_bucket",
                 "sglang:time_per_output_token_seconds_count",
                 "sglang:e2e_request_latency_seconds_sum", "sglang:num_running_reqs",
                 "sglang:num_queue_reqs", "sglang:token_usage", "sglang:cache_hit_rate"):
        assert name in text, name
    assert httpx.get(server.url + "/health_generate", headers=server.headers).status_code == 200


def _metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", headers=server.headers).text
    line = next(l for l in text.splitlines() if l.startswith(name + "{"))
    return float(line.rsplit(" ", 1)[1])


def test_abort_request_ends_a_running_stream(server):
    rid = "abort-me"
    events: list[dict] = []

    def consume() -> None:
        with httpx.stream("POST", server.url + "/generate", headers=server.headers, timeout=120,
                          json={"text": PROMPT, "rid": rid, "stream": True,
                                "sampling_params": {"max_new_tokens": 2000,
                                                    "ignore_eos": True}}) as r:
            events.extend(sse_events(r))

    reader = threading.Thread(target=consume)
    reader.start()
    time.sleep(1.5)
    assert post(server, "/abort_request", {"rid": rid}).status_code == 200
    reader.join(60)
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert events[-1]["meta_info"]["completion_tokens"] < 2000


@pytest.mark.parametrize("body, status, param", [
    ({"text": PROMPT, "sampling_params": {"top_p": 5}}, 400, "sampling_params.top_p"),
    ({"text": PROMPT, "sampling_params": {"regex": "("}}, 400, "sampling_params.regex"),
    ({"text": PROMPT, "bogus": 1}, 400, "bogus"),
    ({"text": "word " * 9000}, 400, None),
    ({"text": PROMPT, "image_data": "x"}, 400, "image_data"),
])
def test_generate_errors_are_json_and_the_server_keeps_serving(server, body, status, param):
    r = post(server, "/generate", body)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["message"] and (param is None or error["param"] == param)
    r = httpx.post(server.url + "/generate", content=b"{not json", headers=server.headers)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert post(server, "/generate", {"text": PROMPT,
                                      "sampling_params": {"max_new_tokens": 1}}).status_code == 200
