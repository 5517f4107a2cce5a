"""Run one job: rows stream in windows, are rendered, ordered by shared prefix, sent
through the engine at most `max_inflight` at a time, and written back as they finish.

Exactly once: the writer commits finished records in atomic chunks and knows which ids are
done; a restarted run skips them. A row that cannot run becomes an error record."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from sglbatch.engine.api_types import GenerateOutput, GenerateRequest
from sglbatch.engine.chat_messages import validate_messages
from sglbatch.engine.client import EngineClient
from sglbatch.engine.errors import EngineError
from sglbatch.engine.sampling_params import SamplingParams
from sglbatch.engine.stats import EngineStats
from sglbatch.jobs.endpoint import EndpointClient
from sglbatch.jobs.order import order_by_prefix
from sglbatch.jobs.program import ProgramCall, ProgramEngine, ProgramOutput, program_backend
from sglbatch.jobs.progress import JobProgress, JobStats
from sglbatch.jobs.reader import Row, count_rows, iter_rows
from sglbatch.jobs.render import RowError, render_input, render_sampling
from sglbatch.jobs.spec import JobSpec
from sglbatch.jobs.writer import ResultWriter, shard_output_path

logger = logging.getLogger(__name__)


class TooManyErrors(RuntimeError):
    pass


@dataclass
class Prepared:
    row: Row
    request: GenerateRequest | ProgramCall
    order_key: tuple  # token ids (in-process), else the text: shared prefixes sort together


def prepare_request(job: JobSpec, engine: Any, row: Row) -> Prepared:
    """The row's request for `engine` (an EngineClient, EndpointClient or ProgramEngine);
    RowError when the row cannot run."""
    if row.error is not None:  # the reader could not read it
        raise RowError(row.error)
    sampling = render_sampling(job, row.data)
    if isinstance(engine, ProgramEngine):
        arguments = engine.arguments(row.data)
        key = json.dumps(arguments, sort_keys=True, default=str)
        return Prepared(row, ProgramCall(arguments, sampling), tuple(key))
    try:
        params = SamplingParams.from_dict(sampling)
    except ValueError as e:  # an unknown key in the row's sampling column
        raise RowError(str(e)) from None
    request = render_input(job, row)
    if job.endpoint is not None:  # the server tokenizes
        key = request if isinstance(request, str) else json.dumps(request)
        kind = "prompt" if isinstance(request, str) else "messages"
        return Prepared(row, GenerateRequest(**{kind: request}, sampling_params=params),
                        tuple(key))
    tokenizer = engine.tokenizer
    if isinstance(request, str):
        input_ids = tokenizer.encode(request)
    else:
        try:
            validate_messages(request)
        except ValueError as e:
            raise RowError(str(e)) from None
        try:
            input_ids = tokenizer.apply_chat_template(request)
        except Exception as e:  # a template that rejects these messages
            raise RowError(f"messages: the chat template rejected them: {e}") from e
    return Prepared(row, GenerateRequest(input_ids=input_ids, sampling_params=params),
                    tuple(input_ids))


def make_record(job: JobSpec, row: Row, result: GenerateOutput | str) -> dict[str, Any]:
    """The row's output record: id, index, kept columns, then text + meta_info (and a
    program's variables), or `error` (the message, or why the request was aborted)."""
    data = row.data or {}
    record = {"id": row.id, "index": row.index, **{c: data.get(c)
                                                   for c in job.output.keep_columns}}
    if isinstance(result, GenerateOutput):
        meta = result.meta_info
        if meta.finish_reason is None or meta.finish_reason.kind != "abort":
            variables = ({"variables": result.variables} if isinstance(result, ProgramOutput)
                         else {})
            return {**record, "text": result.text, **variables, "meta_info": meta.to_json()}
        result = f"aborted: {meta.finish_reason.message}"
    return {**record, "error": result}


async def run_rows(job: JobSpec, engine: Any, rows: list[Row],
                   emit: Callable[[Row, GenerateOutput | str], None]) -> None:
    """Render `rows`, order them by prefix (`order: prefix`) and run them at most
    `max_inflight` at a time; emit(row, output or error message) as each finishes."""
    prepared = []
    for row in rows:
        try:
            prepared.append(prepare_request(job, engine, row))
        except RowError as e:
            emit(row, str(e))
    if job.order == "prefix":
        prepared = order_by_prefix(prepared, lambda p: p.order_key)
    inflight = asyncio.Semaphore(job.max_inflight)

    async def one(p: Prepared) -> None:
        async with inflight:
            try:
                [out] = await engine.run_async([p.request])
            except (ValueError, EngineError) as e:  # a bad row, or a failed engine step
                emit(p.row, str(e))
                return
        emit(p.row, out)

    # Tasks are created in order and the semaphore is FIFO: requests reach the engine in
    # prefix order.
    await asyncio.gather(*(one(p) for p in prepared))


class JobRunner:
    def __init__(self, job: JobSpec, engine: Any, shard: tuple[int, int] | None = None,
                 console: Console | None = None):
        if job.program is not None:
            engine = ProgramEngine(job, program_backend(job, engine))
        self.job, self.engine, self.shard = job, engine, shard
        self.console = console or Console(stderr=True)
        self.output_path = shard_output_path(job.output.path, shard)
        self.stats = JobStats()

    def run(self) -> JobStats:
        writer = ResultWriter(self.job.output, self.output_path, chunk_rows=self.job.chunk_rows)
        done = writer.done_ids()
        total = self._count_rows()
        logger.info("job %s: %s rows, %d already done, output %s", self.job.name,
                    total if total is not None else "?", len(done), self.output_path)
        before = self._replica_stats()
        with JobProgress(self.console, self.job.name, total, self.stats) as progress:
            self._progress = progress
            try:
                self._run_rows(done, writer)
            except BaseException:
                writer.close()  # what finished is committed; a rerun resumes from there
                raise
            finally:
                if isinstance(self.engine, ProgramEngine):
                    self.engine.close()
        writer.finalize()
        self._record_replicas(before)
        logger.info("job %s finished: %s", self.job.name, self.stats.as_dict())
        return self.stats

    def _count_rows(self) -> int | None:
        """This run's rows (this shard's), for the progress bar; None when unknown."""
        total = count_rows(self.job.input)
        if total is not None and self.shard is not None:
            i, n = self.shard
            total = len(range(i, total, n))
        return total

    def _run_rows(self, done: set, writer: ResultWriter) -> None:
        """Run every input row whose id is not in `done`, adding its record to `writer`,
        window by window (a subclass may read and run them elsewhere)."""
        rows = iter_rows(self.job.input, self.shard)
        while window := list(itertools.islice(rows, self.job.window)):
            asyncio.run(self._run_window(self._todo(window, done), writer))

    def _todo(self, rows: list[Row], done: set) -> list[Row]:
        todo = [r for r in rows if r.id not in done]
        self.stats.skipped += len(rows) - len(todo)
        self._progress.advance(len(rows) - len(todo))
        return todo

    def _replica_stats(self) -> dict[int, EngineStats]:
        return self.engine.replica_stats() if isinstance(self.engine, EngineClient) else {}

    def _record_replicas(self, before: dict[int, EngineStats]) -> None:
        """Data parallel: what each replica did for this job (its stats before and after)."""
        after = self._replica_stats()
        if len(before) < 2:
            return
        for rank, now in after.items():
            then = before.get(rank, EngineStats())
            self.stats.replicas[rank] = {
                "rows": now.requests - then.requests,
                "prompt_tokens": now.prompt_tokens - then.prompt_tokens,
                "cached_tokens": now.cached_tokens - then.cached_tokens,
                "output_tokens": now.generation_tokens - then.generation_tokens}

    async def _run_window(self, rows: list[Row], writer: ResultWriter) -> None:
        try:
            await run_rows(self.job, self.engine, rows, lambda row, result: self._add(
                writer, make_record(self.job, row, result)))
        finally:
            if isinstance(self.engine, EndpointClient):  # its connections live in this loop
                await self.engine.aclose()

    def _add(self, writer: ResultWriter, record: dict[str, Any]) -> None:
        writer.add(record)
        s = self.stats
        s.rows += 1
        error = record.get("error")
        if error is None:
            meta = record["meta_info"]
            s.prompt_tokens += meta["prompt_tokens"]
            s.output_tokens += meta["completion_tokens"]
            s.cached_tokens += meta["cached_tokens"]
        else:
            logger.warning("row %r (index %d): %s", record["id"], record["index"], error)
            s.errors += 1
        self._progress.advance()
        limit = self.job.max_errors
        if error is not None and limit is not None and s.errors > limit:
            raise TooManyErrors(f"job {self.job.name}: {s.errors} errors exceed "
                                f"max_errors={limit}; the last: {error}")
