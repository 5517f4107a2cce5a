"""Job-submission fixtures: a real local SLURM cluster (see slurm_cluster.py)."""

from tests.jobs.slurm_cluster import slurm_cluster  # noqa: F401  (re-exported fixture)
