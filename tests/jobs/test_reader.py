"""Streaming input: JSONL (bad lines become error rows), Parquet, CSV, globs, filter, limit,
shards."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sglbatch.jobs.reader import Row, count_rows, iter_rows
from sglbatch.jobs.spec import InputSpec, load_jobs


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def spec(path: Path, fmt: str, **kwargs) -> InputSpec:
    return InputSpec(paths=[path], format=fmt, **kwargs)


def test_jsonl_bad_lines_become_error_rows(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"qid": "a", "question": "caf\xc3\xa9"}\n'  # BOM, UTF-8
                     b"\n"  # blank lines are not rows
                     b'{"qid": "b", "question": "\xff\xfe"}\n'  # not UTF-8
                     b"{truncated\n"
                     b"[1, 2]\n"
                     b'{"question": "no id"}\n'
                     b'{"qid": "c", "question": "last, no newline"}')
    rows = list(iter_rows(spec(path, "jsonl", id_column="qid")))
    assert [r.index for r in rows] == [0, 1, 2, 3, 4, 5]
    assert rows[0] == Row(0, "a", {"qid": "a", "question": "café"})
    assert rows[1].data is None and rows[1].id == 1
    assert rows[1].error == "q.jsonl:3: not valid UTF-8 at byte 27"
    assert rows[2].error.startswith("q.jsonl:4: invalid JSON: ")
    assert rows[3].error == "q.jsonl:5: expected a JSON object, got list"
    assert rows[4].data == {"question": "no id"} and rows[4].id == 4
    assert "id_column 'qid' must hold a string or an integer, got None" in rows[4].error
    assert rows[5] == Row(5, "c", {"qid": "c", "question": "last, no newline"})
    assert count_rows(spec(path, "jsonl")) == 6


def test_parquet_in_batches(tmp_path: Path) -> None:
    path = tmp_path / "q.parquet"
    n = 2500  # more than one read batch
    pq.write_table(pa.table({"n": list(range(n)), "s": [f"r{i}" for i in range(n)]}), path,
                   row_group_size=700)
    rows = list(iter_rows(spec(path, "parquet", id_column="s")))
    assert [r.index for r in rows] == list(range(n))
    assert rows[1234] == Row(1234, "r1234", {"n": 1234, "s": "r1234"})
    assert count_rows(spec(path, "parquet")) == n
    assert count_rows(spec(path, "parquet", limit=10)) == 10


def test_csv_columns_are_strings(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text('id,question,score\n1,"two\nlines",3\n2,plain,\nx3,"quoted, comma",7\n')
    rows = list(iter_rows(spec(path, "csv", id_column="id")))
    assert [r.data for r in rows] == [
        {"id": "1", "question": "two\nlines", "score": "3"},
        {"id": "2", "question": "plain", "score": ""},
        {"id": "x3", "question": "quoted, comma", "score": "7"},
    ]
    assert [r.id for r in rows] == ["1", "2", "x3"]
    assert count_rows(spec(path, "csv")) == 3


def test_glob_over_two_files_keeps_counting(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    jsonl(tmp_path / "data" / "b.jsonl", [{"q": "b0"}, {"q": "b1"}])
    jsonl(tmp_path / "data" / "a.jsonl", [{"q": "a0"}, {"q": "a1"}, {"q": "a2"}])
    job_file = tmp_path / "jobs.yaml"
    job_file.write_text("endpoint: {url: 'http://h:1'}\ninput: {path: 'data/*.jsonl'}\n"
                        "prompt: '{q}'\noutput: {path: out.jsonl}\n")
    [job] = load_jobs(job_file)
    rows = list(iter_rows(job.input))
    assert [(r.index, r.id, r.data["q"]) for r in rows] == [
        (0, 0, "a0"), (1, 1, "a1"), (2, 2, "a2"), (3, 3, "b0"), (4, 4, "b1")]
    assert count_rows(job.input) == 5


def test_filter_and_limit(tmp_path: Path) -> None:
    words = ["a", "bbbbbb", "cc", "ddddddd", "e", "ff", "g"]
    path = jsonl(tmp_path / "q.jsonl", [{"w": w, "tags": ["x"] * i} for i, w in enumerate(words)])
    short = list(iter_rows(spec(path, "jsonl", filter="len(w) < 3")))
    assert [r.index for r in short] == [0, 2, 4, 5, 6]  # indices stay the input positions
    # A generator expression sees the row's columns too.
    tagged = iter_rows(spec(path, "jsonl", filter="any(t == 'x' for t in tags) and len(w) < 3"))
    assert [r.index for r in tagged] == [2, 4, 5, 6]
    # limit counts rows that pass the filter.
    limited = iter_rows(spec(path, "jsonl", filter="len(w) < 3", limit=3))
    assert [r.index for r in limited] == [0, 2, 4]
    assert count_rows(spec(path, "jsonl", filter="len(w) < 3")) is None
    assert count_rows(spec(path, "jsonl", limit=3)) == 3


def test_a_failing_filter_fails_its_row_only(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "q.jsonl", [{"n": 1}, {"n": "x"}, {"m": 3}])
    rows = list(iter_rows(spec(path, "jsonl", filter="int(n) > 0")))
    assert [r.error for r in rows] == [
        None,
        "input.filter raised ValueError: invalid literal for int() with base 10: 'x'",
        "input.filter raised NameError: name 'n' is not defined",
    ]
    assert rows[1].data == {"n": "x"}  # kept, so the error record can carry its columns
    opened = list(iter_rows(spec(path, "jsonl", filter="open('/etc/passwd')")))
    assert all("NameError: name 'open' is not defined" in r.error for r in opened)


@pytest.mark.parametrize("limit", [None, 10])
def test_shards_partition_the_rows(tmp_path: Path, limit: int | None) -> None:
    path = jsonl(tmp_path / "q.jsonl", [{"n": i} for i in range(23)])
    whole = spec(path, "jsonl", filter="n % 3 != 0", limit=limit)
    rows = list(iter_rows(whole))
    shards = [list(iter_rows(whole, (i, 4))) for i in range(4)]
    for i, shard in enumerate(shards):
        assert shard and all(r.index % 4 == i for r in shard)
    assert sorted((r for s in shards for r in s), key=lambda r: r.index) == rows
    assert len(rows) == (limit or 15)


def test_bad_shard(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "q.jsonl", [{"n": 1}])
    with pytest.raises(ValueError, match=r"shard 4 of 4: the index must be in \[0, count\)"):
        list(iter_rows(spec(path, "jsonl"), (4, 4)))
