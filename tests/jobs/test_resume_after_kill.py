"""A run killed with SIGKILL at random moments, restarted each time with mode: resume,
ends with every row exactly once and the same greedy text as an uninterrupted run."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from sglbatch.jobs.runner import JobRunner
from sglbatch.jobs.spec import load_jobs
from tests.jobs.helpers import QUICKSTART_ROWS, read_output, write_job, write_prompt_job

pytestmark = pytest.mark.slow

ROWS = [{"id": f"{r['id']}-{k}", "question": f"{r['question']} (variant {k})"}
        for k in range(2) for r in QUICKSTART_ROWS][:40]


def _committed(output: Path) -> int:
    """Records in committed chunks (what a kill cannot take back)."""
    parts = output.with_name(output.name + ".parts")
    if not parts.is_dir():
        return 0
    return sum(len(p.read_bytes().splitlines()) for p in parts.glob("*.jsonl"))


def test_kill9_at_random_moments_then_resume(engine, smollm2_dir, tmp_path):
    job_file = write_prompt_job(tmp_path, smollm2_dir, ROWS, max_inflight=4, chunk_rows=2,
                                sampling={"temperature": 0, "max_new_tokens": 16})
    output = tmp_path / "out.jsonl"
    rng = random.Random(1234)
    mid_run_kills = 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "sglbatch", "run", str(job_file)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = _committed(output) + rng.randint(1, 8)
        deadline = time.monotonic() + 180
        while proc.poll() is None and _committed(output) < target and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.4))  # land anywhere: mid-generation, mid-commit
        proc.kill()
        proc.wait()
        mid_run_kills += 0 < _committed(output) < len(ROWS)
    assert mid_run_kills >= 2, "the kills did not interrupt the run"
    done = subprocess.run([sys.executable, "-m", "sglbatch", "run", str(job_file)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    out = read_output(output)
    counts = Counter(r["id"] for r in out)
    assert set(counts) == {r["id"] for r in ROWS} and set(counts.values()) == {1}
    # Reference: the same job, uninterrupted, in this process.
    spec = yaml.safe_load(job_file.read_text())
    spec["output"]["path"] = str(tmp_path / "reference.jsonl")
    [job] = load_jobs(write_job(tmp_path / "ref.yaml", smollm2_dir,
                                **{k: v for k, v in spec.items() if k != "model"}))
    JobRunner(job, engine).run()
    reference = {r["id"]: r["text"] for r in read_output(tmp_path / "reference.jsonl")}
    assert {r["id"]: r["text"] for r in out} == reference
    assert [r["id"] for r in out] == [r["id"] for r in ROWS]
