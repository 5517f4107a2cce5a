"""Exactly-once output: chunked commits, resume after a kill at any point, finalize, merge."""

from __future__ import annotations

import fcntl
import functools
import json
import os
import random
import shutil
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sglbatch.jobs import writer as writer_module
from sglbatch.jobs.spec import OutputSpec
from sglbatch.jobs.writer import (
    DuplicateIdsError,
    ResultWriter,
    merge_outputs,
    parts_dir,
    shard_output_path,
)


def record(i: int) -> dict:
    return {"id": f"r{i}", "index": i, "text": f"answer {i}"}


def read(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines()]


def output(path: Path, **kwargs) -> OutputSpec:
    fmt = "parquet" if path.suffix == ".parquet" else "jsonl"
    return OutputSpec(path=path, format=fmt, **kwargs)


def run(path: Path, n: int, *, chunk_rows: int = 3, seed: int = 0, sort: bool = True,
        **kwargs) -> None:
    """What the runner does: skip done ids, add the rest in completion order, finalize."""
    writer = ResultWriter(output(path, **kwargs), path, chunk_rows=chunk_rows)
    done = writer.done_ids()
    todo = [i for i in range(n) if f"r{i}" not in done]
    random.Random(seed).shuffle(todo)
    for i in todo:
        writer.add(record(i))
    writer.finalize(sort)


def test_commits_whole_sorted_chunks(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    writer = ResultWriter(output(out), out, chunk_rows=3)
    for i in [5, 1, 3, 0, 4, 2, 6]:
        writer.add(record(i))
    parts = sorted(parts_dir(out).glob("part-*.jsonl"))
    assert [p.name for p in parts] == ["part-000000.jsonl", "part-000001.jsonl"]
    assert [r["index"] for r in read(parts[0])] == [1, 3, 5]  # each chunk sorted by index
    assert writer.done_ids() == {"r0", "r1", "r2", "r3", "r4", "r5"}  # r6 is only buffered
    writer.flush()
    assert len(list(parts_dir(out).glob("part-*.jsonl"))) == 3
    writer.finalize(sort_output=False)
    assert [r["index"] for r in read(out)] == [1, 3, 5, 0, 2, 4, 6]  # chunks in commit order
    assert not parts_dir(out).exists()
    with pytest.raises(RuntimeError, match="this writer is closed"):
        writer.add(record(7))


def test_commits_after_flush_seconds(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    writer = ResultWriter(output(out), out, chunk_rows=100, flush_seconds=0)
    writer.add(record(0))
    writer.add(record(1))
    assert len(list(parts_dir(out).glob("part-*.jsonl"))) == 2


def test_a_record_needs_id_and_index(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match=r"needs 'id' and 'index', got keys \['id', 'text'\]"):
        ResultWriter(output(out), out).add({"id": 1, "text": "x"})


@pytest.mark.parametrize("name", ["out.jsonl", "out.parquet"])
def test_resuming_a_finished_run_keeps_its_records(tmp_path: Path, name: str) -> None:
    out = tmp_path / name
    run(out, 5)
    writer = ResultWriter(output(out), out)
    assert writer.done_ids() == {f"r{i}" for i in range(5)}
    writer.finalize()  # nothing new: the finished output stays as it is
    assert read(out) == [record(i) for i in range(5)]
    run(out, 12, seed=1)
    assert read(out) == [record(i) for i in range(12)]


def test_parquet_output_unifies_the_record_types(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    writer = ResultWriter(output(out), out, chunk_rows=2)
    records = [{"id": 0, "index": 0, "error": None, "meta": {"tokens": 3}},
               {"id": 1, "index": 1, "error": None, "meta": {"tokens": 4}},
               {"id": 2, "index": 2, "error": "boom", "meta": {"tokens": 1, "finish": "stop"}}]
    for r in records:
        writer.add(r)
    writer.finalize()
    assert read(out) == [{**r, "meta": {"tokens": r["meta"]["tokens"],
                                        "finish": r["meta"].get("finish")}} for r in records]


def test_parquet_refuses_a_field_of_two_types(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    writer = ResultWriter(output(out), out, chunk_rows=1)
    writer.add({"id": 0, "index": 0, "x": 1})
    writer.add({"id": 1, "index": 1, "x": "one"})
    with pytest.raises(ValueError, match=r"cannot write Parquet: .*\(fix: make each field"):
        writer.finalize()
    assert not out.exists() and len(list(parts_dir(out).glob("part-*"))) == 2  # nothing lost


def test_empty_output(tmp_path: Path) -> None:
    for name in ["out.jsonl", "out.parquet"]:
        run(tmp_path / name, 0)
        assert read(tmp_path / name) == []


def test_overwrite_starts_over(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    run(out, 6)
    writer = ResultWriter(output(out), out, chunk_rows=2)
    writer.add(record(9))
    writer.add(record(8))
    writer.close()  # an interrupted run: a chunk and no output
    writer = ResultWriter(output(out, mode="overwrite"), out)
    assert writer.done_ids() == set()
    assert not out.exists() and not list(parts_dir(out).glob("part-*"))
    writer.add(record(1))
    writer.finalize()
    assert read(out) == [record(1)]


def test_stray_temporary_files_are_not_results(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    writer = ResultWriter(output(out), out, chunk_rows=2)
    for i in range(3):
        writer.add(record(i))
    writer.close()
    # What a kill leaves while a chunk or the output is being written.
    parts = parts_dir(out)
    (parts / ".part-000001.jsonl.tmp").write_text(json.dumps(record(3)) + "\n{\"id\": ")
    (tmp_path / ".out.jsonl.tmp").write_text(json.dumps(record(0)) + "\n")
    (parts / ".merge.tmp").mkdir()
    writer = ResultWriter(output(out), out)
    assert writer.done_ids() == {"r0", "r1", "r2"}
    assert sorted(p.name for p in parts.iterdir()) == [".lock", "part-000000.jsonl",
                                                        "part-000001.jsonl"]
    writer.finalize()
    assert read(out) == [record(i) for i in range(3)]


def test_a_second_process_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    parts_dir(out).mkdir()
    with open(parts_dir(out) / ".lock", "a") as other:  # another open file: another owner
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RuntimeError, match="another process is writing this output"):
            ResultWriter(output(out), out)


def test_a_writer_abandoned_by_a_failed_run_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    abandoned = ResultWriter(output(out), out, chunk_rows=2)
    for i in range(3):
        abandoned.add(record(i))  # r2 stays buffered, as when the run raises
    run(out, 4)
    assert read(out) == [record(i) for i in range(4)]
    with pytest.raises(RuntimeError, match="this writer is closed"):
        abandoned.flush()


def die_at(event: int) -> None:
    """In this process, SIGKILL itself just before its `event`-th file replace/unlink/rmdir."""
    count = 0

    def dying(real: Callable) -> Callable:
        def call(*args, **kwargs):
            nonlocal count
            count += 1
            if count == event:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return call

    os.replace, os.unlink, os.rmdir = dying(os.replace), dying(os.unlink), dying(os.rmdir)


def killed_in_child(work: Callable[[], None], event: int) -> bool:
    """Run `work` in a forked child killed at `event`; whether the kill happened."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            die_at(event)
            work()
        except BaseException:  # noqa: BLE001 - any failure reaches the parent as the exit code
            traceback.print_exc()
            code = 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, "the child failed; see its traceback above"
    return False


@pytest.mark.parametrize("finished_before", [0, 7], ids=["fresh", "resuming-a-finished-run"])
def test_kill_at_every_step_loses_and_duplicates_nothing(tmp_path: Path,
                                                         finished_before: int) -> None:
    """Kill the job before each file operation in turn (every commit, the adoption of a finished
    output, finalize and its cleanup); then a rerun must produce every record exactly once."""
    start = tmp_path / "start"
    start.mkdir()
    if finished_before:
        run(start / "out.jsonl", finished_before, seed=3)
    event = 0
    while True:
        event += 1
        case = tmp_path / f"kill-{event}"
        shutil.copytree(start, case)
        out = case / "out.jsonl"
        if not killed_in_child(functools.partial(run, out, 13, seed=event), event):
            break
        run(out, 13, seed=event + 100)
        assert read(out) == [record(i) for i in range(13)], f"killed at event {event}"
        assert not parts_dir(out).exists()
    assert event > 10  # the loop really went through the whole run


def test_finalize_merges_many_chunks_in_rounds(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_module, "_MERGE_FAN_IN", 3)
    out = tmp_path / "out.parquet"
    run(out, 40, chunk_rows=2)  # 20 chunks: rounds of 3-way merges
    assert read(out) == [record(i) for i in range(40)]


def test_shard_output_path() -> None:
    assert shard_output_path(Path("o/out.jsonl"), None) == Path("o/out.jsonl")
    assert shard_output_path(Path("o/out.jsonl"), (2, 4)) == Path("o/out.shard-2-of-4.jsonl")
    with pytest.raises(ValueError, match="shard 4 of 4"):
        shard_output_path(Path("out.jsonl"), (4, 4))


def shards(tmp_path: Path, n: int, total: int) -> list[Path]:
    """Run `total` rows as n shards (the last one as Parquet), like `sglbatch run --shard`."""
    paths = []
    for i in range(n):
        path = shard_output_path(tmp_path / ("out.parquet" if i == n - 1 else "out.jsonl"),
                                 (i, n))
        writer = ResultWriter(output(path), path, chunk_rows=2)
        for index in range(i, total, n):
            writer.add(record(index))
        writer.finalize(sort_output=False)
        paths.append(path)
    return paths


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_merge_shards(tmp_path: Path, fmt: str) -> None:
    out, paths = tmp_path / f"merged.{fmt}", shards(tmp_path, 3, 20)
    report = merge_outputs(paths, out, fmt, expected_ids=20)
    assert (report.rows, report.missing) == (20, 0)
    assert read(out) == [record(i) for i in range(20)]
    unsorted = merge_outputs(paths, out, fmt, sort_output=False, expected_ids=25)
    assert (unsorted.rows, unsorted.missing) == (20, 5)
    assert sorted(read(out), key=lambda r: r["index"]) == [record(i) for i in range(20)]


def test_merge_refuses_duplicates_and_unfinished_shards(tmp_path: Path) -> None:
    paths = shards(tmp_path, 2, 6)
    overlap = tmp_path / "overlap.jsonl"
    overlap.write_text("".join(json.dumps(record(i)) + "\n" for i in (1, 2, 2)))
    out = tmp_path / "merged.jsonl"
    with pytest.raises(DuplicateIdsError) as e:
        merge_outputs([*paths, overlap], out, "jsonl")
    assert e.value.duplicate_ids == ["r1", "r2", "r2"]
    assert f"'r1' in {paths[1]} and {overlap}" in str(e.value) and "(fix: " in str(e.value)
    assert not out.exists() and [p.name for p in tmp_path.glob(".merged*")] == []
    parts_dir(paths[0]).mkdir()
    with pytest.raises(ValueError, match=r"its run is not finished .*\(fix: run it again"):
        merge_outputs(paths, out, "jsonl")
    with pytest.raises(ValueError, match="both an input and the output"):
        merge_outputs(paths[1:], paths[1], "parquet")


def test_not_our_file_at_the_output_path(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text('{"question": "?"}\n')
    with pytest.raises(ValueError, match=r"out.jsonl:1: a record without 'id' and 'index'"):
        ResultWriter(output(out), out).done_ids()
    table = tmp_path / "out.parquet"
    pq.write_table(pa.table({"id": [1]}), table)
    with pytest.raises(ValueError, match=r"out.parquet: no index column.*\(fix: "):
        ResultWriter(output(table), table).done_ids()
