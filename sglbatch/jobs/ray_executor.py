"""`executor: ray`: a job's rows on Ray Data, one engine per Ray actor, committed by the driver.

Ray Data reads the input on the cluster (jobs/ray_source.py: local files, globs, S3 or GCS
through fsspec; each row numbered as the local reader numbers it, bad lines as error rows,
committed ids marked skipped). `map_batches` over an ActorPoolStrategy of `ray.replicas`
actors, each owning one `Engine(**job.model)`, runs each batch as the local runner runs a
window (`run_rows`: render, prefix order, the typed engine API) and returns its records. The
driver commits every batch it receives as one atomic chunk of the local runner's id-keyed
commit log (jobs/writer.py), so a killed driver or actor loses only uncommitted batches,
which a rerun redoes, and `finalize` writes the file a local run writes. Rows and records
cross Ray pickled, so kept columns keep their types.
"""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

import pyarrow as pa
from rich.console import Console

from sglbatch.jobs.progress import JobStats
from sglbatch.jobs.reader import Row
from sglbatch.jobs.runner import JobRunner, make_record, run_rows
from sglbatch.jobs.spec import RAY_INSTALL, JobSpec
from sglbatch.jobs.writer import ResultWriter

try:
    import ray
    import ray.data
except ImportError:  # the job spec says so first; this is for callers that skip it
    raise ImportError(f"executor: ray needs Ray, which is not installed (fix: {RAY_INSTALL})"
                      ) from None

from sglbatch.jobs.ray_source import SKIPPED, list_input, plan_input, read_rows  # noqa: E402


class JobReplica:
    """A Ray Data callable class: one engine; a batch of pickled Rows in (column `row`), their
    pickled records out (column `record`). A row that cannot run gives an error record."""

    def __init__(self, job: JobSpec):
        from sglbatch.engine.engine import Engine

        self.job = job
        self.engine = Engine(**job.model)

    def run(self, rows: list[Row]) -> list[dict[str, Any]]:
        """The rows' records, in input order."""
        records: list[tuple[int, dict[str, Any]]] = []
        asyncio.run(run_rows(self.job, self.engine, rows, lambda row, result: records.append(
            (row.index, make_record(self.job, row, result)))))
        return [record for _, record in sorted(records, key=lambda r: r[0])]

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Column `row` (pickled Rows, or SKIPPED) in; column `record` (pickled records, or
        SKIPPED in the same places) out."""
        blobs = batch.column("row").to_pylist()
        rows = [pickle.loads(blob) for blob in blobs if blob != SKIPPED]
        records = iter(self.run(rows))  # in index order, as the rows came
        out = [SKIPPED if blob == SKIPPED else pickle.dumps(next(records)) for blob in blobs]
        return pa.table({"record": pa.array(out, pa.binary())})


class RayJobRunner(JobRunner):
    """A JobRunner whose rows run on Ray replicas; this process reads, skips and commits."""

    def __init__(self, job: JobSpec, shard: tuple[int, int] | None = None,
                 console: Console | None = None):
        super().__init__(job, None, shard, console)

    def run(self) -> JobStats:
        started = not ray.is_initialized()
        if started:
            ray.init(address=self.job.ray.address)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False  # ours shows
            self._files = list_input(self.job.input)
            self._plan = plan_input(ray.data, self.job.input, self._files)
            return super().run()
        finally:
            if started:
                ray.shutdown()

    def _count_rows(self) -> int | None:
        rows = self._plan.rows
        if self.shard is None:
            return rows
        # Without a filter the rows are indexes 0..rows-1; with one, which survive is unknown.
        return None if self.job.input.filter else len(range(self.shard[0], rows, self.shard[1]))

    def _run_rows(self, done: set, writer: ResultWriter) -> None:
        cfg = self.job.ray
        rows = read_rows(ray.data, self.job.input, self._files, self._plan, self.shard,
                         ray.put(frozenset(done)))
        ds = rows.map_batches(
            JobReplica, fn_constructor_kwargs={"job": self.job}, batch_format="pyarrow",
            batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.replicas),
            num_cpus=cfg.num_cpus_per_replica, num_gpus=cfg.num_gpus_per_replica)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for blob in batch.column("record").to_pylist():
                if blob == SKIPPED:
                    self.stats.skipped += 1
                    self._progress.advance()
                else:
                    self._add(writer, pickle.loads(blob))
            writer.flush()  # the batch is one atomic chunk
