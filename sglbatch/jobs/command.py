"""`sglbatch run` and `sglbatch merge`: the job file's jobs in sequence, one engine per
distinct `model`, each job logging to a file next to its output."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.panel import Panel

from sglbatch.jobs.progress import summary_table
from sglbatch.jobs.reader import count_rows, iter_rows
from sglbatch.jobs.render import RowError, render_input, render_sampling
from sglbatch.jobs.spec import JobSpec, load_jobs
from sglbatch.jobs.writer import merge_outputs, shard_output_path

logger = logging.getLogger(__name__)

DRY_RUN_ROWS = 3


def parse_shard(value: str | None) -> tuple[int, int] | None:
    """`--shard i/n`, else SLURM array variables, else None (the whole input)."""
    if value is not None:
        try:
            i, n = (int(x) for x in value.split("/"))
        except ValueError:
            raise ValueError(f"--shard {value!r}: expected i/n, e.g. 0/4") from None
        if not 0 <= i < n:
            raise ValueError(f"--shard {value!r}: need 0 <= i < n")
        return i, n
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    task = int(env["SLURM_ARRAY_TASK_ID"])
    first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    if "SLURM_ARRAY_TASK_COUNT" in env:
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
    else:
        count = int(env["SLURM_ARRAY_TASK_MAX"]) - first + 1
    return task - first, count


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """Everything logged while a job runs also goes to `<output>.log`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(min(old_level, logging.INFO) if old_level else logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def run_jobs(path: str, shard: tuple[int, int] | None, dry_run: bool, console: Console,
             executor: str | None = None) -> int:
    jobs = load_jobs(path, executor)
    if dry_run:
        for job in jobs:
            _dry_run(job, console)
        return 0
    from sglbatch.engine.engine import Engine
    from sglbatch.jobs.endpoint import EndpointClient, EndpointUnavailable
    from sglbatch.jobs.runner import JobRunner, TooManyErrors

    engine, engine_args = None, None
    try:
        for job in jobs:
            if job.executor == "ray":  # the engines live in Ray actors
                from sglbatch.jobs.ray_executor import RayJobRunner

                runner = RayJobRunner(job, shard, console)
            else:
                # Consecutive jobs on one model share its engine; an endpoint job talks HTTP.
                if job.model is not None and job.model != engine_args:
                    if engine is not None:
                        engine.shutdown()
                    with console.status(f"loading {job.model['model_path']}..."):
                        engine = Engine(**job.model)
                    engine_args = job.model
                target = EndpointClient(job.endpoint) if job.endpoint is not None else engine
                runner = JobRunner(job, target, shard, console)
            output = runner.output_path
            with _log_to(output.with_name(output.name + ".log")):
                try:
                    stats = runner.run()
                except (TooManyErrors, EndpointUnavailable) as e:
                    console.print(f"[red]error:[/red] {e}")
                    return 1
            console.print(summary_table(job.name, stats, str(output)))
    finally:
        if engine is not None:
            engine.shutdown()
    return 0


def _dry_run(job: JobSpec, console: Console) -> None:
    """Validate the spec (already done by loading it) and show the first requests."""
    total = count_rows(job.input)
    source = job.model["model_path"] if job.model else job.endpoint.url
    console.print(f"[bold]job {job.name}[/bold]: {', '.join(map(str, job.input.paths))} "
                  f"({total if total is not None else '?'} rows) -> {job.output.path} "
                  f"via {source}; order={job.order}, mode={job.output.mode}")
    for shown, row in enumerate(iter_rows(job.input)):
        if shown == DRY_RUN_ROWS:
            break
        try:
            if job.program is not None and row.error is None:
                request = f"program {job.program}({', '.join(row.data)})"
            else:
                request = render_input(job, row)
            body = f"{request}\n[dim]sampling: {render_sampling(job, row.data)}"
            console.print(Panel(body, title=f"row {row.id!r}", expand=False))
        except RowError as e:
            console.print(Panel(f"[red]{e}", title=f"row {row.id!r}: error", expand=False))


def merge_jobs(path: str, num_shards: int, console: Console) -> int:
    """Join each job's shard outputs into its output path, every row exactly once. The
    output is replaced only by a complete merge: a shortfall leaves it as it was."""
    if num_shards < 1:
        raise ValueError(f"--shards {num_shards}: need at least 1 (the n of --shard i/n)")
    for job in load_jobs(path):
        parts = [shard_output_path(job.output.path, (i, num_shards)) for i in range(num_shards)]
        missing = [str(p) for p in parts if not p.exists()]
        if missing:
            raise ValueError(f"job {job.name}: shard outputs missing: {', '.join(missing)} "
                             "(fix: run those shards to completion first)")
        out = job.output.path
        staged = out.with_name(f".{out.name}.merging")
        try:
            report = merge_outputs(parts, staged, job.output.format, sort_output=True,
                                   expected_ids=count_rows(job.input))
            if report.missing:
                raise ValueError(f"job {job.name}: the shards hold {report.rows} rows, "
                                 f"{report.missing} fewer than the input's "
                                 f"{report.expected_ids} (fix: run the shards again: they "
                                 "resume and finish)")
            os.replace(staged, out)
        finally:
            staged.unlink(missing_ok=True)
        console.print(f"job {job.name}: merged {len(parts)} shards into {out}: "
                      f"{report.rows} rows")
    return 0
