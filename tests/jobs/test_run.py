"""`sglbatch run` end to end on the default model: each input format, chat and prompt
templates, bad rows, resume, and shards that together equal the unsharded run."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sglbatch.jobs.runner import JobRunner, TooManyErrors
from sglbatch.jobs.spec import load_jobs
from sglbatch.jobs.writer import merge_outputs, shard_output_path
from tests.jobs.helpers import (
    QUICKSTART_ROWS,
    REPO,
    read_output,
    write_job,
    write_jsonl,
    write_prompt_job,
)

# Long enough (> 32 tokens) that the scheduler holds rows back until it is cached.
SYSTEM = ("You are a concise assistant for a quiz night. Answer each question in one short "
          "sentence, state only facts you are sure of, and never add a follow-up question.")
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "{question}"}]


def _run(job_file: Path, engine, shard=None):
    [job] = load_jobs(job_file)
    return job, JobRunner(job, engine, shard).run()


def test_chat_messages_jsonl_to_jsonl_matches_direct_generation(engine, smollm2_dir, tmp_path):
    rows = QUICKSTART_ROWS[:10]
    job_file = write_job(
        tmp_path / "job.yaml", smollm2_dir, input={"path": str(write_jsonl(
            tmp_path / "in.jsonl", rows)), "id_column": "id"},
        messages=MESSAGES, output={"path": str(tmp_path / "out.jsonl"),
                                   "keep_columns": ["topic"], "sort_output": True})
    job, stats = _run(job_file, engine)
    out = read_output(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == [r["id"] for r in rows]  # input order restored
    assert stats.rows == 10 and stats.errors == 0
    direct = engine.generate(
        messages=[[{"role": "system", "content": SYSTEM},
                   {"role": "user", "content": r["question"]}] for r in rows],
        sampling_params={"temperature": 0, "max_new_tokens": 12})
    assert [r["text"] for r in out] == [d["text"] for d in direct]
    assert [r["topic"] for r in out] == [r["topic"] for r in rows]
    # The system prompt is shared: the cache serves it to every row after the first.
    assert sum(r["meta_info"]["cached_tokens"] > 32 for r in out) == 9
    # A second run finds every row done and leaves the output as it was.
    _, again = _run(job_file, engine)
    assert again.skipped == 10 and again.rows == 0
    assert read_output(tmp_path / "out.jsonl") == out


def test_parquet_to_parquet_with_a_prompt_template(engine, smollm2_dir, tmp_path):
    rows = QUICKSTART_ROWS[:8]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    job_file = write_job(
        tmp_path / "job.yaml", smollm2_dir, input={"path": str(tmp_path / "in.parquet")},
        prompt="Question: {question}\nAnswer:",
        output={"path": str(tmp_path / "out.parquet"), "keep_columns": ["question"],
                "sort_output": True})
    _run(job_file, engine)
    out = read_output(tmp_path / "out.parquet")
    assert [r["id"] for r in out] == list(range(8))  # no id_column: the row number
    direct = engine.generate([f"Question: {r['question']}\nAnswer:" for r in rows],
                             {"temperature": 0, "max_new_tokens": 12})
    assert [r["text"] for r in out] == [d["text"] for d in direct]
    assert [r["question"] for r in out] == [r["question"] for r in rows]


def test_csv_to_jsonl_with_filter_limit_and_row_overrides(engine, smollm2_dir, tmp_path):
    with (tmp_path / "in.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["id", "topic", "question", "params"])
        writer.writeheader()
        for r in QUICKSTART_ROWS:
            writer.writerow({**r, "params": '{"max_new_tokens": 3}' if r["topic"] == "math"
                             else ""})
    job_file = write_job(
        tmp_path / "job.yaml", smollm2_dir,
        input={"path": str(tmp_path / "in.csv"), "id_column": "id",
               "filter": "topic in ('math', 'science')", "limit": 9},
        prompt="Q: {question}\nA:", sampling_column="params",
        output={"path": str(tmp_path / "out.jsonl"), "sort_output": True})
    _run(job_file, engine)
    out = read_output(tmp_path / "out.jsonl")
    expected = [r for r in QUICKSTART_ROWS if r["topic"] in ("math", "science")][:9]
    assert [r["id"] for r in out] == [r["id"] for r in expected]
    for rec, row in zip(out, expected):
        limit = 3 if row["topic"] == "math" else 12
        assert rec["meta_info"]["completion_tokens"] <= limit
    assert any(r["meta_info"]["completion_tokens"] == 3 for r in out)


def test_bad_rows_become_error_records_and_the_rest_complete(engine, smollm2_dir, tmp_path):
    good = [{"id": f"g{i}", "question": q["question"]} for i, q in enumerate(QUICKSTART_ROWS[:3])]
    lines = [good[0], {"id": "no-question", "prompt": "x"}, good[1],
             {"id": "too-long", "question": "word " * 9000}, good[2]]
    data = b"".join(json.dumps(r).encode() + b"\n" for r in lines)
    bad_utf8 = b'{"id": "latin1", "question": "caf\xe9"}\n'
    (tmp_path / "in.jsonl").write_bytes(data[:data.index(b"\n") + 1] + bad_utf8
                                        + data[data.index(b"\n") + 1:])
    job_file = write_job(
        tmp_path / "job.yaml", smollm2_dir,
        input={"path": str(tmp_path / "in.jsonl"), "id_column": "id"},
        prompt="Q: {question}\nA:", output={"path": str(tmp_path / "out.jsonl")})
    _, stats = _run(job_file, engine)
    out = {r["id"]: r for r in read_output(tmp_path / "out.jsonl")}
    assert stats.errors == 3 and len(out) == 6
    assert "question" in out["no-question"]["error"]
    assert "context" in out["too-long"]["error"] or "too long" in out["too-long"]["error"]
    utf8_error = [r for r in out.values() if "utf-8" in r.get("error", "").lower()]
    assert len(utf8_error) == 1
    for g in good:
        assert "error" not in out[g["id"]] and out[g["id"]]["text"]


def test_four_shards_together_equal_the_unsharded_run(engine, smollm2_dir, tmp_path):
    job_file = write_prompt_job(tmp_path, smollm2_dir, QUICKSTART_ROWS[:14])
    job, _ = _run(job_file, engine)
    whole = read_output(tmp_path / "out.jsonl")
    for i in range(4):
        _run(job_file, engine, shard=(i, 4))
    parts = [shard_output_path(job.output.path, (i, 4)) for i in range(4)]
    assert sorted(len(read_output(p)) for p in parts) == [3, 3, 4, 4]
    merged = tmp_path / "merged.jsonl"
    report = merge_outputs(parts, merged, "jsonl", sort_output=True, expected_ids=14)
    assert report.rows == 14
    strip = [{k: v for k, v in r.items() if k != "meta_info"} for r in read_output(merged)]
    assert strip == [{k: v for k, v in r.items() if k != "meta_info"} for r in whole]


def test_max_errors_stops_the_run_and_keeps_what_finished(engine, smollm2_dir, tmp_path):
    rows = [{"id": f"bad{i}"} for i in range(3)] + [{"id": "ok", "question": "Hi?"}]
    job_file = write_prompt_job(tmp_path, smollm2_dir, rows, max_errors=1, order="input")
    with pytest.raises(TooManyErrors, match="max_errors=1"):
        _run(job_file, engine)
    # The errors so far are committed: a rerun with a higher limit skips them and finishes.
    text = job_file.read_text().replace("max_errors: 1", "max_errors: 5")
    job_file.write_text(text)
    _, stats = _run(job_file, engine)
    assert stats.skipped == 2 and stats.errors == 1 and stats.rows == 2
    assert sorted(r["id"] for r in read_output(tmp_path / "out.jsonl")) == sorted(
        r["id"] for r in rows)


def test_dry_run_shows_the_first_requests_without_a_model(smollm2_dir, tmp_path):
    job_file = write_job(
        tmp_path / "job.yaml", smollm2_dir,
        input={"path": str(write_jsonl(tmp_path / "in.jsonl", QUICKSTART_ROWS)),
               "id_column": "id"},
        prompt="Q: {question}\nA:", output={"path": str(tmp_path / "out.jsonl")})
    res = subprocess.run([sys.executable, "-m", "sglbatch", "run", str(job_file), "--dry-run"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Q: What is the capital of France?" in res.stderr
    assert "(24 rows)" in res.stderr and not (tmp_path / "out.jsonl").exists()


def test_merge_refuses_a_shortfall_and_leaves_the_output_alone(smollm2_dir, tmp_path):
    from rich.console import Console

    from sglbatch.jobs.command import merge_jobs

    job_file = write_prompt_job(tmp_path, smollm2_dir, QUICKSTART_ROWS[:4])
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "capital-fr", "index": 0, "text": "kept"}\n')
    for i in range(2):  # shard 1 lost its rows: 1 of the 4 is there
        records = [{"id": "capital-jp", "index": 1, "text": "x"}] if i == 0 else []
        write_jsonl(shard_output_path(out, (i, 2)), records)
    with pytest.raises(ValueError, match="3 fewer than the input's 4"):
        merge_jobs(str(job_file), 2, Console(stderr=True))
    with pytest.raises(ValueError, match="--shards 0: need at least 1"):
        merge_jobs(str(job_file), 0, Console(stderr=True))
    assert read_output(out) == [{"id": "capital-fr", "index": 0, "text": "kept"}]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_per_row_constraints_and_their_errors(engine, smollm2_dir, tmp_path):
    schema = json.dumps({"type": "object", "required": ["n"], "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 999}}})
    rows = [{"id": "json", "question": "Give a number as JSON.",
             "params": {"json_schema": schema}},
            {"id": "digits", "question": "Pick a year.", "params": {"regex": r"\d{4}"}},
            {"id": "bad-regex", "question": "x", "params": {"regex": "(unclosed"}},
            {"id": "n2", "question": "x", "params": {"n": 2}}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    job_file = write_job(
        tmp_path / "job.yaml", smollm2_dir,
        input={"path": str(tmp_path / "in.jsonl"), "id_column": "id"},
        messages=[{"role": "user", "content": "{question}"}],
        sampling={"temperature": 0, "max_new_tokens": 48},
        sampling_column="params", output={"path": str(tmp_path / "out.jsonl")})
    _, stats = _run(job_file, engine)
    out = {r["id"]: r for r in read_output(tmp_path / "out.jsonl")}
    assert isinstance(json.loads(out["json"]["text"])["n"], int)
    assert re.fullmatch(r"\d{4}", out["digits"]["text"])
    assert "sampling_params.regex: invalid regex" in out["bad-regex"]["error"]
    assert "n must be 1" in out["n2"]["error"]
    assert stats.errors == 2


def test_program_job_records_each_rows_variables(engine, smollm2_dir, tmp_path):
    import sglbatch as sgl

    rows = QUICKSTART_ROWS[:20]
    job_file = write_job(
        tmp_path / "job.yaml", smollm2_dir,
        input={"path": str(write_jsonl(tmp_path / "in.jsonl", rows)), "id_column": "id"},
        program=str(REPO / "jobs/programs/qa.py") + ":answer_and_rate",
        sampling={"temperature": 0}, output={"path": str(tmp_path / "out.jsonl")})
    job, stats = _run(job_file, engine)
    out = {r["id"]: r for r in read_output(tmp_path / "out.jsonl")}
    assert sorted(out) == sorted(r["id"] for r in rows) and stats.errors == 0
    # The same program run directly gives the same variables.
    from sglbatch.jobs.program import load_program

    program = load_program(job.program)
    for row in rows[:3]:
        state = program.run(question=row["question"], temperature=0, backend=engine)
        assert out[row["id"]]["variables"]["answer"] == state["answer"]
        assert out[row["id"]]["variables"]["verdict"] == state["verdict"] in ("yes", "no")
    assert all(r["meta_info"]["completion_tokens"] > 0 for r in out.values())
    assert sgl.function  # the frontend is what ran them


def test_program_job_row_errors(engine, smollm2_dir, tmp_path):
    rows = [{"id": "ok", "question": "What is 2 + 2?"}, {"id": "no-question", "topic": "x"}]
    job_file = write_job(
        tmp_path / "job.yaml", smollm2_dir,
        input={"path": str(write_jsonl(tmp_path / "in.jsonl", rows)), "id_column": "id"},
        program=str(REPO / "jobs/programs/qa.py") + ":answer_and_rate",
        output={"path": str(tmp_path / "out.jsonl")})
    _, stats = _run(job_file, engine)
    out = {r["id"]: r for r in read_output(tmp_path / "out.jsonl")}
    assert "question" in out["no-question"]["error"] and "variables" in out["ok"]
    assert stats.errors == 1
