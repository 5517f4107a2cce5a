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
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from sglbatch.jobs.spec import InputSpec, compile_filter

# What an input.filter may call. Not a sandbox (the job file is trusted, and `program` runs
# arbitrary code anyway): it keeps filters to expressions over the row.
SAFE_BUILTINS = {f.__name__: f for f in (len, int, float, str, bool, min, max, abs, round, any,
                                         all, sorted)}
_BATCH_ROWS = 1024


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
    code = compile_filter(spec.filter) if spec.filter else None
    records = chain.from_iterable(_READERS[spec.format](p) for p in spec.paths)
    kept = 0
    for index, (data, error) in enumerate(records):
        if data is not None and code is not None:
            try:
                # The row as globals: generator expressions in a filter see globals only.
                if not eval(code, {**data, "__builtins__": SAFE_BUILTINS}):
                    continue
            except Exception as e:  # noqa: BLE001 - a failing filter fails its row only
                error = f"input.filter raised {type(e).__name__}: {e}"
        kept += 1
        if shard is None or index % shard[1] == shard[0]:
            yield _row(index, data, error, spec.id_column)
        if kept == spec.limit:
            return


def count_rows(spec: InputSpec) -> int | None:
    """The number of rows iter_rows yields unsharded, for a progress bar; None with a filter
    (it would mean evaluating it over the whole input)."""
    if spec.filter:
        return None
    total = sum(_COUNTERS[spec.format](p) for p in spec.paths)
    return total if spec.limit is None else min(total, spec.limit)


def _row(index: int, data: dict | None, error: str | None, id_column: str | None) -> Row:
    if id_column is None or data is None:
        return Row(index, index, data, error)
    row_id = data.get(id_column)
    # Ids go into the output and come back as resume keys: they must survive JSON unchanged.
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        error = error or (f"id_column {id_column!r} must hold a string or an integer, "
                          f"got {row_id!r}")
        row_id = index
    return Row(index, row_id, data, error)


def _jsonl_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of each non-blank line; blank lines are not rows."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            if line and not line.isspace():
                yield lineno, line


def _read_jsonl(path: Path) -> Iterator[tuple[dict | None, str | None]]:
    for lineno, line in _jsonl_lines(path):
        where = f"{path.name}:{lineno}"
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


def _read_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[tuple[dict, None]]:
    for batch in batches:
        for data in batch.to_pylist():
            yield data, None


def _parquet_batches(path: Path) -> Iterator[pa.RecordBatch]:
    with pq.ParquetFile(path) as f:
        yield from f.iter_batches(batch_size=_BATCH_ROWS)


def _csv_batches(path: Path) -> Iterator[pa.RecordBatch]:
    with pacsv.open_csv(path) as reader:
        names = reader.schema.names
    # Every column as a string, as Python's csv module reads it: types inferred from the
    # first block would fail mid-file on a later row that disagrees.
    options = pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()))
    with pacsv.open_csv(path, convert_options=options) as reader:
        yield from reader


def _count_parquet(path: Path) -> int:
    with pq.ParquetFile(path) as f:
        return f.metadata.num_rows


_READERS = {
    "jsonl": _read_jsonl,
    "parquet": lambda path: _read_batches(_parquet_batches(path)),
    "csv": lambda path: _read_batches(_csv_batches(path)),
}
_COUNTERS = {
    "jsonl": lambda path: sum(1 for _ in _jsonl_lines(path)),
    "parquet": _count_parquet,
    "csv": lambda path: sum(batch.num_rows for batch in _csv_batches(path)),
}
