"""OpenAI's Batch API (/v1/batches): a SQLite store for file and batch metadata, and the
BatchRunner that executes batches through the OpenAI handlers in-process.

Layout under --data-dir:
  state.sqlite3            files, batches and batch_results tables (WAL, synchronous=FULL)
  files/<file-id>          file contents (uploads and batch outputs)
  batches/<batch_id>.jsonl the batch's input, hard-linked (or copied) at creation, so deleting
                           the input file does not pull the requests away from a running batch

Crash safety: a request's result exists exactly when the transaction that inserted its row in
`batch_results` (primary key batch_id + custom_id) committed, and that same transaction bumps
the batch's request_counts and usage. So after a SIGKILL the store says which custom_ids are
done; a restarted server resumes every unfinished batch and runs only the others. Output and
error files are written from `batch_results` at the end (temp file, fsync, rename, directory
fsync), under file ids fixed in the batch row beforehand, and one transaction then registers
them, sets the final status and drops the batch's rows: a crash before that commit just
writes the same files again on the next start. Status changes are compare-and-set updates, so
a cancel racing the runner has one winner.

Scheduling: every active batch runs in its own task, and all of them share one window of
MAX_IN_FLIGHT requests (a FIFO semaphore): the engine always sees up to that many requests to
batch together, and a small batch is not stuck behind a large one that came first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI
from pydantic import BaseModel

from sglbatch.server import file_storage
from sglbatch.server.errors import APIError, error_body
from sglbatch.server.file_storage import BATCH_ENDPOINTS
from sglbatch.server.openai_api import dispatch
from sglbatch.server.state import ServerState
from sglbatch.server.store import ACTIVE, Store

logger = logging.getLogger(__name__)
T = TypeVar("T")

BATCH_ID = re.compile(r"batch_[0-9a-f]{32}")
MAX_IN_FLIGHT = 64
COMPLETION_WINDOWS = {"24h": 24 * 3600}
_MAX_VALIDATION_ERRORS = 20
_READ_BLOCK = 256  # input lines parsed per thread hop
_SHUTDOWN_GRACE_S = 10.0

def batch_object(row: dict[str, Any]) -> dict[str, Any]:
    errors = json.loads(row["errors"]) if row["errors"] else None
    return {
        "id": row["id"], "object": "batch", "endpoint": row["endpoint"], "model": row["model"],
        "errors": errors, "input_file_id": row["input_file_id"],
        "completion_window": row["completion_window"], "status": row["status"],
        "output_file_id": row["output_file_id"], "error_file_id": row["error_file_id"],
        **{k: row[k] for k in ("created_at", "in_progress_at", "expires_at", "finalizing_at",
                               "completed_at", "failed_at", "expired_at", "cancelling_at",
                               "cancelled_at")},
        "request_counts": {"total": row["total"], "completed": row["completed"],
                           "failed": row["failed"]},
        "usage": {"input_tokens": row["input_tokens"],
                  "input_tokens_details": {"cached_tokens": row["cached_tokens"]},
                  "output_tokens": row["output_tokens"],
                  "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": row["input_tokens"] + row["output_tokens"]},
        "metadata": json.loads(row["metadata"]) if row["metadata"] else None,
    }


def _result(line: int, custom_id: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    """A finished request as its output/error-file line and the counters it moves."""
    record = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
              "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}",
                           "body": body},
              "error": None}
    u = (body.get("usage") or {}) if status == 200 else {}
    usage = (u.get("prompt_tokens") or 0,
             (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
             u.get("completion_tokens") or 0)
    return {"custom_id": custom_id, "line": line, "ok": int(status == 200),
            "record": json.dumps(record, ensure_ascii=False), "usage": usage}


def _expired_record(custom_id: str) -> str:
    return json.dumps({"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
                       "response": None,
                       "error": {"code": "batch_expired",
                                 "message": "This request could not be executed before the "
                                            "completion window expired."}},
                      ensure_ascii=False)


# ---- the runner --------------------------------------------------------------------------

class _Writer:
    """Group commit: results finished while a commit runs go in the next one."""

    def __init__(self, store: Store, batch_id: str):
        self.store, self.batch_id = store, batch_id
        self.pending: list[dict[str, Any]] = []
        self.task: asyncio.Task | None = None

    def add(self, result: dict[str, Any]) -> None:
        self.pending.append(result)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        while self.pending:
            items, self.pending = self.pending, []
            await self.store.call(self.store.record_results, self.batch_id, items)

    async def close(self) -> None:
        while self.task is not None and not self.task.done():
            await asyncio.shield(self.task)
        if self.task is not None:
            self.task.result()  # a failed commit fails the batch


class BatchRunner:
    def __init__(self, state: ServerState, store: Store):
        self.state = state
        self.data_dir = Path(state.args.data_dir)
        file_storage.files_dir(self.data_dir).mkdir(parents=True, exist_ok=True)
        self.inputs_dir = self.data_dir / "batches"
        self.inputs_dir.mkdir(parents=True, exist_ok=True)
        self.store = store
        self._tasks: dict[str, asyncio.Task] = {}
        self._cancels: dict[str, asyncio.Event] = {}
        self._window: asyncio.Semaphore | None = None
        self._shutdown: asyncio.Event | None = None

    def input_path(self, batch_id: str) -> Path:
        if not BATCH_ID.fullmatch(batch_id):
            raise ValueError(f"not a batch id: {batch_id!r}")
        return self.inputs_dir / f"{batch_id}.jsonl"

    # lifecycle
    async def start(self) -> None:
        self._window = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._shutdown = asyncio.Event()
        await self.store.call(self._clean_up)
        for row in await self.store.call(self.store.active_batches):
            logger.info("resuming batch %s (%s)", row["id"], row["status"])
            self.submit(row["id"])

    async def stop(self) -> None:
        """Stop executing: in-flight requests are aborted, finished ones committed; active
        batches stay as they are in the store and resume on the next start."""
        if self._shutdown is not None:
            self._shutdown.set()
        tasks = list(self._tasks.values())
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=_SHUTDOWN_GRACE_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    def _clean_up(self) -> None:
        """Runs before any batch resumes: drop temp files, files no row names (a crash between
        writing and registering), and inputs of batches that are over."""
        known = self.store.file_ids()
        for path in file_storage.files_dir(self.data_dir).iterdir():
            if path.name.endswith(".part") or (file_storage.FILE_ID.fullmatch(path.name)
                                               and path.name not in known):
                path.unlink(missing_ok=True)
        statuses = self.store.batch_ids()
        for path in self.inputs_dir.iterdir():
            if path.suffix == ".part" or statuses.get(path.stem) not in ACTIVE:
                path.unlink(missing_ok=True)

    def submit(self, batch_id: str) -> None:
        if batch_id not in self._tasks:
            task = asyncio.create_task(self._run(batch_id), name=f"batch {batch_id}")
            self._tasks[batch_id] = task
            task.add_done_callback(lambda _: self._tasks.pop(batch_id, None))

    def cancel(self, batch_id: str) -> None:
        self._cancels.setdefault(batch_id, asyncio.Event()).set()

    # one batch, start to end
    async def _run(self, batch_id: str) -> None:
        store = self.store
        try:
            batch = await store.call(store.get_batch, batch_id)
            if batch["status"] == "validating":
                batch = await self._validate(batch)
            if batch["status"] == "in_progress":
                outcome = await self._execute(batch)
                if outcome is None:
                    return  # server shutting down: resume on the next start
                batch = (await store.call(store.transition, batch_id, ("in_progress",),
                                          "finalizing", outcome=outcome)
                         or await store.call(store.get_batch, batch_id))
            if batch["status"] == "cancelling":
                await self._finalize(batch, "cancelled")
            elif batch["status"] == "finalizing":
                await self._finalize(batch, batch["outcome"] or "completed")
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.exception("batch %s failed", batch_id)
            errors = {"object": "list", "data": [
                {"code": "server_error", "message": f"{type(e).__name__}: {e}",
                 "param": None, "line": None}]}
            try:
                await store.call(store.transition, batch_id, ACTIVE, "failed",
                                 errors=json.dumps(errors))
                await asyncio.to_thread(self.input_path(batch_id).unlink, missing_ok=True)
            except Exception:
                logger.exception("batch %s: could not record the failure", batch_id)
        finally:
            self._cancels.pop(batch_id, None)

    async def _validate(self, batch: dict[str, Any]) -> dict[str, Any]:
        store, batch_id = self.store, batch["id"]
        count, model, problems = await asyncio.to_thread(
            file_storage.check_batch_file, self.input_path(batch_id), batch["endpoint"],
            _MAX_VALIDATION_ERRORS)
        if problems or count == 0:
            data = [{"code": "invalid_request", "message": e.message, "param": e.param,
                     "line": e.line} for e in problems]
            if not data:
                data = [{"code": "empty_file", "message": "the input file has no requests",
                         "param": None, "line": None}]
            row = await store.call(store.transition, batch_id, ("validating",), "failed",
                                   errors=json.dumps({"object": "list", "data": data}))
            await asyncio.to_thread(self.input_path(batch_id).unlink, missing_ok=True)
        else:
            row = await store.call(store.transition, batch_id, ("validating",),
                                   "in_progress", total=count, model=model)
        return row or await store.call(store.get_batch, batch_id)  # else cancelled meanwhile

    async def _execute(self, batch: dict[str, Any]) -> str | None:
        """Run the requests not done yet. 'completed' when all are, 'expired' past the
        window, 'cancelling' on cancel, None on shutdown; in-flight requests are aborted in
        the last three cases (cancelling their tasks aborts their engine requests)."""
        store, batch_id = self.store, batch["id"]
        done = await store.call(store.done_custom_ids, batch_id)
        writer = _Writer(store, batch_id)
        cancel = self._cancels.setdefault(batch_id, asyncio.Event())
        stop = asyncio.ensure_future(_first_set(cancel, self._shutdown))
        deadline = batch["expires_at"]
        running: set[asyncio.Task] = set()
        blocks = _read_blocks(self.input_path(batch_id))
        outcome = "completed"
        try:
            while outcome == "completed":
                block = await asyncio.to_thread(next, blocks, None)
                if block is None:
                    break
                for line, custom_id, body in block:
                    if custom_id in done:
                        continue
                    acquired = await self._acquire(stop, deadline)
                    if not acquired:
                        outcome = "expired" if not stop.done() else "stopped"
                        break
                    task = asyncio.create_task(
                        self._one(batch["endpoint"], line, custom_id, body, writer))
                    task.add_done_callback(lambda _: self._window.release())
                    running.add(task)
                    task.add_done_callback(running.discard)
            while running and outcome == "completed":
                await asyncio.wait({*running, stop}, timeout=max(0.0, deadline - time.time()),
                                   return_when=asyncio.FIRST_COMPLETED)
                if stop.done():
                    outcome = "stopped"
                elif time.time() >= deadline:
                    outcome = "expired"
        finally:
            stop.cancel()
            with suppress(ValueError):  # still running in its thread (a hard cancel)
                blocks.close()
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)
            await writer.close()
        if outcome == "stopped":
            return "cancelling" if cancel.is_set() else None
        return outcome

    async def _acquire(self, stop: asyncio.Future, deadline: float) -> bool:
        """A slot in the shared window, or False once `stop` fires or the deadline passes."""
        if stop.done() or time.time() >= deadline:
            return False
        acquire = asyncio.ensure_future(self._window.acquire())
        await asyncio.wait({acquire, stop}, timeout=max(0.0, deadline - time.time()),
                           return_when=asyncio.FIRST_COMPLETED)
        if not acquire.done():
            acquire.cancel()
            await asyncio.gather(acquire, return_exceptions=True)
        got = acquire.done() and not acquire.cancelled() and acquire.exception() is None
        if got and (stop.done() or time.time() >= deadline):
            self._window.release()
            return False
        return got

    async def _one(self, url: str, line: int, custom_id: str, body: dict[str, Any],
                   writer: _Writer) -> None:
        try:
            status, response = await dispatch(self.state, url, body)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug in a handler: this request fails, the batch goes on
            logger.exception("batch request %s failed", custom_id)
            status, response = 500, error_body(500, f"internal error: {type(e).__name__}: {e}")
        writer.add(_result(line, custom_id, status, response))

    async def _finalize(self, batch: dict[str, Any], status: str) -> None:
        store = self.store
        batch = await store.call(store.fix_output_ids, batch["id"])
        unexecuted = None
        if status == "expired":
            done = await store.call(store.done_custom_ids, batch["id"])
            unexecuted = await asyncio.to_thread(self._unexecuted, batch["id"], done)
        sizes = await store.call(store.write_outputs, batch, self.data_dir, unexecuted)
        outputs = {}
        for file_id, size in zip((batch["pending_output_id"], batch["pending_error_id"]), sizes,
                                 strict=True):
            tmp = file_storage.files_dir(self.data_dir) / f".{file_id}.part"
            if size:
                await asyncio.to_thread(file_storage.publish, tmp,
                                        file_storage.file_path(self.data_dir, file_id))
                outputs[file_id] = size
            else:
                tmp.unlink(missing_ok=True)
        await store.call(store.finish, batch, status, outputs)
        await asyncio.to_thread(self.input_path(batch["id"]).unlink, missing_ok=True)
        logger.info("batch %s %s", batch["id"], status)

    def _unexecuted(self, batch_id: str, done: set[str]) -> list[str]:
        return [_expired_record(obj["custom_id"])
                for _, obj in file_storage.iter_requests(self.input_path(batch_id))
                if obj["custom_id"] not in done]


async def _first_set(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


def _read_blocks(path: Path) -> Iterator[list[tuple[int, str, dict[str, Any]]]]:
    block = []
    for line, obj in file_storage.iter_requests(path):
        block.append((line, obj["custom_id"], obj["body"]))
        if len(block) >= _READ_BLOCK:
            yield block
            block = []
    if block:
        yield block


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the store and start the runner with the server (resuming unfinished batches);
    stop and close them at shutdown."""
    state: ServerState = app.state.sglbatch
    state.store = Store(Path(state.args.data_dir))
    state.batches = BatchRunner(state, state.store)
    await state.batches.start()
    try:
        yield
    finally:
        await state.batches.stop()
        state.store.close()
        state.batches = state.store = None  # a later start opens them again


# ---- routes ------------------------------------------------------------------------------

class BatchCreateRequest(BaseModel):
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    output_expires_after: dict[str, Any] | None = None  # accepted; outputs are kept


def _link_input(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError:  # no hard links here: a copy
        tmp = dest.with_suffix(".part")
        shutil.copyfile(source, tmp)
        file_storage.publish(tmp, dest)
        return
    file_storage.fsync_dir(dest.parent)


def build_router(state: ServerState) -> APIRouter:
    router = APIRouter(prefix="/v1")

    async def lookup(batch_id: str) -> dict[str, Any]:
        row = (await state.call_store(Store.get_batch, batch_id)
               if BATCH_ID.fullmatch(batch_id) else None)
        if row is None:
            raise APIError(404, f"No such Batch object: {batch_id}", "id")
        return row

    @router.post("/batches")
    async def create(req: BatchCreateRequest) -> dict[str, Any]:
        runner = state.require_batches()
        if req.endpoint not in BATCH_ENDPOINTS:
            raise APIError(400, f"endpoint: {req.endpoint!r} is not supported; use one of "
                                f"{list(BATCH_ENDPOINTS)}", "endpoint")
        if (req.endpoint == "/v1/embeddings") != (state.engine is None):
            raise APIError(400, f"endpoint: this server runs "
                                f"{'an embedding' if state.engine is None else 'a generation'}"
                                f" model and cannot serve {req.endpoint}", "endpoint")
        if req.completion_window not in COMPLETION_WINDOWS:
            raise APIError(400, f"completion_window: {req.completion_window!r} is not "
                                f"supported; use one of {list(COMPLETION_WINDOWS)}",
                           "completion_window")
        meta = req.metadata
        if meta is not None and (len(meta) > 16 or any(len(k) > 64 or len(v) > 512
                                                       for k, v in meta.items())):
            raise APIError(400, "metadata: at most 16 pairs, keys up to 64 and values up to "
                                "512 characters", "metadata")
        file_id = req.input_file_id
        row = (await state.call_store(Store.get_file, file_id)
               if file_storage.FILE_ID.fullmatch(file_id) else None)
        if row is None:
            raise APIError(404, f"No such File object: {file_id}", "input_file_id")
        if row["purpose"] != "batch":
            raise APIError(400, f"input_file_id: {file_id} has purpose {row['purpose']!r}, "
                                "not \"batch\"", "input_file_id")
        batch_id = f"batch_{uuid.uuid4().hex}"
        try:
            await asyncio.to_thread(_link_input, file_storage.file_path(runner.data_dir, file_id),
                                    runner.input_path(batch_id))
        except FileNotFoundError:  # deleted a moment ago
            raise APIError(404, f"No such File object: {file_id}", "input_file_id") from None
        now = int(time.time())
        await state.call_store(Store.insert_batch, {
            "id": batch_id, "endpoint": req.endpoint, "input_file_id": file_id,
            "completion_window": req.completion_window, "status": "validating",
            "created_at": now, "expires_at": now + COMPLETION_WINDOWS[req.completion_window],
            "metadata": json.dumps(meta) if meta is not None else None})
        runner.submit(batch_id)
        return batch_object(await state.call_store(Store.get_batch, batch_id))

    @router.get("/batches")
    async def list_batches(limit: int = 20, after: str | None = None) -> dict[str, Any]:
        if not 1 <= limit <= 100:
            raise APIError(400, "limit: must be between 1 and 100", "limit")
        rows, has_more = await state.call_store(Store.list_batches, limit, after)
        data = [batch_object(r) for r in rows]
        return {"object": "list", "data": data, "has_more": has_more,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}

    @router.get("/batches/{batch_id}")
    async def retrieve(batch_id: str) -> dict[str, Any]:
        return batch_object(await lookup(batch_id))

    @router.post("/batches/{batch_id}/cancel")
    async def cancel(batch_id: str) -> dict[str, Any]:
        row = await lookup(batch_id)
        if row["status"] in ("cancelling", "cancelled"):
            return batch_object(row)
        moved = await state.call_store(Store.transition, row["id"], ("validating", "in_progress"),
                                 "cancelling")
        if moved is None:
            row = await lookup(batch_id)
            if row["status"] in ("cancelling", "cancelled"):
                return batch_object(row)
            raise APIError(409, f"Cannot cancel a batch with status {row['status']!r}.",
                           None, "batch_not_cancellable")
        runner = state.require_batches()
        runner.cancel(row["id"])
        runner.submit(row["id"])  # a no-op while its task runs; else that finishes the cancel
        return batch_object(moved)

    return router
