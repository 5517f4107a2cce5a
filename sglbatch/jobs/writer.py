"""Exactly-once output for `sglbatch run`: results committed in whole chunks, resumable.

Next to the output file `out.jsonl` the running job keeps

    out.jsonl.parts/part-000000.jsonl, part-000001.jsonl, ...   committed chunks
    out.jsonl.parts/.lock                                       held by the writing process

Every file is written under a temporary name, fsynced and renamed into place, so a kill at
any moment leaves whole chunks only. `finalize` joins the chunks into `out.jsonl` (or
Parquet) the same way, then removes the parts directory. What the constructor finds after a
kill, and what it means:

- temporary files: never committed; deleted (their records were not done).
- the output and chunks: the kill came after the output was complete (during `finalize`'s
  cleanup, or while a finished output was being split into chunks); the chunks are deleted.
- chunks alone: an interrupted run; their ids are done.
- the output alone: a finished run; its ids are done, and the first new commit splits it
  into chunks (then deletes it) so that the next `finalize` includes it.
"""

from __future__ import annotations

import fcntl
import heapq
import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from sglbatch.jobs.reader import validate_shard
from sglbatch.jobs.spec import OUTPUT_FORMATS, OutputSpec, format_from_suffix

_MERGE_FAN_IN = 200  # files open at once in a k-way merge; more are merged in rounds
_BATCH_ROWS = 10_000  # records per Parquet row group, and per sorted run in merge_outputs
_NOT_OURS = "only files written by `sglbatch run` can be resumed or merged"
_by_index = itemgetter("index")


def shard_output_path(path: Path, shard: tuple[int, int] | None) -> Path:
    """Where shard (i, n) writes: `out.shard-i-of-n.jsonl` beside `out.jsonl`."""
    validate_shard(shard)
    if shard is None:
        return path
    return path.with_name(f"{path.stem}.shard-{shard[0]}-of-{shard[1]}{path.suffix}")


def parts_dir(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


class ResultWriter:
    """Buffers result records (dicts with at least `id` and `index`) and commits them in
    chunks of `chunk_rows`, or sooner once `flush_seconds` passed since the last commit (checked
    when a record is added). One writer per output: a second process is refused."""

    def __init__(self, output: OutputSpec, path: Path, *, chunk_rows: int = 1000,
                 flush_seconds: float = 10.0):
        self.output, self.path = output, Path(path)
        self.parts = parts_dir(self.path)
        self.chunk_rows, self.flush_seconds = chunk_rows, flush_seconds
        self._buffer: list[dict[str, Any]] = []
        self._last_commit = time.monotonic()
        self.parts.mkdir(parents=True, exist_ok=True)
        self._key = self.parts.resolve()
        if self._key in _HELD:
            # flock refuses a second lock from this process too: a writer left open by a run
            # that raised is taken over (its buffer dropped, as if the process had died).
            _HELD[self._key]._release()
        self._lock: IO[str] | None = _lock(self.parts)
        _HELD[self._key] = self
        for stray in [_tmp_name(self.path), *self.parts.glob("*.tmp")]:
            if stray.is_dir():
                shutil.rmtree(stray)
            else:
                stray.unlink(missing_ok=True)
        if output.mode == "overwrite":
            self.path.unlink(missing_ok=True)
        if output.mode == "overwrite" or self.path.exists():
            for chunk in self._chunks():
                chunk.unlink()
        chunks = self._chunks()
        self._next_seq = _seq(chunks[-1]) + 1 if chunks else 0

    def done_ids(self) -> set:
        """Ids of every committed record (of the finished output, when there is one)."""
        if self.path.exists():
            return set(_read_ids(self.path, self.output.format))
        return {record["id"] for chunk in self._chunks() for record in _read_jsonl(chunk)}

    def add(self, record: dict[str, Any]) -> None:
        self._check_open()
        if "id" not in record or "index" not in record:
            raise ValueError(f"a result record needs 'id' and 'index', got keys {sorted(record)}")
        self._buffer.append(record)
        if (len(self._buffer) >= self.chunk_rows
                or time.monotonic() - self._last_commit >= self.flush_seconds):
            self.flush()

    def flush(self) -> None:
        """Commit the buffered records as one chunk."""
        self._check_open()
        if not self._buffer:
            return
        if self.path.exists():
            for batch in _batched(_read_records(self.path, self.output.format), self.chunk_rows):
                self._commit(batch)
            # A kill before this unlink leaves the output and its copy in chunks: the
            # constructor then keeps the output and deletes the chunks.
            self.path.unlink()
        self._commit(self._buffer)
        self._buffer = []

    def finalize(self, sort_output: bool | None = None) -> None:
        """Join every chunk into the output file (sorted by `index` when sort_output, which
        defaults to the spec's), then remove the parts directory and release the output."""
        self.flush()
        chunks = self._chunks()
        if chunks or not self.path.exists():
            sort = self.output.sort_output if sort_output is None else sort_output
            scratch = self.parts / ".merge.tmp"

            def records() -> Iterable[dict[str, Any]]:
                if sort:
                    return _merge_sorted(chunks, scratch)
                return itertools.chain.from_iterable(_read_jsonl(c) for c in chunks)

            _write_output(self.path, self.output.format, records)
        shutil.rmtree(self.parts)
        self._release()

    def close(self) -> None:
        """Commit what is buffered and release the output, without joining the chunks."""
        if self._lock is not None:
            self.flush()
            self._release()

    def _commit(self, records: list[dict[str, Any]]) -> None:
        # Chunks sorted by index let finalize produce sorted output with a k-way merge.
        _write_jsonl(self.parts / f"part-{self._next_seq:06d}.jsonl", sorted(records, key=_by_index))
        self._next_seq += 1
        self._last_commit = time.monotonic()

    def _chunks(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.jsonl"), key=_seq)

    def _check_open(self) -> None:
        if self._lock is None:
            raise RuntimeError(f"{self.path}: this writer is closed (finalized, closed, or taken "
                               "over by a newer writer of the same output)")

    def _release(self) -> None:
        if _HELD.get(self._key) is self:
            del _HELD[self._key]
        if self._lock is not None:
            self._lock.close()
            self._lock = None


_HELD: dict[Path, ResultWriter] = {}  # this process's open writers, by parts directory


def _lock(parts: Path) -> IO[str]:
    f = open(parts / ".lock", "a")  # noqa: SIM115 - held open for the writer's lifetime
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise RuntimeError(f"{parts}: another process is writing this output (fix: wait for "
                           "it to finish, or give this job its own output.path or shard)") from None
    return f


@dataclass(frozen=True)
class MergeReport:
    """What merge_outputs wrote, and how many rows short of `expected_ids` it came."""

    rows: int
    expected_ids: int | None = None
    missing: int = 0  # expected_ids - rows, when the shards hold fewer rows than expected


class DuplicateIdsError(ValueError):
    """Ids found more than once by merge_outputs (one entry per extra occurrence)."""

    def __init__(self, duplicate_ids: list, message: str):
        super().__init__(message)
        self.duplicate_ids = duplicate_ids


def merge_outputs(parts: list[Path], out: Path, fmt: str, sort_output: bool = True,
                  expected_ids: int | None = None) -> MergeReport:
    """Join shard outputs (JSONL or Parquet, by extension) into `out`, sorted by index.

    Raises DuplicateIdsError (a ValueError naming them) before writing anything when an id
    appears twice, e.g. shards run with different shard counts."""
    out, parts = Path(out), [Path(p) for p in parts]
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"merge format {fmt!r} is not one of {', '.join(OUTPUT_FORMATS)}")
    formats = []
    for part in parts:
        if part.resolve() == out.resolve():
            raise ValueError(f"{part} is both an input and the output of the merge "
                             "(fix: merge into another path)")
        if parts_dir(part).exists():
            raise ValueError(f"{part}: its run is not finished ({parts_dir(part)} exists) "
                             "(fix: run it again to completion before merging)")
        formats.append(format_from_suffix(part))
        if formats[-1] not in OUTPUT_FORMATS:
            raise ValueError(f"{part}: cannot tell its format from the extension "
                             "(fix: merge .jsonl or .parquet files)")
    out.parent.mkdir(parents=True, exist_ok=True)

    def read_all() -> Iterator[tuple[Path, dict[str, Any]]]:
        for part, part_fmt in zip(parts, formats):
            for record in _read_records(part, part_fmt):
                yield part, record

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.merge-") as tmp:
        scratch = Path(tmp)
        seen: dict[Any, Path] = {}
        duplicates: list[tuple[Any, Path, Path]] = []
        runs: list[Path] = []
        for batch in _batched(read_all(), _BATCH_ROWS):
            for part, record in batch:
                if record["id"] in seen:
                    duplicates.append((record["id"], seen[record["id"]], part))
                else:
                    seen[record["id"]] = part
            if sort_output:  # sorted runs, k-way merged below: memory stays bounded
                run = scratch / f"run-{len(runs):06d}.jsonl"
                _write_jsonl(run, sorted((r for _, r in batch), key=_by_index))
                runs.append(run)
        if duplicates:
            shown = "; ".join(f"{i!r} in {a} and {b}" for i, a, b in duplicates[:5])
            more = f" and {len(duplicates) - 5} more" if len(duplicates) > 5 else ""
            raise DuplicateIdsError(
                [i for i, _, _ in duplicates],
                f"{len(duplicates)} id(s) appear more than once: {shown}{more} (fix: merge the "
                "outputs of one run's shards, all run with the same shard count)")

        def records() -> Iterable[dict[str, Any]]:
            if sort_output:
                return _merge_sorted(runs, scratch / "rounds")
            return (record for _, record in read_all())

        rows = _write_output(out, fmt, records)
    missing = max(0, expected_ids - rows) if expected_ids is not None else 0
    return MergeReport(rows=rows, expected_ids=expected_ids, missing=missing)


def _write_output(path: Path, fmt: str, records: Callable[[], Iterable[dict[str, Any]]]) -> int:
    """Write `records()` to `path` atomically; returns the row count. Parquet needs one schema
    up front, so it takes two passes: one to unify the batches' schemas, one to write."""
    if fmt == "jsonl":
        return _write_jsonl(path, records())
    try:
        schema = pa.schema([])
        for batch in _batched(records(), _BATCH_ROWS):
            schema = pa.unify_schemas([schema, pa.Table.from_pylist(batch).schema],
                                      promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ValueError(f"{path}: cannot write Parquet: {e} (fix: make each field hold one "
                         "type, or write JSONL output)") from e
    rows = 0
    with _atomic(path) as f, pq.ParquetWriter(f, schema) as writer:
        for batch in _batched(records(), _BATCH_ROWS):
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            rows += len(batch)
    return rows


def _write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    rows = 0
    with _atomic(path) as f:
        for record in records:
            # default=str: values JSON cannot hold (timestamps, decimals) are kept as text.
            f.write(json.dumps(record, ensure_ascii=False, default=str).encode() + b"\n")
            rows += 1
    return rows


@contextmanager
def _atomic(path: Path) -> Iterator[IO[bytes]]:
    """A file that appears at `path` whole or not at all."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # else a power loss after the rename can leave it empty
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _merge_sorted(paths: list[Path], scratch: Path) -> Iterator[dict[str, Any]]:
    """k-way merge of JSONL files each sorted by index; with more than _MERGE_FAN_IN files,
    groups are first merged into files under `scratch`, round after round."""
    level = 0
    while len(paths) > _MERGE_FAN_IN:
        scratch.mkdir(parents=True, exist_ok=True)
        groups = [paths[i:i + _MERGE_FAN_IN] for i in range(0, len(paths), _MERGE_FAN_IN)]
        paths = [scratch / f"round-{level}-{g:06d}.jsonl" for g in range(len(groups))]
        for group, merged in zip(groups, paths):
            _write_jsonl(merged, _kmerge(group))
        level += 1
    return _kmerge(paths)


def _kmerge(paths: list[Path]) -> Iterator[dict[str, Any]]:
    return heapq.merge(*(_read_jsonl(p) for p in paths), key=_by_index)


def _read_records(path: Path, fmt: str) -> Iterator[dict[str, Any]]:
    if fmt == "jsonl":
        yield from _read_jsonl(path)
        return
    with pq.ParquetFile(path) as f:
        _check_parquet(f, path)
        for batch in f.iter_batches(batch_size=_BATCH_ROWS):
            yield from batch.to_pylist()


def _read_ids(path: Path, fmt: str) -> Iterator[Any]:
    if fmt == "jsonl":
        yield from (record["id"] for record in _read_jsonl(path))
        return
    with pq.ParquetFile(path) as f:
        if _check_parquet(f, path):
            for batch in f.iter_batches(batch_size=_BATCH_ROWS, columns=["id"]):
                yield from batch.column(0).to_pylist()


def _check_parquet(f: pq.ParquetFile, path: Path) -> bool:
    """Whether the file has rows; raises when it has rows but no id or index column."""
    if f.metadata.num_rows == 0:
        return False
    missing = {"id", "index"} - set(f.schema_arrow.names)
    if missing:
        raise ValueError(f"{path}: no {' or '.join(sorted(missing))} column; {_NOT_OURS} "
                         "(fix: use another output path, or mode: overwrite)")
    return True


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                raise ValueError(f"{path}:{lineno}: not a JSON record ({e}); {_NOT_OURS} "
                                 "(fix: use another output path, or mode: overwrite)") from e
            if not isinstance(record, dict) or "id" not in record or "index" not in record:
                raise ValueError(f"{path}:{lineno}: a record without 'id' and 'index'; "
                                 f"{_NOT_OURS} (fix: use another output path, or mode: overwrite)")
            yield record


def _seq(chunk: Path) -> int:
    return int(chunk.stem.removeprefix("part-"))


def _batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch
