"""`endpoint` jobs: the same rows sent to a running `sglbatch serve` over HTTP (OpenAI and
native APIs) give the in-process engine's greedy results; a server that is down stops the
run without writing a row, and a rerun once it is up finishes the job."""

from __future__ import annotations

import yaml
from rich.console import Console

from sglbatch.jobs.command import run_jobs
from tests.jobs.helpers import QUICKSTART_ROWS, read_output, write_jsonl
from tests.server.conftest import API_KEY, free_port

ROWS = QUICKSTART_ROWS[:8]
SAMPLING = {"temperature": 0, "max_new_tokens": 10}


def _job_file(tmp_path, url: str, api: str, name: str, **request) -> str:
    spec = {"name": name, "endpoint": {"url": url, "api": api, "api_key_env": "SGLB_TEST_KEY"},
            "input": {"path": str(write_jsonl(tmp_path / "in.jsonl", ROWS)), "id_column": "id"},
            "sampling": SAMPLING, "output": {"path": str(tmp_path / f"{name}.jsonl")},
            **request}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def test_openai_and_native_endpoint_jobs_match_the_engine(server, engine, tmp_path,
                                                          monkeypatch):
    monkeypatch.setenv("SGLB_TEST_KEY", API_KEY)
    console = Console(stderr=True)
    chat = _job_file(tmp_path, server.url, "openai", "chat",
                     messages=[{"role": "user", "content": "{question}"}])
    assert run_jobs(chat, None, False, console) == 0
    out = {r["id"]: r for r in read_output(tmp_path / "chat.jsonl")}
    direct = engine.generate(messages=[[{"role": "user", "content": r["question"]}]
                                       for r in ROWS], sampling_params=SAMPLING)
    assert [out[r["id"]]["text"] for r in ROWS] == [d["text"] for d in direct]
    assert all(out[r["id"]]["meta_info"]["completion_tokens"] > 0 for r in ROWS)

    native = _job_file(tmp_path, server.url, "native", "native", prompt="Q: {question}\nA:")
    assert run_jobs(native, None, False, console) == 0
    out = {r["id"]: r for r in read_output(tmp_path / "native.jsonl")}
    direct = engine.generate([f"Q: {r['question']}\nA:" for r in ROWS], SAMPLING)
    assert [out[r["id"]]["text"] for r in ROWS] == [d["text"] for d in direct]


def test_a_down_server_stops_the_run_and_a_rerun_finishes(server, tmp_path, monkeypatch):
    monkeypatch.setenv("SGLB_TEST_KEY", API_KEY)
    monkeypatch.setattr("sglbatch.jobs.endpoint._RETRIES", 1)
    console = Console(stderr=True)
    down = f"http://127.0.0.1:{free_port()}"
    job = _job_file(tmp_path, down, "openai", "job", prompt="Q: {question}\nA:")
    assert run_jobs(job, None, False, console) == 1
    assert not (tmp_path / "job.jsonl").exists() or read_output(tmp_path / "job.jsonl") == []
    job = _job_file(tmp_path, server.url, "openai", "job", prompt="Q: {question}\nA:")
    assert run_jobs(job, None, False, console) == 0
    assert sorted(r["id"] for r in read_output(tmp_path / "job.jsonl")) == \
        sorted(r["id"] for r in ROWS)
