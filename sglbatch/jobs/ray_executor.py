"""`executor: ray`: a job's rows on Ray Data, one engine per Ray actor, committed by the driver.

The driver reads the input with the local runner's reader (the same ids, indexes, filter,
limit and error rows), drops the ids its ResultWriter has already committed, and hands the
rest to Ray Data: `map_batches` over an ActorPoolStrategy of `ray.replicas` actors, each
owning one `Engine(**job.model)`, runs each batch as the local runner runs a window
(`run_rows`: render, prefix order, the typed engine API) and returns its records. The driver
commits every batch it receives as one atomic chunk of the local runner's commit log, so a
killed driver or actor loses only uncommitted batches, which a rerun redoes, and `finalize`
writes the file a local run writes. Rows and records cross Ray pickled, so kept columns keep
their types.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from rich.console import Console

from sglbatch.jobs.reader import Row
from sglbatch.jobs.runner import JobRunner, make_record, run_rows
from sglbatch.jobs.spec import RAY_INSTALL, JobSpec
from sglbatch.jobs.writer import ResultWriter


def import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise RuntimeError("executor: ray needs Ray, which is not installed "
                           f"(fix: {RAY_INSTALL})") from None
    return ray


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
        rows = [pickle.loads(blob) for blob in batch.column("row").to_pylist()]
        return pa.table({"record": pa.array([pickle.dumps(r) for r in self.run(rows)],
                                            pa.binary())})


class RayJobRunner(JobRunner):
    """A JobRunner whose rows run on Ray replicas; this process reads, skips and commits."""

    def __init__(self, job: JobSpec, shard: tuple[int, int] | None = None,
                 console: Console | None = None):
        super().__init__(job, None, shard, console)

    def _run_rows(self, rows: Iterator[Row], done: set, writer: ResultWriter) -> None:
        ray = import_ray()
        todo = self._todo(list(rows), done)
        if not todo:
            return
        cfg = self.job.ray
        started = not ray.is_initialized()
        if started:
            ray.init(address=cfg.address)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False  # ours shows
            ds = ray.data.from_items([{"row": pickle.dumps(r)} for r in todo]).map_batches(
                JobReplica, fn_constructor_kwargs={"job": self.job}, batch_format="pyarrow",
                batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.replicas),
                num_cpus=cfg.num_cpus_per_replica, num_gpus=cfg.num_gpus_per_replica)
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for blob in batch.column("record").to_pylist():
                    self._add(writer, pickle.loads(blob))
                writer.flush()  # the batch is one atomic chunk
        finally:
            if started:
                ray.shutdown()
