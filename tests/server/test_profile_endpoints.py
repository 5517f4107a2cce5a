"""/start_profile and /stop_profile on the session server: the trace records the engine
thread's forward passes; errors are 400s."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

GREEDY = {"temperature": 0, "max_new_tokens": 4}


def post(server, path: str, body: dict | None = None) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=server.headers, timeout=120)


def trace_names(path: Path) -> set[str]:
    with path.open() as f:
        return {event.get("name") for event in json.load(f)["traceEvents"]}


def test_profile_a_generate_between_start_and_stop(server, tmp_path):
    r = post(server, "/stop_profile")
    assert r.status_code == 400 and "no profile is running" in r.json()["error"]["message"]

    r = post(server, "/start_profile", {"output_dir": str(tmp_path), "record_shapes": True})
    assert r.status_code == 200, r.text
    planned = Path(r.json()["trace_path"])
    r = post(server, "/start_profile", {"output_dir": str(tmp_path)})
    assert r.status_code == 400 and "already running" in r.json()["error"]["message"]

    out = post(server, "/generate", {"text": "The capital of France is",
                                     "sampling_params": GREEDY}).json()
    assert out["meta_info"]["completion_tokens"] == 4
    r = post(server, "/stop_profile")
    assert r.status_code == 200, r.text
    path = Path(r.json()["trace_path"])
    assert path == planned and path.parent == tmp_path
    names = trace_names(path)
    for name in ("sglbatch.schedule", "sglbatch.forward_extend", "sglbatch.forward_decode",
                 "sglbatch.sample", "sglbatch.process_output", "sglbatch.layer.0"):
        assert name in names, name
    assert names & {"aten::mm", "aten::linear", "aten::bmm", "aten::matmul",
                    "mkldnn::_linear_pointwise", "sglbatch.linear"}


def test_profile_stops_itself_after_num_steps(server, tmp_path):
    r = post(server, "/start_profile", {"output_dir": str(tmp_path), "num_steps": 2})
    assert r.status_code == 200, r.text
    path = Path(r.json()["trace_path"])
    post(server, "/generate", {"text": "Hello", "sampling_params": {**GREEDY,
                                                                    "max_new_tokens": 6}})
    deadline = time.monotonic() + 30
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    r = post(server, "/stop_profile")  # already stopped by itself
    assert r.status_code == 400 and str(path) in r.json()["error"]["message"]
    names = [e.get("name") for e in json.loads(path.read_text())["traceEvents"]]
    # One extend and one decode step: the profile ended before the other four.
    assert names.count("sglbatch.forward_extend") == 1
    assert names.count("sglbatch.forward_decode") == 1


def test_start_profile_refuses_bad_bodies(server, tmp_path):
    for body, param in [({"num_steps": "3"}, "num_steps"), ({"num_steps": 0}, None),
                        ({"bogus": 1}, "bogus"), ({"start_step": 2}, "start_step"),
                        ({"activities": ["TPU"]}, None)]:
        r = post(server, "/start_profile", {"output_dir": str(tmp_path), **body})
        assert r.status_code == 400, body
        if param:
            assert r.json()["error"]["param"] == param
    assert post(server, "/stop_profile").status_code == 400  # none of them started one
    r = httpx.post(server.url + "/start_profile", headers=server.headers, content=b"[1]")
    assert r.status_code == 400
