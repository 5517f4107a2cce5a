"""`sglbatch run` with `model.dp_size: 2`: the same records as one engine, and a summary
that breaks the work down per replica."""

from __future__ import annotations

import subprocess
import sys

import yaml

from sglbatch.jobs.runner import JobRunner
from sglbatch.jobs.spec import load_jobs
from tests.jobs.helpers import REPO, read_output, write_prompt_job

GROUPS = ["You are grading arithmetic homework for a class of careful ten-year-olds.",
          "Answer as a pirate who has just found a chest of gold coins on a beach.",
          "Reply in one short sentence, as a weather forecaster on morning radio.",
          "You are a librarian who recommends exactly one book for every question."]
ROWS = [{"id": f"r{i}", "question": f"{GROUPS[i % 4]} Question {i}: what is {i} plus {i % 7}?"}
        for i in range(200)]


def _records(path):
    return {r["id"]: {k: v for k, v in r.items() if k != "meta_info"} for r in read_output(path)}


def test_dp2_job_writes_the_records_of_dp1(engine, smollm2_dir, tmp_path):
    one = tmp_path / "dp1"
    one.mkdir()
    [job] = load_jobs(write_prompt_job(one, smollm2_dir, ROWS))
    JobRunner(job, engine).run()

    two = tmp_path / "dp2"
    two.mkdir()
    job_file = write_prompt_job(two, smollm2_dir, ROWS)
    spec = yaml.safe_load(job_file.read_text())
    spec["model"]["dp_size"] = 2
    spec["model"]["kv_cache_gb"] = 0.25
    job_file.write_text(yaml.safe_dump(spec))
    run = subprocess.run([sys.executable, "-m", "sglbatch", "run", str(job_file)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    assert _records(two / "out.jsonl") == _records(one / "out.jsonl")
    summary = run.stdout + run.stderr
    assert "replica 0" in summary and "replica 1" in summary
