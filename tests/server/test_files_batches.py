"""OpenAI's Files and Batch APIs against real servers, driven by the official `openai` client:
uploads and their checks, batches that complete, fail requests, fail validation, are
cancelled, and survive a SIGKILL of the server mid-batch."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.server.conftest import ServerProcess, start_server

TERMINAL = ("completed", "failed", "cancelled", "expired")
UPLOAD_LIMIT_MB = 0.1  # the limited server's --max-upload-mb


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def chat_lines(model: str, n: int, max_tokens: int = 8, prefix: str = "req") -> list[dict]:
    return [{"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "max_tokens": max_tokens, "temperature": 0,
                      "messages": [{"role": "user", "content": f"Tell me about the number {i}"}]}}
            for i in range(n)]


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def upload(client: openai.OpenAI, data: bytes, name: str = "batch.jsonl") -> Any:
    return client.files.create(file=(name, data), purpose="batch")


def wait_batch(client: openai.OpenAI, batch_id: str, done: Callable[[Any], bool] | None = None,
               timeout: float = 240, poll: float = 0.1) -> Any:
    """Poll until `done(batch)` (default: a terminal status)."""
    done = done or (lambda b: b.status in TERMINAL)
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if done(batch):
            return batch
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} still {batch.status}: {batch}")
        time.sleep(poll)


def read_lines(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def run_batch(client: openai.OpenAI, lines: list[dict],
              endpoint: str = "/v1/chat/completions") -> Any:
    f = upload(client, jsonl(lines))
    batch = client.batches.create(input_file_id=f.id, endpoint=endpoint,
                                  completion_window="24h")
    return wait_batch(client, batch.id)


# ---- files -------------------------------------------------------------------------------

def test_file_upload_list_retrieve_content_delete(client, model):
    data = jsonl(chat_lines(model, 3))
    f = upload(client, data, "mine.jsonl")
    assert f.id.startswith("file-") and f.object == "file"
    assert (f.bytes, f.filename, f.purpose) == (len(data), "mine.jsonl", "batch")
    assert abs(f.created_at - time.time()) < 60

    assert client.files.retrieve(f.id).model_dump() == f.model_dump()
    assert client.files.content(f.id).content == data
    assert f.id in [x.id for x in client.files.list()]
    assert f.id in [x.id for x in client.files.list(purpose="batch")]
    assert f.id not in [x.id for x in client.files.list(purpose="batch_output")]
    second = upload(client, data)
    page = client.files.list(limit=1, order="desc")
    assert [x.id for x in page.data] == [second.id] and page.has_more
    assert client.files.list(limit=1, order="desc", after=second.id).data[0].id == f.id

    deleted = client.files.delete(f.id)
    assert (deleted.id, deleted.deleted) == (f.id, True)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(f.id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(f.id)
    assert f.id not in [x.id for x in client.files.list()]
    client.files.delete(second.id)


def test_upload_needs_purpose_batch(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("x.jsonl", jsonl(chat_lines(model, 1))), purpose="fine-tune")
    assert e.value.body["param"] == "purpose"


@pytest.mark.parametrize("bad, line, says", [
    ("not json", 2, "JSON"),
    ('["a list"]', 2, "object"),
    ('{"method": "POST", "url": "/v1/chat/completions", "body": {}}', 2, "custom_id"),
    ('{"custom_id": "req-0", "method": "POST", "url": "/v1/chat/completions", "body": {}}',
     2, "duplicate"),
    ('{"custom_id": "x", "method": "GET", "url": "/v1/chat/completions", "body": {}}',
     2, "method"),
    ('{"custom_id": "x", "method": "POST", "url": "/v1/images", "body": {}}', 2, "url"),
    ('{"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": "hi"}',
     2, "body"),
])
def test_upload_rejects_invalid_batch_lines(client, model, bad, line, says):
    good = jsonl(chat_lines(model, 2)).decode().splitlines()
    data = "\n".join([good[0], bad, good[1]]) + "\n"
    with pytest.raises(openai.BadRequestError) as e:
        upload(client, data.encode())
    message = e.value.body["message"]
    assert f"line {line}" in message and says in message, message


def test_crafted_file_ids_cannot_escape_the_data_dir(server, client):
    """Ids that are not `file-<32 hex>` are 404 before any path is built; nothing outside
    <data_dir>/files (e.g. state.sqlite3) is ever served or deleted."""
    sqlite = Path(server.log).parent / "data" / "state.sqlite3"
    assert sqlite.is_file()
    crafted = ["..", "../state.sqlite3", "..%2Fstate.sqlite3", "%2e%2e%2fstate.sqlite3",
               "file-..%2F..%2Fstate.sqlite3", "..%5Cstate.sqlite3", "state.sqlite3",
               ".file-" + "0" * 32 + ".part", "file-" + "0" * 32, "file-" + "A" * 32,
               "%00", "file-" + "0" * 32 + "%2F..%2F..%2Fstate.sqlite3"]
    with httpx.Client(base_url=server.v1, headers=server.headers) as http:
        for file_id in crafted:
            for method, path in (("GET", f"/files/{file_id}"), ("GET", f"/files/{file_id}/content"),
                                 ("DELETE", f"/files/{file_id}")):
                r = http.request(method, path)
                assert r.status_code == 404, (method, path, r.status_code, r.text[:200])
                assert b"SQLite format" not in r.content
        r = http.post("/batches", json={"input_file_id": "../state.sqlite3",
                                        "endpoint": "/v1/chat/completions",
                                        "completion_window": "24h"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "input_file_id"
        assert http.get("/batches/..%2Fstate.sqlite3").status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.files.content("../state.sqlite3")
    assert sqlite.is_file()


# ---- batches -----------------------------------------------------------------------------

def test_batch_of_50_chat_requests_completes(client, model):
    lines = chat_lines(model, 50)
    f = upload(client, jsonl(lines))
    created = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                    completion_window="24h", metadata={"run": "test-50"})
    assert created.id.startswith("batch_") and created.object == "batch"
    assert created.status in ("validating", "in_progress")
    assert created.metadata == {"run": "test-50"} and created.input_file_id == f.id
    assert created.expires_at == created.created_at + 24 * 3600

    batch = wait_batch(client, created.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.model_dump() == {"total": 50, "completed": 50, "failed": 0}
    assert batch.error_file_id is None and batch.errors is None
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    assert batch.model == model

    out_file = client.files.retrieve(batch.output_file_id)
    assert out_file.purpose == "batch_output"
    out = read_lines(client, batch.output_file_id)
    assert len(out) == 50 and out_file.bytes == len(client.files.content(out_file.id).content)
    assert sorted(r["custom_id"] for r in out) == sorted(line["custom_id"] for line in lines)
    for r in out:
        assert r["id"].startswith("batch_req_") and r["error"] is None
        assert r["response"]["status_code"] == 200 and r["response"]["request_id"]
        body = r["response"]["body"]
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] <= 8
        assert body["choices"][0]["message"]["content"]
    usage = [r["response"]["body"]["usage"] for r in out]
    assert batch.usage.output_tokens == sum(u["completion_tokens"] for u in usage)
    assert batch.usage.input_tokens == sum(u["prompt_tokens"] for u in usage) > 0

    assert batch.id in [b.id for b in client.batches.list()]
    first = client.batches.list(limit=1)
    assert len(first.data) == 1
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)
    # the input file can go; the batch and its outputs stay
    client.files.delete(f.id)
    assert client.batches.retrieve(batch.id).status == "completed"


def test_failed_requests_go_to_the_error_file(client, model):
    lines = chat_lines(model, 4, max_tokens=4)
    lines[1]["body"]["model"] = "no-such-model"
    lines[3]["body"]["max_tokens"] = -1
    batch = run_batch(client, lines)
    assert batch.status == "completed"
    assert batch.request_counts.model_dump() == {"total": 4, "completed": 2, "failed": 2}
    ok = {r["custom_id"]: r for r in read_lines(client, batch.output_file_id)}
    errors = {r["custom_id"]: r for r in read_lines(client, batch.error_file_id)}
    assert set(ok) == {"req-0", "req-2"} and set(errors) == {"req-1", "req-3"}
    assert errors["req-1"]["response"]["status_code"] == 404
    assert errors["req-3"]["response"]["status_code"] == 400
    assert errors["req-3"]["response"]["body"]["error"]["param"] == "max_tokens"
    assert client.files.retrieve(batch.error_file_id).purpose == "batch_output"


def test_batch_validation_fails_on_a_line_for_another_endpoint(client, model):
    lines = chat_lines(model, 3)
    lines[2] = {"custom_id": "c", "method": "POST", "url": "/v1/completions",
                "body": {"model": model, "prompt": "hi", "max_tokens": 2}}
    batch = run_batch(client, lines)
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.output_file_id is None
    [error] = batch.errors.data
    assert error.line == 3 and error.param == "url"


def test_batch_create_is_checked(client, model):
    f = upload(client, jsonl(chat_lines(model, 1)))
    base = {"input_file_id": f.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    for change, param in (({"input_file_id": "file-" + "0" * 32}, "input_file_id"),
                          ({"endpoint": "/v1/moderations"}, "endpoint"),
                          ({"endpoint": "/v1/embeddings"}, "endpoint"),
                          ({"completion_window": "1h"}, "completion_window"),
                          ({"metadata": {str(i): "v" for i in range(17)}}, "metadata")):
        with pytest.raises(openai.APIStatusError) as e:
            client.batches.create(**{**base, **change})
        assert e.value.status_code in (400, 404) and e.value.body["param"] == param
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_" + "0" * 32)
    with pytest.raises(openai.NotFoundError):
        client.batches.cancel("batch_" + "0" * 32)


@pytest.mark.slow
def test_cancel_keeps_partial_results(client, model):
    lines = chat_lines(model, 300, max_tokens=16, prefix="cancel")
    f = upload(client, jsonl(lines))
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    wait_batch(client, batch.id, lambda b: b.request_counts.completed > 0
               or b.status not in ("validating", "in_progress"))
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    batch = wait_batch(client, batch.id, timeout=60)
    assert batch.status == "cancelled" and batch.cancelled_at >= batch.cancelling_at
    assert client.batches.cancel(batch.id).status == "cancelled"  # idempotent

    counts = batch.request_counts
    out = read_lines(client, batch.output_file_id)
    ids = [r["custom_id"] for r in out]
    assert 0 < len(out) < 300 and counts.total == 300
    assert len(ids) == len(set(ids)) and set(ids) <= {line["custom_id"] for line in lines}
    assert counts.completed == len(out) and counts.failed == 0
    assert all(r["response"]["status_code"] == 200 for r in out)


# ---- a server of our own: upload limit, SIGKILL mid-batch ----------------------------------

@pytest.fixture(scope="module")
def own_server(tmp_path_factory, smollm2_dir) -> Iterator[tuple]:
    """A server with a small upload limit on its own data dir (the SIGKILL test kills it and
    starts it again: the last list item is the server now running)."""
    tmp = tmp_path_factory.mktemp("batch-server")
    args = ["--model-path", str(smollm2_dir), "--dtype", "float32", "--kv-cache-gb", "0.5",
            "--max-upload-mb", str(UPLOAD_LIMIT_MB)]
    servers = [start_server(tmp, *args)]
    yield servers[0], tmp, args, servers
    for srv in servers:
        srv.stop()


def own_client(srv: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.v1, api_key="unused", max_retries=0)


def test_upload_over_the_limit_is_413(own_server, model):
    srv, *_ = own_server
    client = own_client(srv)
    limit = int(UPLOAD_LIMIT_MB * 1024 * 1024)
    lines = chat_lines(model, 1000)
    data = jsonl(lines)
    assert len(data) > 2 * limit
    with pytest.raises(openai.APIStatusError) as e:
        upload(client, data)
    assert e.value.status_code == 413 and e.value.body["param"] == "file"
    assert "--max-upload-mb" in e.value.body["message"]
    # nothing was kept, and the server still takes uploads within the limit
    assert all(f.bytes <= limit for f in client.files.list())
    assert not list((Path(srv.log).parent / "data" / "files").glob(".*.part"))
    small = upload(client, jsonl(lines[:5]))
    assert client.files.retrieve(small.id).bytes == len(jsonl(lines[:5]))


@pytest.mark.slow
def test_sigkill_mid_batch_resumes_with_one_result_per_request(own_server, model):
    """SIGKILL with two batches running; before the restart the second is put in
    `cancelling` in the store (where a kill during a cancel leaves it). The restarted server
    finishes the first with exactly one result per custom_id and the cancel of the second."""
    srv, tmp, args, servers = own_server
    client = own_client(srv)
    n = 100  # > MAX_IN_FLIGHT (64): the first results land while the rest still run
    lines = chat_lines(model, n, max_tokens=16, prefix="k")
    f = upload(client, jsonl(lines))
    batch, other = (client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                          completion_window="24h") for _ in range(2))
    mid = wait_batch(client, batch.id, lambda b: b.request_counts.completed > 0
                     or b.status in TERMINAL, poll=0.05)
    assert mid.status == "in_progress" and mid.request_counts.completed < n, mid
    srv.stop(signal.SIGKILL)
    before = mid.request_counts.completed

    db = sqlite3.connect(tmp / "data" / "state.sqlite3")
    with db:
        moved = db.execute("UPDATE batches SET status = 'cancelling', cancelling_at = ? "
                           "WHERE id = ? AND status = 'in_progress'",
                           (int(time.time()), other.id)).rowcount
    other_done = db.execute("SELECT completed FROM batches WHERE id = ?",
                            (other.id,)).fetchone()[0]
    db.close()
    assert moved == 1

    srv = start_server(tmp, *args)  # the same data dir
    servers.append(srv)
    client = own_client(srv)
    resumed = client.batches.retrieve(batch.id)
    assert resumed.request_counts.completed >= before  # what was recorded survived
    assert resumed.status in ("in_progress", "finalizing", "completed")
    batch = wait_batch(client, batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.model_dump() == {"total": n, "completed": n, "failed": 0}
    out = read_lines(client, batch.output_file_id)
    ids = [r["custom_id"] for r in out]
    assert len(ids) == n and set(ids) == {line["custom_id"] for line in lines}
    assert batch.error_file_id is None

    other = wait_batch(client, other.id, timeout=30)
    assert other.status == "cancelled" and other.request_counts.completed == other_done
    other_ids = [r["custom_id"] for r in read_lines(client, other.output_file_id)]
    assert len(other_ids) == len(set(other_ids)) == other_done


def test_batch_lines_and_the_in_process_dispatch_name_the_same_endpoints():
    from sglbatch.server.file_storage import BATCH_ENDPOINTS
    from sglbatch.server.openai_api import _DISPATCH

    assert set(BATCH_ENDPOINTS) == set(_DISPATCH)
