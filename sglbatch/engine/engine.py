"""`Engine`: the in-process engine. One background thread runs the loop
(schedule -> forward -> process output -> detokenize -> emit); callers submit typed
requests and receive typed outputs through a per-request sink.

The overlap schedule (SGLang's): step N+1 is scheduled and launched before step N's sampled
tokens are read, so on a GPU the host's work for both runs while the device computes. Step
N+1 names N's tokens by placeholder (`overlap.FutureTokenMap`); a request that N finished
drops its token from N+1."""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sglbatch.engine.api_types import EngineInfo, FinishReason, Sink
from sglbatch.engine.batch import Batch, LaunchedStep
from sglbatch.engine.client import EngineClient, Submission
from sglbatch.engine.config import DEFAULT_MODEL, EngineConfig
from sglbatch.engine.errors import ENGINE_ERROR_STATUS, EngineError
from sglbatch.engine.grammar import Grammar, GrammarCompiler
from sglbatch.engine.inbox import (
    Abort,
    AddRequests,
    FlushCache,
    Message,
    Reply,
    StartProfile,
    Stop,
    StopProfile,
)
from sglbatch.engine.inputs import RequestBatch, RequestInput, normalize_inputs
from sglbatch.engine.layers.linear import model_flops_per_token
from sglbatch.engine.model_runner import ModelRunner
from sglbatch.engine.model_source import resolve_model_path
from sglbatch.engine.output_processor import OutputProcessor, TrackedRequest
from sglbatch.engine.parallel.group import RankLost
from sglbatch.engine.parallel.launch import create_model_runner
from sglbatch.engine.profiler import ProfileSession
from sglbatch.engine.request import Req, derive_seed
from sglbatch.engine.scheduler import Scheduler
from sglbatch.engine.stats import EngineStats
from sglbatch.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from sglbatch.engine.trace import trace_range

logger = logging.getLogger(__name__)

# A transient failure fails the step's requests and the engine goes on; this many failed
# steps in a row (a broken device, say) stop it: every request fails, new ones are refused.
MAX_CONSECUTIVE_STEP_FAILURES = 3


class Engine(EngineClient):
    """`Engine(model_path=..., **engine_args)`; see `EngineConfig` for the arguments.

    All torch work (loading, the KV pool, every forward pass) happens on the engine thread.
    NOTE: with torch's GNU OpenMP, a second thread running parallel torch ops keeps its own
    team of worker threads; with more workers than cores they stop spin-waiting and every
    op pays a wake-up (measured: decode 35% slower). The caller's thread only tokenizes.
    """

    def __new__(cls, model_path: str = DEFAULT_MODEL, **kwargs: Any) -> Any:
        """`dp_size` > 1 gives the data-parallel front over that many replicas of this
        class, which callers use as they use one engine."""
        if kwargs.get("dp_size", 1) > 1:
            from sglbatch.engine.dp.front import DataParallelEngine

            return DataParallelEngine(cls, EngineConfig.from_kwargs(model_path=model_path,
                                                                    **kwargs))
        return super().__new__(cls)

    def __init__(self, model_path: str = DEFAULT_MODEL, **kwargs: Any):
        self.config = EngineConfig.from_kwargs(model_path=model_path, **kwargs)
        model_dir = resolve_model_path(self.config.model_path)
        self.tokenizer = Tokenizer(model_dir)
        self._seeds = random.Random(self.config.random_seed)
        self._tracked: dict[str, TrackedRequest] = {}
        # n > 1: the other samples of a prompt wait until the first one's prompt is cached.
        self._held: dict[str, list[TrackedRequest]] = {}
        self._grammar_compiler: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()
        self.stats = EngineStats()
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._stopped = False
        self._consecutive_failures = 0
        self._broken: str | None = None  # why the engine stopped serving, once it has
        self._profile: ProfileSession | None = None  # engine thread only
        # Launched, results not read yet (the overlap schedule); engine thread only.
        self._unread: tuple[Batch, LaunchedStep] | None = None
        self._last_trace: Path | None = None
        ready: queue.Queue[BaseException | None] = queue.Queue()
        self._thread = threading.Thread(target=self._engine_thread, args=(model_dir, ready),
                                        name="sglbatch-engine", daemon=True)
        self._thread.start()
        error = ready.get()
        if error is not None:
            self._thread.join()
            raise error

    def _engine_thread(self, model_dir: Any, ready: queue.Queue) -> None:
        """The engine thread: build the model side, report readiness, then loop."""
        threads = torch.get_num_threads()  # restored when the engine ends (below)
        try:
            if self.config.num_threads:
                torch.set_num_threads(self.config.num_threads)
            self.model_runner = create_model_runner(self.config, model_dir)
            # Tensor parallel: the other ranks get token values, not placeholders.
            self._overlap = not self.config.disable_overlap_schedule and \
                self.model_runner.peers is None
            self.scheduler = Scheduler(self.config, self.model_runner.memory)
            self.info = _engine_info(self.model_runner)
            self.output = OutputProcessor(self.tokenizer,
                                          self.model_runner.model_config.eos_token_ids,
                                          self.stats)
        except BaseException as e:  # re-raised in the caller's thread
            self._stopped = True
            if hasattr(self, "model_runner"):
                self.model_runner.close()
            torch.set_num_threads(threads)
            ready.put(e)
            return
        ready.put(None)
        try:
            self._loop()
        finally:
            self.model_runner.close()  # tensor parallel: the other ranks exit with the engine
            torch.set_num_threads(threads)

    # ---- public API (generate, run, stream and their async forms: EngineClient) ---------

    def submit(self, batch: RequestBatch, sink: Sink, stream: bool) -> Submission:
        inputs = self._normalize(batch)
        self._submit(inputs, sink, stream)
        return Submission(len(inputs), lambda: self._abort_all(inputs))

    def abort(self, rid: str) -> None:
        self._inbox.put(Abort(rid))

    def abort_all(self) -> None:
        for rid in list(self._tracked):  # a snapshot; list(dict) does not release the GIL
            self.abort(rid)

    def flush_cache(self) -> bool:
        """Empty the prefix cache. As SGLang, refused (False) while requests are in flight."""
        result: queue.Queue[bool] = queue.Queue()
        self._inbox.put(FlushCache(result.put))
        return result.get()

    def start_profile(self, output_dir: str | None = None, num_steps: int | None = None,
                      record_shapes: bool = False, with_stack: bool = False,
                      activities: list[str] | None = None) -> Path:
        """Start the torch profiler on the engine thread (as SGLang's /start_profile): its
        forward passes and the `sglbatch.*` ranges are recorded until `stop_profile`, or
        for `num_steps` engine steps. Returns the path the trace will be written to
        (default dir: $SGLANG_TORCH_PROFILER_DIR, else the temp dir). ValueError if a
        profile is already running or an argument is wrong."""
        session = ProfileSession(output_dir, name="sglbatch-engine", num_steps=num_steps,
                                 record_shapes=record_shapes, with_stack=with_stack,
                                 activities=activities)
        self._call_engine_thread(lambda reply: StartProfile(session, reply))
        return session.trace_path

    def stop_profile(self) -> Path:
        """Stop the profiler and write its Chrome trace; returns the file's path.
        ValueError if no profile is running."""
        return self._call_engine_thread(StopProfile)

    def _call_engine_thread(self, message: Callable[[Reply], Message]) -> Any:
        if self._stopped:
            raise RuntimeError("the engine has been shut down")
        result: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self._inbox.put(message(result.put))
        ok, value = result.get()
        if not ok:
            raise value
        return value

    def load(self) -> dict[str, float]:
        """What the engine holds now (read from another thread: a snapshot, not exact)."""
        scheduler, pool = self.scheduler, self.model_runner.kv_pool
        used = pool.num_slots - pool.num_free
        return {"num_running_reqs": len(scheduler.running) + bool(scheduler.chunked_req),
                "num_queue_reqs": len(scheduler.waiting),
                "num_used_tokens": used, "token_usage": used / pool.num_slots,
                "max_total_num_tokens": pool.num_slots}

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._inbox.put(Stop())
        self._thread.join()

    # ---- submission -------------------------------------------------------------------

    def _normalize(self, batch: RequestBatch) -> list[RequestInput]:
        if self._broken is not None:
            raise EngineError(self._broken)
        if self._stopped:
            raise RuntimeError("the engine has been shut down")
        return normalize_inputs(
            self.tokenizer, batch, vocab_size=self.model_runner.model_config.vocab_size,
            max_req_len=self.model_runner.max_req_len, compile_grammar=self._compile_grammar,
            allow_custom_logit_processor=self.config.enable_custom_logit_processor)

    def _compile_grammar(self, kind: str, source: str) -> Any:
        with self._grammar_lock:
            if self._grammar_compiler is None:
                self._grammar_compiler = GrammarCompiler(
                    self.tokenizer.hf, self.model_runner.model_config.vocab_size)
        return self._grammar_compiler.compile(kind, source)

    def _submit(self, inputs: list[RequestInput], sink: Sink, stream: bool) -> None:
        group: list[TrackedRequest] = []
        for index, inp in enumerate(inputs):
            params = inp.sampling_params
            seed = params.sampling_seed
            seed = self._seeds.getrandbits(62) if seed is None else \
                derive_seed(seed, inp.sample_index)
            req = Req(inp.rid, inp.input_ids, params, seed=seed,
                      logprob_options=inp.logprob_options,
                      grammar=Grammar(inp.compiled_grammar) if inp.compiled_grammar else None,
                      custom_logit_processor=inp.custom_logit_processor)
            detok = IncrementalDetokenizer(self.tokenizer, inp.input_ids,
                                           params.skip_special_tokens,
                                           params.spaces_between_special_tokens)
            group.append(TrackedRequest(req, index, sink, stream, detok))
            if len(group) == params.n:
                self._inbox.put(AddRequests(group))
                group = []

    def _abort_all(self, inputs: list[RequestInput]) -> None:
        for inp in inputs:
            self.abort(inp.rid)

    # ---- the loop (engine thread only below this line) ---------------------------------

    def _loop(self) -> None:
        """Nobody waits forever: a failed step fails the requests it touched, and if the
        loop itself breaks, every request in flight fails before the thread ends."""
        try:
            while self._drain_inbox(block=not self._busy):
                if not self._busy:
                    continue
                try:
                    self.step()
                except Exception as error:  # outside the forward: state may be half-updated
                    logger.exception("engine step failed; failing every request in flight")
                    # Reset before failing: a caller woken by its error sees the fresh state.
                    self._reset_scheduler()
                    self._fail_in_flight(_error_message(error))
                    self._count_failure(error)
            for req in self.scheduler.abort_all("engine shut down"):
                self._finish(req)
        except BaseException as error:
            logger.exception("the engine loop failed; failing every request in flight")
            self._broken = f"the engine stopped: {_error_message(error)}"
            self._fail_in_flight(self._broken)
        finally:
            if self._profile is not None:  # shut down mid-profile: keep what was recorded
                try:
                    self._stop_profile()
                except Exception:
                    logger.exception("writing the profile at shutdown failed")
            self._stopped = True

    @property
    def _busy(self) -> bool:
        return self.scheduler.has_work or self._unread is not None

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued messages; False once asked to stop."""
        while True:
            try:
                message = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            match message:
                case Stop():
                    return False
                case AddRequests(group):
                    self._add_group(group)
                case Abort(rid):
                    req = self.scheduler.abort(rid, "aborted by the client") or \
                        self._abort_held(rid)
                    if req is not None:
                        self._finish(req)
                case FlushCache(reply):
                    reply(self.scheduler.flush_cache())
                case StartProfile(session, reply):
                    _answer(reply, lambda: self._start_profile(session))
                case StopProfile(reply):
                    _answer(reply, self._stop_profile_command)

    def _start_profile(self, session: ProfileSession) -> Path:
        if self._profile is not None:
            raise ValueError("a profile is already running (trace: "
                             f"{self._profile.trace_path}); stop it first")
        session.start()
        self._profile = session
        return session.trace_path

    def _stop_profile_command(self) -> Path:
        if self._profile is None:
            last = f"; the last one was written to {self._last_trace}" \
                if self._last_trace else ""
            raise ValueError(f"no profile is running: start one first{last}")
        return self._stop_profile()

    def _stop_profile(self) -> Path:
        session, self._profile = self._profile, None
        self._last_trace = session.stop()
        return self._last_trace

    def _add_group(self, group: list[TrackedRequest]) -> None:
        """Queue a prompt's first sample; its other samples wait for its prompt to be
        cached (see `_release_held`), so the prompt is computed once."""
        leader, followers = group[0], group[1:]
        if self._broken is not None:  # submitted just before the engine stopped
            for tracked in group:
                self._send_error(tracked, self._broken)
            return
        for tracked in group:
            self._tracked[tracked.req.rid] = tracked
        if followers:
            self._held[leader.req.rid] = followers
        self._add(leader)

    def _add(self, tracked: TrackedRequest) -> None:
        # max_new_tokens=0 still runs the prefill, as SGLang: it caches the prompt (the
        # frontend's cache_prefix) and yields input logprobs (its `select`).
        self.scheduler.add_request(tracked.req)

    def _release_held(self, leader: Req) -> None:
        reason = leader.finish_reason
        for tracked in self._held.pop(leader.rid, []):
            if reason is not None and reason.kind == "abort":  # shutdown or engine error
                tracked.req.finish_reason = FinishReason.abort(reason.message)
                self._finish(tracked.req)
            else:
                self._add(tracked)

    def _abort_held(self, rid: str) -> Req | None:
        for followers in self._held.values():
            for tracked in followers:
                if tracked.req.rid == rid:
                    followers.remove(tracked)
                    tracked.req.finish_reason = FinishReason.abort("aborted by the client")
                    return tracked.req
        return None

    def step(self) -> None:
        """One scheduling step: run a batch, then hand out tokens and finished requests."""
        start = time.perf_counter()
        # The whole step in one range, which `bench offline --breakdown` divides among its
        # parts; a profile stops after it, so its last step is whole in the trace.
        with trace_range("sglbatch.step"):
            batch = self._step()
        if batch is None:
            return
        # A verify step is counted by the tokens it gave, as a decode step is.
        tokens = len(batch.reqs) + batch.accepted_drafts if batch.is_verify \
            else sum(batch.extend_lens)
        self.stats.on_step(batch.step_kind, len(batch.reqs), tokens, time.perf_counter() - start)
        if self._profile is not None and self._profile.step():  # num_steps reached
            try:
                self._stop_profile()
            except Exception:  # a failed export must not fail the requests
                logger.exception("writing the profile failed")

    def _step(self) -> Batch | None:
        """The batch launched, if any (a profile counts those steps)."""
        if self._unread is not None and (self.scheduler.may_retract or
                                         self.scheduler.may_speculate):
            # A retracted request recomputes from its tokens' values; a draft continues them.
            self._read_unread()
        with trace_range("sglbatch.schedule"):
            batch = self.scheduler.schedule()
        if batch is None:
            self._read_unread()
            return None
        try:
            launched = self.model_runner.launch(batch)
        except Exception as error:  # scheduler state is as schedule() left it: recoverable
            logger.exception("engine step failed in the forward pass; failing its %d "
                             "request(s)", len(batch.reqs))
            self._fail_batch(batch, _error_message(error))
            self._count_failure(error)
            self._read_unread()
            return None
        self._consecutive_failures = 0
        self.scheduler.on_launched(batch, launched.placeholders)
        self._read_unread()
        self._unread = batch, launched
        if not self._overlap or batch.is_verify or \
                any(r.reads_sampled_tokens for r in batch.reqs):
            self._read_unread()
        return batch

    def _read_unread(self) -> None:
        """Read the launched step's results: hand out its tokens and finished requests."""
        if self._unread is None:
            return
        (batch, launched), self._unread = self._unread, None
        with trace_range("sglbatch.wait_device"):
            result = launched.result()
        with trace_range("sglbatch.process_output"):
            self.scheduler.process_output(batch, result, self._on_token)
            for req in self.scheduler.release_finished():
                self._finish(req)

    def _on_token(self, req: Req) -> None:
        """A request got a token (or finished its prefill): stream it, decide its finish."""
        if self._held:  # parallel samples wait for their prompt's first step
            self._release_held(req)
        self.output.on_step(self._tracked[req.rid])

    # ---- failures (engine thread) -------------------------------------------------------

    def _fail_batch(self, batch: Batch, message: str) -> None:
        """Fail the requests of a batch whose forward raised; the rest run on."""
        for req in self.scheduler.fail_batch(batch):
            self._fail_request(req.rid, message)

    def _fail_in_flight(self, message: str) -> None:
        for rid in list(self._tracked):
            self._fail_request(rid, message)

    def _fail_request(self, rid: str, message: str) -> None:
        """Finish a request (and the samples held for it) with an engine error."""
        tracked = self._tracked.pop(rid, None)
        if tracked is None:
            return
        self._send_error(tracked, message)
        for follower in self._held.pop(rid, []):
            self._tracked.pop(follower.req.rid, None)
            self._send_error(follower, message)

    def _send_error(self, tracked: TrackedRequest, message: str) -> None:
        self.output.send_error(tracked, FinishReason.abort(message, ENGINE_ERROR_STATUS))

    def _reset_scheduler(self) -> None:
        """A fresh scheduler over emptied pools, once no request holds KV any more."""
        self.model_runner.memory.reset()
        self.scheduler = Scheduler(self.config, self.model_runner.memory)
        self._unread = None

    def _count_failure(self, error: Exception) -> None:
        self._consecutive_failures += 1
        if isinstance(error, RankLost):  # a tensor-parallel rank is gone: no step can run
            self._broken = f"the engine stopped: {error}; restart it"
        elif self._consecutive_failures < MAX_CONSECUTIVE_STEP_FAILURES:
            return
        else:
            self._broken = (f"the engine stopped after {self._consecutive_failures} failed "
                            f"steps in a row (last: {_error_message(error)}); restart it")
        logger.error("%s", self._broken)
        self._reset_scheduler()
        self._fail_in_flight(self._broken)

    def _finish(self, req: Req) -> None:
        self._release_held(req)
        self.output.finish(self._tracked.pop(req.rid))


def _engine_info(runner: ModelRunner) -> EngineInfo:
    return EngineInfo(
        model_dir=str(runner.model_dir), context_len=runner.context_len,
        max_req_len=runner.max_req_len, vocab_size=runner.model_config.vocab_size,
        max_total_num_tokens=runner.kv_pool.num_slots,
        dtype=str(runner.dtype).removeprefix("torch."), device=str(runner.device),
        flops_per_token=model_flops_per_token(runner.model))


def _answer(reply: Reply, compute: Callable[[], Any]) -> None:
    """Reply with what `compute` returns, or with the exception it raised."""
    try:
        reply((True, compute()))
    except Exception as e:
        reply((False, e))


def _error_message(error: BaseException) -> str:
    return f"engine error: {type(error).__name__}: {error}"
