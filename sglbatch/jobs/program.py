"""`program:` jobs: each row's columns are the arguments of an `@sgl.function` from the job's
module, run on the job's model (in-process) or endpoint; a record keeps the program's text
and its named variables. Programs run on a thread pool (each program is mostly waiting on
its own `gen`s), so `max_inflight` of them are in flight and the engine batches their
requests."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import inspect
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sglbatch.engine.api_types import GenerateOutput, MetaInfo
from sglbatch.jobs.render import RowError
from sglbatch.jobs.spec import JobSpec

_TOKEN_FIELDS = ("prompt_tokens", "completion_tokens", "cached_tokens")


def load_program(spec: str) -> Any:
    """The `@sgl.function` named by 'path/to/module.py:function'."""
    from sglbatch.lang.function import SglFunction

    path, name = spec.rsplit(":", 1)
    module_name = "sglbatch_job_" + hashlib.sha1(path.encode()).hexdigest()[:12]
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(module)
    fn = getattr(module, name, None)
    if not isinstance(fn, SglFunction):
        raise ValueError(f"program: {name!r} in {path} is not an @sgl.function "
                         f"(got {type(fn).__name__})")
    return fn


def program_backend(job: JobSpec, engine: Any) -> Any:
    """The job's model engine, or a frontend backend for its endpoint."""
    if job.endpoint is None:
        return engine
    key = os.environ.get(job.endpoint.api_key_env) if job.endpoint.api_key_env else None
    if job.endpoint.api == "native":
        from sglbatch.lang.backend.runtime_endpoint import RuntimeEndpoint

        return RuntimeEndpoint(job.endpoint.url, api_key=key)
    from sglbatch.lang.backend.openai import OpenAI

    return OpenAI(job.endpoint.model or "default", base_url=job.endpoint.url.rstrip("/") + "/v1",
                  api_key=key or "EMPTY")


@dataclass
class ProgramCall:
    """One row's program run: the program's arguments and its program-wide sampling
    defaults (keyword arguments of `run`, as SGLang's programs take them)."""

    arguments: dict[str, Any]
    sampling: dict[str, Any]


@dataclass
class ProgramOutput(GenerateOutput):
    """A program's text, token totals over its `gen`s, and its named variables."""

    variables: dict[str, Any] = field(default_factory=dict)


class ProgramEngine:
    """Runs the job's program on one row's arguments per call."""

    def __init__(self, job: JobSpec, backend: Any):
        self.fn = load_program(job.program)
        self.backend = backend
        self.pool = ThreadPoolExecutor(job.max_inflight, thread_name_prefix="sglbatch-program")
        self._run_params = set(inspect.signature(self.fn.run).parameters) - {"args", "kwargs"}
        self._params = list(inspect.signature(self.fn.func).parameters.values())[1:]

    def arguments(self, row: dict[str, Any]) -> dict[str, Any]:
        """The row's columns that the program takes; a missing required one is a RowError."""
        missing = [p.name for p in self._params
                   if p.default is inspect.Parameter.empty and p.name not in row]
        if missing:
            raise RowError(f"program {self.fn.func.__name__}: the row has no column(s) "
                           f"{missing}")
        return {p.name: row[p.name] for p in self._params if p.name in row}

    async def run_async(self, calls: list[ProgramCall]) -> list[ProgramOutput]:
        for call in calls:
            unknown = sorted(set(call.sampling) - self._run_params)
            if unknown:
                raise ValueError(f"sampling: {unknown} cannot be program-wide defaults; set "
                                 "them on the program's gen calls")
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(self.pool, self._run, call)
                                           for call in calls)))

    def _run(self, call: ProgramCall) -> ProgramOutput:
        state = self.fn.run(**call.arguments, **call.sampling, backend=self.backend)
        try:
            state.sync()
        except Exception as e:  # the program's own error: the row's error record
            raise ValueError(f"program {self.fn.func.__name__}: {type(e).__name__}: {e}") \
                from None
        variables = dict(state.stream_executor.variables)
        # Token accounting comes from the gen calls (a select's meta holds its scores).
        metas = {name: m for name in variables
                 if isinstance(m := state.get_meta_info(name), dict) and "prompt_tokens" in m}
        totals = {f: sum(m.get(f) or 0 for m in metas.values()) for f in _TOKEN_FIELDS}
        # Round-trip through JSON so the record holds only what the writer can write.
        variables, metas = json.loads(json.dumps([variables, metas], default=str))
        return ProgramOutput(state.text(), [], MetaInfo(None, None, **totals,
                                                        extra={"variables": metas}),
                             variables=variables)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
