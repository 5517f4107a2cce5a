"""The server's SQLite store: file and batch metadata, and each batch's committed results.
Opened at startup (ServerState.store); every statement runs on one dedicated thread."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from sglbatch.server import file_storage

T = TypeVar("T")
# Batch statuses from which a batch still runs (and resumes after a restart).
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    status TEXT NOT NULL,
    outcome TEXT,                -- completed | expired, fixed when finalizing starts
    model TEXT,
    output_file_id TEXT,
    error_file_id TEXT,
    pending_output_id TEXT,      -- the ids the output/error files will get
    pending_error_id TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER,
    expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER,
    total INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    metadata TEXT,
    errors TEXT
);
CREATE INDEX IF NOT EXISTS batches_status ON batches(status);
CREATE TABLE IF NOT EXISTS batch_results (
    batch_id TEXT NOT NULL,
    custom_id TEXT NOT NULL,
    line INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (batch_id, custom_id)
) WITHOUT ROWID;
"""


# ---- the store ---------------------------------------------------------------------------

class Store:
    """SQLite in WAL mode. Every statement runs on one dedicated thread (`call`), so the event
    loop never waits on disk and transactions never interleave."""

    def __init__(self, data_dir: Path):
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "state.sqlite3"
        self.conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA busy_timeout=5000")
        self.conn.executescript(_SCHEMA)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sglbatch-db")

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._executor.submit(self.conn.close).result()
        self._executor.shutdown(wait=True)

    def _tx(self) -> Any:
        return _Transaction(self.conn)

    def _one(self, sql: str, *args: Any) -> dict[str, Any] | None:
        row = self.conn.execute(sql, args).fetchone()
        return dict(row) if row is not None else None

    # files
    def insert_file(self, row: dict[str, Any]) -> None:
        with self._tx():
            self.conn.execute("INSERT INTO files (id, bytes, created_at, filename, purpose) "
                              "VALUES (:id, :bytes, :created_at, :filename, :purpose)", row)

    def get_file(self, file_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM files WHERE id = ?", file_id)

    def list_files(self, purpose: str | None, limit: int, order: str,
                   after: str | None) -> tuple[list[dict[str, Any]], bool]:
        where, args = [], []
        if purpose is not None:
            where.append("purpose = ?")
            args.append(purpose)
        if after is not None:
            cursor = self._one("SELECT seq FROM files WHERE id = ?", after)
            if cursor is not None:
                where.append("seq < ?" if order == "desc" else "seq > ?")
                args.append(cursor["seq"])
        sql = ("SELECT * FROM files" + (" WHERE " + " AND ".join(where) if where else "")
               + f" ORDER BY seq {'DESC' if order == 'desc' else 'ASC'} LIMIT ?")
        rows = [dict(r) for r in self.conn.execute(sql, (*args, limit + 1))]
        return rows[:limit], len(rows) > limit

    def delete_file(self, file_id: str) -> None:
        with self._tx():
            self.conn.execute("DELETE FROM files WHERE id = ?", (file_id,))

    def file_ids(self) -> set[str]:
        ids = {r[0] for r in self.conn.execute("SELECT id FROM files")}
        for r in self.conn.execute("SELECT pending_output_id, pending_error_id FROM batches "
                                   "WHERE status IN ('finalizing', 'cancelling')"):
            ids.update(x for x in r if x)
        return ids

    # batches
    def insert_batch(self, row: dict[str, Any]) -> None:
        cols = ", ".join(row)
        with self._tx():
            self.conn.execute(f"INSERT INTO batches ({cols}) VALUES "
                              f"({', '.join(':' + c for c in row)})", row)

    def get_batch(self, batch_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM batches WHERE id = ?", batch_id)

    def list_batches(self, limit: int, after: str | None) -> tuple[list[dict[str, Any]], bool]:
        cursor = self._one("SELECT seq FROM batches WHERE id = ?", after) if after else None
        if cursor is not None:
            rows = self.conn.execute("SELECT * FROM batches WHERE seq < ? ORDER BY seq DESC "
                                     "LIMIT ?", (cursor["seq"], limit + 1))
        else:
            rows = self.conn.execute("SELECT * FROM batches ORDER BY seq DESC LIMIT ?",
                                     (limit + 1,))
        out = [dict(r) for r in rows]
        return out[:limit], len(out) > limit

    def active_batches(self) -> list[dict[str, Any]]:
        marks = ", ".join("?" * len(ACTIVE))
        return [dict(r) for r in self.conn.execute(
            f"SELECT * FROM batches WHERE status IN ({marks}) ORDER BY seq", ACTIVE)]

    def batch_ids(self) -> dict[str, str]:
        return {r[0]: r[1] for r in self.conn.execute("SELECT id, status FROM batches")}

    def transition(self, batch_id: str, old: tuple[str, ...], new: str,
                   **fields: Any) -> dict[str, Any] | None:
        """Compare-and-set: move to `new` only from one of `old`; the updated row or None."""
        fields[f"{new}_at"] = int(time.time())
        sets = ", ".join(f"{k} = :{k}" for k in fields)
        marks = ", ".join(f":old{i}" for i in range(len(old)))
        args = {**fields, "id": batch_id, "new": new, **{f"old{i}": s for i, s in enumerate(old)}}
        with self._tx():
            changed = self.conn.execute(
                f"UPDATE batches SET status = :new, {sets} WHERE id = :id AND status IN "
                f"({marks})", args).rowcount
        return self.get_batch(batch_id) if changed else None

    def done_custom_ids(self, batch_id: str) -> set[str]:
        return {r[0] for r in self.conn.execute(
            "SELECT custom_id FROM batch_results WHERE batch_id = ?", (batch_id,))}

    def record_results(self, batch_id: str, results: list[dict[str, Any]]) -> None:
        """Results and the counters they move, in one durable transaction."""
        ok = failed = tokens_in = cached = tokens_out = 0
        with self._tx():
            for r in results:
                inserted = self.conn.execute(
                    "INSERT OR IGNORE INTO batch_results (batch_id, custom_id, line, ok, record) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (batch_id, r["custom_id"], r["line"], r["ok"], r["record"])).rowcount
                if not inserted:
                    continue
                ok += r["ok"]
                failed += not r["ok"]
                tokens_in += r["usage"][0]
                cached += r["usage"][1]
                tokens_out += r["usage"][2]
            self.conn.execute(
                "UPDATE batches SET completed = completed + ?, failed = failed + ?, "
                "input_tokens = input_tokens + ?, cached_tokens = cached_tokens + ?, "
                "output_tokens = output_tokens + ? WHERE id = ?",
                (ok, failed, tokens_in, cached, tokens_out, batch_id))

    def fix_output_ids(self, batch_id: str) -> dict[str, Any]:
        with self._tx():
            self.conn.execute(
                "UPDATE batches SET pending_output_id = coalesce(pending_output_id, ?), "
                "pending_error_id = coalesce(pending_error_id, ?) WHERE id = ?",
                (file_storage.new_file_id(), file_storage.new_file_id(), batch_id))
        return self.get_batch(batch_id)

    def write_outputs(self, batch: dict[str, Any], data_dir: Path,
                      unexecuted: list[str] | None) -> tuple[int, int]:
        """Write the output and error files (temp names) from the batch's results in input
        order; `unexecuted` lines (expired batches) go to the error file. Their sizes."""
        out_tmp, err_tmp = (file_storage.files_dir(data_dir) / f".{batch[k]}.part"
                            for k in ("pending_output_id", "pending_error_id"))
        with out_tmp.open("wb") as out, err_tmp.open("wb") as err:
            for ok, record in self.conn.execute(
                    "SELECT ok, record FROM batch_results WHERE batch_id = ? ORDER BY line",
                    (batch["id"],)):
                (out if ok else err).write(record.encode("utf-8") + b"\n")
            for record in unexecuted or ():
                err.write(record.encode("utf-8") + b"\n")
            return out.tell(), err.tell()

    def finish(self, batch: dict[str, Any], status: str, outputs: dict[str, int]) -> None:
        """Register the output files, set the final status, drop the per-request rows."""
        now = int(time.time())
        with self._tx():
            ids = {}
            for key, purpose_id, kind in (("output_file_id", "pending_output_id", "output"),
                                          ("error_file_id", "pending_error_id", "error")):
                file_id = batch[purpose_id]
                ids[key] = file_id if file_id in outputs else None
                if ids[key]:
                    self.conn.execute(
                        "INSERT OR IGNORE INTO files (id, bytes, created_at, filename, purpose)"
                        " VALUES (?, ?, ?, ?, 'batch_output')",
                        (file_id, outputs[file_id], now, f"{batch['id']}_{kind}.jsonl"))
            self.conn.execute(
                f"UPDATE batches SET status = ?, {status}_at = ?, output_file_id = ?, "
                "error_file_id = ? WHERE id = ?",
                (status, now, ids["output_file_id"], ids["error_file_id"], batch["id"]))
            self.conn.execute("DELETE FROM batch_results WHERE batch_id = ?", (batch["id"],))


class _Transaction:
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")


# ---- objects -----------------------------------------------------------------------------
