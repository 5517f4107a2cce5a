"""The caller's side of an engine: SGLang's dict API converted at the door, the typed API,
and outputs collected from a sink. `Engine` runs the requests itself; the data-parallel
front relays them to replicas. Both implement `submit`, so every caller sees one API."""

from __future__ import annotations

import asyncio
import queue
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sglbatch.engine.api_types import GenerateOutput, GenerateRequest, Sink, StreamDelta
from sglbatch.engine.errors import EngineError
from sglbatch.engine.inputs import RequestBatch, requests_from_generate_args
from sglbatch.engine.stats import EngineStats


@dataclass
class Submission:
    """What `submit` gives back: how many outputs will reach the sink (n > 1 expands a
    request), and how to abort them all."""

    num_outputs: int
    abort: Callable[[], None]


class EngineClient(ABC):
    @abstractmethod
    def submit(self, batch: RequestBatch, sink: Sink, stream: bool) -> Submission:
        """Validate the batch (ValueError, in the caller's thread, before anything runs) and
        submit it; outputs go to `sink` from another thread."""

    def loads(self) -> list[dict[str, float]]:
        """`load()` of each replica (one engine: itself)."""
        return [self.load()]

    def replica_stats(self) -> dict[int, EngineStats]:
        """A snapshot of each live replica's statistics, by data-parallel rank."""
        return {0: self.stats.snapshot()}

    def __enter__(self) -> EngineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- SGLang's dict API -------------------------------------------------------------

    def generate(self, prompt: Any = None, sampling_params: Any = None, input_ids: Any = None,
                 messages: Any = None, rid: Any = None, stream: bool = False,
                 **extras: Any) -> Any:
        """SGLang's blocking `generate`, with its dict arguments and dict results. One prompt
        -> a dict; a list -> a list of dicts (same order; a prompt with n > 1 gives n
        consecutive dicts). With `stream=True`, an iterator of delta dicts (each carries
        `index` for batches). `extras`: SGLang's return_logprob, logprob_start_len,
        top_logprobs_num, token_ids_logprob, return_text_in_logprobs,
        custom_logit_processor. Typed callers use `run` / `stream`."""
        batch = requests_from_generate_args(prompt, input_ids, messages, sampling_params, rid,
                                            **extras)
        if stream:
            return _json_deltas(self._stream(batch), batch.returns_list)
        outputs = [out.to_json() for out in self._run(batch)]
        return outputs if batch.returns_list else outputs[0]

    async def async_generate(self, prompt: Any = None, sampling_params: Any = None,
                             input_ids: Any = None, messages: Any = None, rid: Any = None,
                             stream: bool = False, **extras: Any) -> Any:
        """As SGLang: awaits the final dict(s), or with `stream=True` returns an async
        iterator of delta dicts. Closing the iterator early aborts the request(s)."""
        batch = requests_from_generate_args(prompt, input_ids, messages, sampling_params, rid,
                                            **extras)
        if stream:
            return _async_json_deltas(self._stream_async(batch), batch.returns_list)
        outputs = [out.to_json() for out in await self._run_async(batch)]
        return outputs if batch.returns_list else outputs[0]

    # ---- the typed API ----------------------------------------------------------------

    def run(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        """Generate for each request, blocking; a request with n > 1 gives n consecutive
        outputs. Raises ValueError (naming the field) before anything runs, EngineError if
        an engine failure took a request down."""
        return self._run(RequestBatch(requests, len(requests) > 1))

    async def run_async(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        """`run` for async callers; cancelling it aborts the requests."""
        return await self._run_async(RequestBatch(requests, len(requests) > 1))

    def stream(self, requests: list[GenerateRequest]) -> Iterator[StreamDelta]:
        """Deltas as tokens arrive (`index` says whose); validated and submitted now.
        Closing the iterator early aborts the requests."""
        return self._stream(RequestBatch(requests, len(requests) > 1))

    async def stream_async(self, requests: list[GenerateRequest]) -> AsyncIterator[StreamDelta]:
        """`stream` for async callers."""
        return self._stream_async(RequestBatch(requests, len(requests) > 1))

    # ---- collecting outputs -------------------------------------------------------------

    def _run(self, batch: RequestBatch) -> list[GenerateOutput]:
        results: queue.Queue[tuple[int, GenerateOutput]] = queue.Queue()
        started = self.submit(batch, lambda i, out: results.put((i, out)), stream=False)
        outputs: list[GenerateOutput | None] = [None] * started.num_outputs
        while any(o is None for o in outputs):
            i, out = results.get()
            outputs[i] = out
        _raise_engine_errors(outputs)
        return outputs

    async def _run_async(self, batch: RequestBatch) -> list[GenerateOutput]:
        loop = asyncio.get_running_loop()
        results: asyncio.Queue[tuple[int, GenerateOutput]] = asyncio.Queue()
        started = self.submit(batch, lambda i, out: loop.call_soon_threadsafe(
            results.put_nowait, (i, out)), stream=False)
        outputs: list[GenerateOutput | None] = [None] * started.num_outputs
        try:
            while any(o is None for o in outputs):
                i, out = await results.get()
                outputs[i] = out
        except asyncio.CancelledError:  # the caller gave up (e.g. its client disconnected)
            started.abort()
            raise
        _raise_engine_errors(outputs)
        return outputs

    def _stream(self, batch: RequestBatch) -> Iterator[StreamDelta]:
        results: queue.Queue[tuple[int, GenerateOutput]] = queue.Queue()
        # Started here, not in the generator, so bad input raises before iteration.
        started = self.submit(batch, lambda i, out: results.put((i, out)), stream=True)
        return _iter_stream(results, started)

    def _stream_async(self, batch: RequestBatch) -> AsyncIterator[StreamDelta]:
        loop = asyncio.get_running_loop()
        results: asyncio.Queue[tuple[int, GenerateOutput]] = asyncio.Queue()
        started = self.submit(batch, lambda i, out: loop.call_soon_threadsafe(
            results.put_nowait, (i, out)), stream=True)
        return _aiter_stream(results, started)


def _iter_stream(results: queue.Queue, started: Submission) -> Iterator[StreamDelta]:
    remaining = started.num_outputs
    try:
        while remaining:
            delta = _stream_delta(results.get())
            remaining -= delta.finished
            _raise_engine_errors([delta])
            yield delta
    finally:
        if remaining:  # the caller stopped early: free what it no longer wants
            started.abort()


async def _aiter_stream(results: asyncio.Queue, started: Submission
                        ) -> AsyncIterator[StreamDelta]:
    remaining = started.num_outputs
    try:
        while remaining:
            delta = _stream_delta(await results.get())
            remaining -= delta.finished
            _raise_engine_errors([delta])
            yield delta
    finally:
        if remaining:
            started.abort()


def _raise_engine_errors(outputs: list[GenerateOutput]) -> None:
    """Raise EngineError if an engine failure finished any of `outputs`."""
    errors = [out.finish_reason.engine_error for out in outputs
              if out.finish_reason is not None and out.finish_reason.engine_error]
    if errors:
        failed = f"{len(errors)} of {len(outputs)} requests failed: " if len(outputs) > 1 else ""
        raise EngineError(failed + errors[0])


def _stream_delta(item: tuple[int, GenerateOutput]) -> StreamDelta:
    index, out = item
    return StreamDelta(out.text, out.output_ids, out.meta_info, index=index)


def _json_deltas(deltas: Iterator[StreamDelta], with_index: bool) -> Iterator[dict[str, Any]]:
    """SGLang's delta dicts; closing this closes (and so aborts) the typed stream."""
    try:
        for delta in deltas:
            yield delta.to_json(with_index)
    finally:
        deltas.close()


async def _async_json_deltas(deltas: AsyncIterator[StreamDelta], with_index: bool
                             ) -> AsyncIterator[dict[str, Any]]:
    try:
        async for delta in deltas:
            yield delta.to_json(with_index)
    finally:
        await deltas.aclose()
