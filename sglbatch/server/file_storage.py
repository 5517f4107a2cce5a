"""Batch files on disk: where stored files live under --data-dir, how a file is made durable,
and the batch input format (JSONL request lines), validated line by line."""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FILE_ID = re.compile(r"file-[0-9a-f]{32}")
# What a batch line may target (the OpenAI routes that openai_api dispatches in-process).
BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def files_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / "files"


def file_path(data_dir: str | Path, file_id: str) -> Path:
    """The path of a stored file; only well-formed ids ever become paths."""
    if not FILE_ID.fullmatch(file_id):
        raise ValueError(f"not a file id: {file_id!r}")
    return files_dir(data_dir) / file_id


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"],
            "created_at": row["created_at"], "filename": row["filename"],
            "purpose": row["purpose"], "status": "processed", "expires_at": None,
            "status_details": None}


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Make a fully written temp file durable under its final name."""
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


# ---- batch input files (JSONL) -----------------------------------------------------------

class BatchLineError(ValueError):
    def __init__(self, line: int, message: str, param: str | None = None):
        super().__init__(f"line {line}: {message}")
        self.line, self.message, self.param = line, message, param


def parse_request_line(raw: bytes, line: int) -> dict[str, Any] | None:
    """One JSONL line of a batch file as its request object (None for a blank line)."""
    if line == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if not raw.strip():
        return None
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError:
        raise BatchLineError(line, "not valid UTF-8") from None
    except ValueError as e:
        raise BatchLineError(line, f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise BatchLineError(line, "each line must be a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise BatchLineError(line, "`custom_id` must be a non-empty string", "custom_id")
    if obj.get("method") != "POST":
        raise BatchLineError(line, f"`method` must be \"POST\", got {obj.get('method')!r}",
                             "method")
    if obj.get("url") not in BATCH_ENDPOINTS:
        raise BatchLineError(line, f"`url` must be one of {list(BATCH_ENDPOINTS)}, got "
                                   f"{obj.get('url')!r}", "url")
    if not isinstance(obj.get("body"), dict):
        raise BatchLineError(line, "`body` must be a JSON object", "body")
    return obj


def iter_requests(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, request object) for each non-blank line; raises BatchLineError."""
    with path.open("rb") as f:
        for line, raw in enumerate(f, 1):
            obj = parse_request_line(raw, line)
            if obj is not None:
                yield line, obj


def check_batch_file(path: Path, endpoint: str | None = None,
                     max_errors: int = 1) -> tuple[int, str | None, list[BatchLineError]]:
    """Validate a whole batch file: (request count, first body's model, errors). With
    `endpoint`, every line's url must be it. Stops after `max_errors` errors."""
    errors: list[BatchLineError] = []
    seen: dict[str, int] = {}
    count, model = 0, None
    with path.open("rb") as f:
        for line, raw in enumerate(f, 1):
            try:
                obj = parse_request_line(raw, line)
                if obj is None:
                    continue
                custom_id = obj["custom_id"]
                if custom_id in seen:
                    raise BatchLineError(line, f"custom_id {custom_id!r} is a duplicate (first "
                                               f"on line {seen[custom_id]}); custom_ids must "
                                               "be unique", "custom_id")
                if endpoint is not None and obj["url"] != endpoint:
                    raise BatchLineError(line, f"`url` {obj['url']!r} does not match the "
                                               f"batch's endpoint {endpoint!r}", "url")
                seen[custom_id] = line
                count += 1
                if model is None and isinstance(obj["body"].get("model"), str):
                    model = obj["body"]["model"]
            except BatchLineError as e:
                errors.append(e)
                if len(errors) >= max_errors:
                    break
    return count, model, errors
