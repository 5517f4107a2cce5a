"""OpenAI's Files API (/v1/files) for batch input and output files.

Contents live under `<data_dir>/files/<id>` (see file_storage); their metadata is in the
server's SQLite store (`sglbatch.server.store`). Ids are checked against a strict pattern
before any path is built from them, so no id reaches outside that folder. Uploads are parsed from the request stream
and written to disk as they arrive (never held in memory), cut off at --max-upload-mb (413),
fsynced, and a batch file's JSONL is validated before the file becomes visible.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from sglbatch.server.errors import APIError
from sglbatch.server.file_storage import (
    FILE_ID,
    check_batch_file,
    file_object,
    file_path,
    files_dir,
    new_file_id,
    publish,
)
from sglbatch.server.state import ServerState
from sglbatch.server.store import Store

UPLOAD_PURPOSES = ("batch",)  # what clients may upload; outputs get "batch_output"
_CHUNK = 1 << 16
_MAX_FIELD_BYTES = 1024  # `purpose` and any other plain form field
_MAX_FIELDS = 16
_DRAIN_BEYOND_LIMIT = 64 << 20  # read (and drop) this much past the limit, then hang up


# ---- streaming multipart upload ----------------------------------------------------------

class _Upload:
    """Feeds a multipart/form-data body to python-multipart and writes the `file` part
    straight to a temp file, counting bytes against the limit."""

    def __init__(self, tmp: Path, limit: int):
        self.tmp, self.limit = tmp, limit
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.size = 0
        self.too_large = False
        self.error: str | None = None
        self._out: Any = None
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name: str | None = None
        self._is_file = False
        self._data = bytearray()

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self._part_begin, "on_part_data": self._part_data,
                "on_part_end": self._part_end, "on_header_field": self._header_field,
                "on_header_value": self._header_value_cb, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished}

    def _fail(self, message: str) -> None:
        if self.error is None:
            self.error = message

    def _part_begin(self) -> None:
        self._disposition, self._name, self._is_file = b"", None, False
        self._data = bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_cb(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name")
        self._name = name.decode("utf-8", "replace") if name is not None else None
        if self._name == "file":
            self._is_file = True
            if self.filename is not None:
                self._fail("file: send exactly one file")
                return
            raw = options.get(b"filename", b"")
            self.filename = Path(raw.decode("utf-8", "replace")).name[:255] or "upload.jsonl"
            self._out = self.tmp.open("wb")
        elif len(self.fields) >= _MAX_FIELDS:
            self._fail("too many form fields")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._is_file:
            if len(self._data) + end - start > _MAX_FIELD_BYTES:
                self._fail(f"{self._name}: form field too long")
            else:
                self._data += data[start:end]
            return
        self.size += end - start
        if self.size > self.limit:
            self.too_large = True
            self.close()
        elif self._out is not None and self.error is None:
            self._out.write(data[start:end])

    def _part_end(self) -> None:
        if self._is_file:
            if self._out is not None:
                self._out.close()
                self._out = None
        elif self._name is not None:
            self.fields[self._name] = self._data.decode("utf-8", "replace")

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


async def receive_upload(request: Request, tmp: Path, limit: int) -> _Upload:
    content_type = request.headers.get("content-type", "")
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data" or b"boundary" not in params:
        raise APIError(400, "upload files as multipart/form-data with the fields `file` and "
                            "`purpose`", "file")
    upload = _Upload(tmp, limit)
    parser = MultipartParser(params[b"boundary"], upload.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if upload.too_large:
                if received > limit + _DRAIN_BEYOND_LIMIT:
                    break  # stop reading; the client may see the connection close
                continue  # drain the rest so the client reads the 413 cleanly
            parser.write(chunk)
        if not upload.too_large:
            parser.finalize()
    except FormParserError as e:
        upload.close()
        raise APIError(400, f"malformed multipart body: {e}", "file") from None
    finally:
        upload.close()
    return upload


# ---- routes ------------------------------------------------------------------------------

def _not_found(file_id: str) -> APIError:
    return APIError(404, f"No such File object: {file_id}", "id")


def build_router(state: ServerState) -> APIRouter:
    data_dir = Path(state.args.data_dir)
    limit = int(state.args.max_upload_mb * 1024 * 1024)
    router = APIRouter(prefix="/v1")

    async def lookup(file_id: str) -> dict[str, Any]:
        if not FILE_ID.fullmatch(file_id):
            raise _not_found(file_id)
        row = await state.call_store(Store.get_file, file_id)
        if row is None:
            raise _not_found(file_id)
        return row

    @router.post("/files")
    async def upload(request: Request) -> dict[str, Any]:
        file_id = new_file_id()
        tmp = files_dir(data_dir) / f".{file_id}.part"
        try:
            up = await receive_upload(request, tmp, limit)
            if up.too_large:
                raise APIError(413, f"file: larger than this server's upload limit of "
                                    f"{state.args.max_upload_mb:g} MB (--max-upload-mb)",
                               "file", "file_too_large")
            if up.error:
                raise APIError(400, up.error, "file")
            purpose = up.fields.get("purpose")
            if purpose is None:
                raise APIError(400, "purpose: required (use \"batch\")", "purpose")
            if purpose not in UPLOAD_PURPOSES:
                raise APIError(400, f"purpose: {purpose!r} is not supported; this server "
                                    "accepts files with purpose \"batch\"", "purpose")
            if up.filename is None:
                raise APIError(400, "file: required (a multipart file field named `file`)",
                               "file")
            try:
                count, _, errors = await asyncio.to_thread(check_batch_file, tmp)
            except FileNotFoundError:  # the `file` part never arrived
                raise APIError(400, "file: missing file content", "file") from None
            if errors:
                raise APIError(400, f"file: invalid batch file: {errors[0]}", "file",
                               "invalid_batch_file")
            if count == 0:
                raise APIError(400, "file: the batch file has no requests", "file",
                               "invalid_batch_file")
            await asyncio.to_thread(publish, tmp, file_path(data_dir, file_id))
        finally:
            tmp.unlink(missing_ok=True)
        row = {"id": file_id, "bytes": up.size, "created_at": int(time.time()),
               "filename": up.filename, "purpose": purpose}
        await state.call_store(Store.insert_file, row)
        return file_object(row)

    @router.get("/files")
    async def list_files(purpose: str | None = None, limit: int = 10000,
                         order: str = "desc", after: str | None = None) -> dict[str, Any]:
        if not 1 <= limit <= 10000:
            raise APIError(400, "limit: must be between 1 and 10000", "limit")
        if order not in ("asc", "desc"):
            raise APIError(400, "order: must be \"asc\" or \"desc\"", "order")
        rows, has_more = await state.call_store(Store.list_files, purpose, limit, order, after)
        data = [file_object(r) for r in rows]
        return {"object": "list", "data": data, "has_more": has_more,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}

    @router.get("/files/{file_id}")
    async def retrieve(file_id: str) -> dict[str, Any]:
        return file_object(await lookup(file_id))

    @router.get("/files/{file_id}/content")
    async def content(file_id: str) -> StreamingResponse:
        row = await lookup(file_id)
        try:  # open now: a delete racing the download cannot pull the file away
            f = file_path(data_dir, row["id"]).open("rb")
        except FileNotFoundError:
            raise _not_found(file_id) from None

        def chunks() -> Iterator[bytes]:  # a sync iterator: Starlette reads it in a thread
            with f:
                while data := f.read(_CHUNK):
                    yield data

        return StreamingResponse(chunks(), media_type="application/octet-stream",
                                 headers={"Content-Length": str(row["bytes"]),
                                          "Content-Disposition":
                                              f'attachment; filename="{row["id"]}.jsonl"'})

    @router.delete("/files/{file_id}")
    async def delete(file_id: str) -> dict[str, Any]:
        row = await lookup(file_id)
        await state.call_store(Store.delete_file, row["id"])  # the row first: never a dangling row
        file_path(data_dir, row["id"]).unlink(missing_ok=True)
        return {"id": row["id"], "object": "file", "deleted": True}

    return router
