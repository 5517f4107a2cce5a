"""A job's input as a Ray Data dataset, read on the cluster.

Files are listed on the driver (a local path or glob, or any fsspec URI: s3://, gs://,
file://, with a glob) and read by Ray Data's file-based reader on the workers, parsed by
sglbatch's own reader (jobs/reader.py): a bad line becomes an error row instead of failing
its block, and CSV columns stay strings, as in a local run.

Each row's index is its position in the whole input, numbered as the local reader numbers
it. Ray reads files in parallel and in no fixed order, so a first, cheap pass counts each
file's rows (and the rows input.filter keeps); the second numbers each row from those
counts (rows in earlier files + its position in its file) and applies `limit` from the kept
counts. Neither pass needs the files in order.
"""

from __future__ import annotations

import functools
import glob
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from sglbatch.jobs.reader import apply_filter, count_file, make_row, parse_file
from sglbatch.jobs.spec import InputSpec, compile_filter

# A committed row still travels through the pipeline, as this empty marker: the driver
# counts it as skipped.
SKIPPED = b""
_BLOCK_ROWS = 256
# Reading is parsing, light next to generation: read tasks reserve no CPU, so the engine
# replicas may hold every CPU of the cluster without starving the read that feeds them.
_READ_RESOURCES = {"num_cpus": 0}


@dataclass(frozen=True)
class InputFiles:
    """The input's files in input order, and the filesystem Ray reads them with."""

    paths: list[str]
    filesystem: Any = None  # a pyarrow filesystem; None: the local one

    @property
    def read_kwargs(self) -> dict[str, Any]:
        return {"filesystem": self.filesystem} if self.filesystem is not None else {}


@dataclass(frozen=True)
class InputPlan:
    """Where each file's rows start, from the counting pass (keyed as Ray names the files)."""

    first_index: dict[str, int]  # rows in earlier files
    kept_before: dict[str, int]  # rows input.filter keeps in earlier files
    rows: int  # rows this run covers: after the filter and the limit, before any shard


def list_input(spec: InputSpec) -> InputFiles:
    if spec.uri is None:
        return InputFiles([str(p) for p in spec.paths])
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = fsspec.core.url_to_fs(spec.uri)
    if glob.has_magic(path):
        paths = sorted(fs.glob(path))
    elif fs.isdir(path):
        paths = sorted(fs.find(path))
    else:
        paths = [path] if fs.exists(path) else []
    if not paths:
        raise FileNotFoundError(f"input.path {spec.uri!r}: no file matches")
    return InputFiles(paths, PyFileSystem(FSSpecHandler(fs)))


def plan_input(ray_data: Any, spec: InputSpec, files: InputFiles) -> InputPlan:
    """The counting pass: one Ray read task per file, returning its counts."""
    counts = ray_data.read_datasource(_InputCounts(files, spec),
                                      **_READ_RESOURCES).take_all()
    by_path = {c["path"]: c for c in counts}
    order = sorted(by_path, key=_input_order(files))
    first_index, kept_before, rows, kept = {}, {}, 0, 0
    for path in order:
        first_index[path], kept_before[path] = rows, kept
        rows += by_path[path]["rows"]
        kept += by_path[path]["kept"]
    return InputPlan(first_index, kept_before,
                     kept if spec.limit is None else min(kept, spec.limit))


def read_rows(ray_data: Any, spec: InputSpec, files: InputFiles, plan: InputPlan,
              shard: tuple[int, int] | None, done_ref: Any) -> Any:
    """The dataset of this run's rows: column `row`, each a pickled reader Row (so kept
    columns keep their types), or SKIPPED for an id in the ray.put set `done_ref`."""
    return ray_data.read_datasource(_InputRows(files, spec, plan, shard, done_ref),
                                    **_READ_RESOURCES)


def _input_order(files: InputFiles) -> Callable[[str], int]:
    """A path's place in the input, as Ray reports the path (it may resolve local paths)."""
    place = {path: i for i, path in enumerate(files.paths)}
    if files.filesystem is None:
        place |= {str(Path(path).resolve()): i for i, path in enumerate(files.paths)}
    return lambda ray_path: place[ray_path] if ray_path in place else \
        place[str(Path(ray_path).resolve())]


class _InputSource(FileBasedDatasource):
    def __init__(self, files: InputFiles, spec: InputSpec):
        super().__init__(files.paths, **files.read_kwargs)
        self.spec = spec

    def _open_input_source(self, filesystem: Any, path: str, **open_args: Any) -> Any:
        # Parquet and CSV need a seekable file; pyarrow's random-access files stream from
        # S3 and GCS with range requests.
        return filesystem.open_input_file(path)


class _InputCounts(_InputSource):
    def _read_stream(self, f: Any, path: str) -> Iterator[pa.Table]:
        spec = self.spec
        if spec.filter is None:
            rows = kept = count_file(spec.format, f)
        else:
            code = compile_filter(spec.filter)
            rows = kept = 0
            for data, error in parse_file(spec.format, f, Path(path).name):
                rows += 1
                kept += apply_filter(code, data, error)[0]
        yield pa.table({"path": [path], "rows": [rows], "kept": [kept]})


class _InputRows(_InputSource):
    def __init__(self, files: InputFiles, spec: InputSpec, plan: InputPlan,
                 shard: tuple[int, int] | None, done_ref: Any):
        super().__init__(files, spec)
        self.plan, self.shard, self.done_ref = plan, shard, done_ref

    def _read_stream(self, f: Any, path: str) -> Iterator[pa.Table]:
        spec, shard = self.spec, self.shard
        code = compile_filter(spec.filter) if spec.filter else None
        first, kept_before = self.plan.first_index[path], self.plan.kept_before[path]
        done = _done_ids(self.done_ref)
        blobs: list[bytes] = []
        kept = 0
        for position, (data, error) in enumerate(parse_file(spec.format, f, Path(path).name)):
            keep, error = apply_filter(code, data, error)
            if not keep:
                continue
            if spec.limit is not None and kept_before + kept >= spec.limit:
                break
            kept += 1
            index = first + position
            if shard is not None and index % shard[1] != shard[0]:
                continue
            row = make_row(index, data, error, spec.id_column)
            blobs.append(SKIPPED if row.id in done else pickle.dumps(row))
            if len(blobs) == _BLOCK_ROWS:
                yield pa.table({"row": pa.array(blobs, pa.binary())})
                blobs = []
        if blobs:
            yield pa.table({"row": pa.array(blobs, pa.binary())})


@functools.lru_cache(maxsize=1)
def _done_ids(done_ref: Any) -> frozenset:
    """The committed ids, fetched once per worker process and run."""
    import ray

    return ray.get(done_ref)
