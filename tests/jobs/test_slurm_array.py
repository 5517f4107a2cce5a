"""jobs/slurm_array.sbatch as a 4-task array on a real local SLURM, merged, equals the
unsharded run of the same job file."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest

from sglbatch.jobs.runner import JobRunner
from sglbatch.jobs.spec import load_jobs
from tests.jobs.helpers import QUICKSTART_ROWS, REPO, read_output, write_prompt_job

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_slurm_array_shards_merge_into_the_unsharded_output(slurm_cluster, engine, smollm2_dir,
                                                            tmp_path):
    rows = QUICKSTART_ROWS[:12]
    job_file = write_prompt_job(tmp_path, smollm2_dir, rows)
    res = slurm_cluster.run(
        "sbatch", "--wait", "--array=0-3", "--export=ALL", f"--chdir={REPO}",
        f"--output={tmp_path}/slurm-%A_%a.out", str(REPO / "jobs" / "slurm_array.sbatch"),
        str(job_file), timeout=900, check=False)
    logs = "\n".join(p.read_text()[-2000:] for p in tmp_path.glob("slurm-*.out"))
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{logs}\n{slurm_cluster.logs()}"
    merge = subprocess.run([sys.executable, "-m", "sglbatch", "merge", str(job_file),
                            "--shards", "4"], capture_output=True, text=True)
    assert merge.returncode == 0, merge.stderr
    merged = read_output(tmp_path / "out.jsonl")

    [job] = load_jobs(job_file)
    reference = tmp_path / "reference.jsonl"
    JobRunner(replace(job, output=replace(job.output, path=reference)), engine).run()
    strip = lambda recs: [{k: v for k, v in r.items() if k != "meta_info"} for r in recs]  # noqa: E731
    assert strip(merged) == strip(read_output(reference))
    assert [r["id"] for r in merged] == [r["id"] for r in rows]
