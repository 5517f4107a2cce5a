"""A 4-task array job runs to completion on the local one-node SLURM cluster."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.jobs.slurm_cluster import SlurmCluster

pytestmark = pytest.mark.slurm

SCRIPT = """#!/bin/bash
echo "$SLURM_ARRAY_TASK_ID $SLURM_ARRAY_TASK_COUNT" > "{out}/task_$SLURM_ARRAY_TASK_ID.txt"
"""


def test_array_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "job.sh"
    script.write_text(SCRIPT.format(out=tmp_path))
    res = slurm_cluster.run(
        "sbatch", "--wait", "--array=0-3", "--export=ALL", f"--chdir={tmp_path}",
        f"--output={tmp_path}/slurm-%A_%a.out", str(script), timeout=300, check=False)
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{slurm_cluster.logs()}"
    for i in range(4):
        assert (tmp_path / f"task_{i}.txt").read_text().split() == [str(i), "4"]


def test_jobs_see_the_projects_python(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """--export=ALL passes PATH etc., so a job can run the same interpreter as the tests."""
    script = tmp_path / "py.sh"
    script.write_text(f'#!/bin/bash\n"{sys.executable}" -c "import sys; print(sys.prefix)" '
                      f'> "{tmp_path}/prefix.txt"\n')
    res = slurm_cluster.run("sbatch", "--wait", "--export=ALL", f"--chdir={tmp_path}",
                            "--output=/dev/null", str(script), timeout=300, check=False)
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{slurm_cluster.logs()}"
    assert (tmp_path / "prefix.txt").read_text().strip() == sys.prefix
