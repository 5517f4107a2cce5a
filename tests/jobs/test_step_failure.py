"""A job whose engine fails one step: the rows of that step are recorded as errors naming the
failure, every other row gets its result, and no row is lost or written twice."""

from __future__ import annotations

from sglbatch.jobs.runner import JobRunner
from sglbatch.jobs.spec import load_jobs
from tests.fault_injection import MESSAGE, FirstCalls, fail_forward
from tests.jobs.helpers import QUICKSTART_ROWS, read_output, write_prompt_job


def test_rows_of_a_failed_step_are_recorded_as_errors_and_the_rest_complete(
        smollm2_dir, tmp_path):
    from sglbatch.engine.engine import Engine

    rows = QUICKSTART_ROWS[:8]
    # One row in flight, so the failed first step holds exactly one row (with more, how many
    # share that step depends on timing); the other seven run afterwards.
    [job] = load_jobs(write_prompt_job(tmp_path, smollm2_dir, rows, max_inflight=1))
    with Engine(model_path=str(smollm2_dir), dtype="float32", kv_cache_gb=0.1) as engine:
        fail_forward(engine, FirstCalls(1))
        stats = JobRunner(job, engine).run()
    out = read_output(tmp_path / "out.jsonl")
    assert sorted(r["id"] for r in out) == sorted(r["id"] for r in rows)  # all, once each
    failed = [r for r in out if "error" in r]
    assert len(failed) == stats.errors == 1
    assert all(MESSAGE in r["error"] for r in failed)
    assert all(r["text"] for r in out if "error" not in r)
