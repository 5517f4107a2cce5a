"""Streaming input for `sglbatch run`: JSONL, Parquet and CSV rows, filtered, limited, sharded.

Files are read lazily in batches, never whole. A row that cannot be read (a line that is not
UTF-8 or not a JSON object) or whose filter raises becomes an error row and the run goes on.
Ids (`input.id_column`) must be unique: a resumed run skips every row whose id is already in
the output.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from types import CodeType
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from sglbatch.jobs.spec import InputSpec, compile_filter

# What an input.filter may call. Not a sandbox (the job file is trusted, and `program` runs
# arbitrary code anyway): it keeps filters to expressions over the row.
SAFE_BUILTINS = {f.__name__: f for f in (len, int, float, str, bool, min, max, abs, round, any,
                                         all, sorted)}
_BATCH_ROWS = 1024
_READ_BYTES = 1 << 20


@dataclass(frozen=True)
class Row:
    """One input row.

    `index` is its 0-based position in the whole input (all files, before filter and limit),
    the same in every run, so shards and resumed runs agree on it. `id` is the id_column's
    value, else `index`; an unreadable row, whose id is unknown, also gets its index. `error`
    says why the row cannot run; `data` is None when the row could not even be parsed.
    """

    index: int
    id: Any
    data: dict[str, Any] | None
    error: str | None = None


def validate_shard(shard: tuple[int, int] | None) -> None:
    if shard is not None and not 0 <= shard[0] < shard[1]:
        raise ValueError(f"shard {shard[0]} of {shard[1]}: the index must be in [0, count)")


def iter_rows(spec: InputSpec, shard: tuple[int, int] | None = None) -> Iterator[Row]:
    """Rows in input order: filtered, then the first `limit`, then (for shard=(i, n)) those
    with index % n == i. Every shard reads the whole input, so the n shards partition exactly
    the rows one unsharded run would see."""
    validate_shard(shard)
    if spec.uri is not None:
        raise ValueError(f"input.path {spec.uri!r} is a URI, which executor: ray reads")
    code = compile_filter(spec.filter) if spec.filter else None
    records = chain.from_iterable(_read_path(spec.format, p) for p in spec.paths)
    kept = 0
    for index, (data, error) in enumerate(records):
        keep, error = apply_filter(code, data, error)
        if not keep:
            continue
        kept += 1
        if shard is None or index % shard[1] == shard[0]:
            yield make_row(index, data, error, spec.id_column)
        if kept == spec.limit:
            return


def apply_filter(code: CodeType | None, data: dict | None,
                 error: str | None) -> tuple[bool, str | None]:
    """(whether input.filter keeps the row, its error): a filter that raises fails its row
    only, which is kept so that it gets an error record."""
    if data is None or code is None:
        return True, error
    try:
        # The row as globals: generator expressions in a filter see globals only.
        return bool(eval(code, {**data, "__builtins__": SAFE_BUILTINS})), error
    except Exception as e:  # noqa: BLE001
        return True, f"input.filter raised {type(e).__name__}: {e}"


def count_rows(spec: InputSpec) -> int | None:
    """The number of rows iter_rows yields unsharded, for a progress bar; None with a filter
    (it would mean evaluating it over the whole input) or a URI input."""
    if spec.filter or spec.uri is not None:
        return None
    total = 0
    for path in spec.paths:
        with open(path, "rb") as f:
            total += count_file(spec.format, f)
    return total if spec.limit is None else min(total, spec.limit)


def make_row(index: int, data: dict | None, error: str | None, id_column: str | None) -> Row:
    if id_column is None or data is None:
        return Row(index, index, data, error)
    row_id = data.get(id_column)
    # Ids go into the output and come back as resume keys: they must survive JSON unchanged.
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        error = error or (f"id_column {id_column!r} must hold a string or an integer, "
                          f"got {row_id!r}")
        row_id = index
    return Row(index, row_id, data, error)


def parse_file(fmt: str, f: BinaryIO, name: str) -> Iterator[tuple[dict | None, str | None]]:
    """(row, None) or (None, why it cannot be read) for each record of one open file (a local
    file, or a pyarrow file on any filesystem: Ray reads S3 or GCS this way). `name` goes into
    error messages. Parquet and CSV need a seekable file."""
    if fmt == "jsonl":
        return _parse_jsonl(f, name)
    batches = _parquet_batches(f) if fmt == "parquet" else _csv_batches(f)
    return ((data, None) for batch in batches for data in batch.to_pylist())


def count_file(fmt: str, f: BinaryIO) -> int:
    """The number of records parse_file yields for the file, read as cheaply as the format
    allows (Parquet: its footer)."""
    if fmt == "jsonl":
        return sum(1 for _ in _jsonl_lines(f))
    if fmt == "parquet":
        return pq.ParquetFile(f).metadata.num_rows
    return sum(batch.num_rows for batch in _csv_batches(f))


def _read_path(fmt: str, path: Path) -> Iterator[tuple[dict | None, str | None]]:
    with open(path, "rb") as f:
        yield from parse_file(fmt, f, path.name)


def _lines(f: BinaryIO) -> Iterator[bytes]:
    """Lines of a binary file, read in large blocks (pyarrow's files have no readline)."""
    rest = b""
    while block := f.read(_READ_BYTES):
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def _jsonl_lines(f: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of each non-blank line; blank lines are not rows."""
    for lineno, line in enumerate(_lines(f), 1):
        if lineno == 1:
            line = line.removeprefix(codecs.BOM_UTF8)
        if line and not line.isspace():
            yield lineno, line


def _parse_jsonl(f: BinaryIO, name: str) -> Iterator[tuple[dict | None, str | None]]:
    for lineno, line in _jsonl_lines(f):
        where = f"{name}:{lineno}"
        try:
            data = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield None, f"{where}: not valid UTF-8 at byte {e.start + 1}"
            continue
        except json.JSONDecodeError as e:
            yield None, f"{where}: invalid JSON: {e.msg} at column {e.colno}"
            continue
        if isinstance(data, dict):
            yield data, None
        else:
            yield None, f"{where}: expected a JSON object, got {type(data).__name__}"


def _parquet_batches(f: BinaryIO) -> Iterator[pa.RecordBatch]:
    with pq.ParquetFile(f) as parquet:
        yield from parquet.iter_batches(batch_size=_BATCH_ROWS)


def _csv_batches(f: BinaryIO) -> Iterator[pa.RecordBatch]:
    with pacsv.open_csv(f) as reader:
        names = reader.schema.names
    f.seek(0)
    # Every column as a string, as Python's csv module reads it: types inferred from the
    # first block would fail mid-file on a later row that disagrees.
    options = pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()))
    with pacsv.open_csv(f, convert_options=options) as reader:
        yield from reader
