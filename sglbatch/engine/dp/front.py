"""`DataParallelEngine`: `dp_size` replicas (processes, each an `Engine` with its own
scheduler and KV pool) behind one `EngineClient`, so `Engine`, `serve`, `run` and `bench`
see one engine. Each request of a call is routed on its own (see router.py); a call's
requests may so run on several replicas, and their outputs come back in the call's order.

If a replica dies, the requests it had fail with an EngineError, it takes no new ones, and
the others keep serving. Replicas exit when the front shuts down or goes away.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import logging
import multiprocessing
import os
import queue
import threading
from typing import Any

from sglbatch.engine.api_types import (
    EngineInfo,
    FinishReason,
    GenerateOutput,
    GenerateRequest,
    MetaInfo,
    Sink,
)
from sglbatch.engine.client import EngineClient, Submission
from sglbatch.engine.config import EngineConfig
from sglbatch.engine.dp.replica import replica_main
from sglbatch.engine.dp.router import Router
from sglbatch.engine.errors import ENGINE_ERROR_STATUS, EngineError
from sglbatch.engine.inputs import RequestBatch
from sglbatch.engine.model_source import resolve_model_path
from sglbatch.engine.stats import EngineStats
from sglbatch.engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0


@dataclasses.dataclass(eq=False)
class _Part:
    """The share of one call that one replica runs: which of the call's outputs it gives."""

    replica: int
    call: int
    sink: Sink
    positions: list[int]  # the call's output index of each of this part's outputs
    finished: set[int] = dataclasses.field(default_factory=set)
    accepted: queue.Queue = dataclasses.field(default_factory=queue.Queue)  # None or error

    @property
    def left(self) -> int:
        return len(self.positions) - len(self.finished)

    def deliver(self, index: int, out: GenerateOutput) -> bool:
        """Pass an output on; True once the part is finished."""
        if out.finish_reason is not None:
            self.finished.add(index)
        self.sink(self.positions[index], out)
        return self.left == 0

    def fail(self, reason: FinishReason) -> None:
        """Finish every output not finished yet with `reason`."""
        self.accepted.put(None)  # a caller still waiting to hear "accepted" hears it
        for index in range(len(self.positions)):
            if index not in self.finished:
                self.deliver(index, GenerateOutput("", [], MetaInfo(None, reason)))


class _Replica:
    def __init__(self, rank: int, process: multiprocessing.Process, conn: Any):
        self.rank = rank
        self.process = process
        self.conn = conn
        self.send_lock = threading.Lock()
        self.alive = True
        self.in_flight = 0  # outputs not finished yet (the router's load)
        self.info: EngineInfo | None = None

    def send(self, message: tuple) -> bool:
        """False when the replica's end of the pipe is gone (its reader notices the death)."""
        with self.send_lock:
            try:
                self.conn.send(message)
            except OSError:  # BrokenPipeError, a closed connection
                return False
        return True


class DataParallelEngine(EngineClient):
    """Created by `Engine(dp_size=N, ...)`; `engine_cls` is the class each replica runs."""

    def __init__(self, engine_cls: type, config: EngineConfig):
        self.config = config
        self.tokenizer = Tokenizer(resolve_model_path(config.model_path))
        self._lock = threading.Lock()  # parts, replica loads, routing
        self._parts: dict[int, _Part] = {}  # by call id, until finished
        self._unanswered: dict[int, _Part] = {}  # by call id, until accepted or rejected
        self._ids = itertools.count()
        self._replies: dict[int, tuple[int, queue.Queue]] = {}  # id -> (replica, answer)
        self._stopped = False
        self._replicas = self._start_replicas(engine_cls)
        self.info = self._replicas[0].info
        self.router = Router(config.dp_size, config.load_balance_method,
                             max_tree_tokens=self.info.max_total_num_tokens,
                             seed=config.random_seed)
        for replica in self._replicas:
            threading.Thread(target=self._read, args=(replica,), daemon=True,
                             name=f"sglbatch-dp-{replica.rank}").start()
        atexit.register(self.shutdown)  # before multiprocessing joins the replicas at exit

    def _start_replicas(self, engine_cls: type) -> list[_Replica]:
        config = self.config
        # On the CPU the replicas (and their tensor-parallel ranks) split the cores; on CUDA
        # each gets its own GPUs.
        cores = len(os.sched_getaffinity(0))
        threads = config.num_threads or max(1, cores // (config.dp_size * config.tp_size))
        ctx = multiprocessing.get_context("spawn")  # no fork of a process running threads
        replicas = []
        for rank in range(config.dp_size):
            kwargs = {**dataclasses.asdict(config), "dp_size": 1,
                      "base_gpu_id": config.base_gpu_id + rank * config.tp_size}
            if config.device == "cpu":
                kwargs["num_threads"] = threads
            front_end, replica_end = ctx.Pipe()
            # Not a daemon: a replica may start its own tensor-parallel ranks.
            process = ctx.Process(target=replica_main, args=(engine_cls, kwargs, replica_end),
                                  name=f"sglbatch-dp-{rank}")
            process.start()
            replica_end.close()
            replicas.append(_Replica(rank, process, front_end))
        failures = []
        for replica in replicas:  # they load in parallel; wait for each
            try:
                kind, value = replica.conn.recv()
            except EOFError:
                kind, value = "failed", f"the process exited ({replica.process.exitcode})"
            if kind == "ready":
                replica.info = value
            else:
                failures.append(f"replica {replica.rank}: {value}")
        if failures:
            for replica in replicas:
                _stop(replica)
            raise RuntimeError("data-parallel replicas failed to start: " + "; ".join(failures))
        logger.info("data parallel: %d replicas, %d KV slots each", len(replicas),
                    replicas[0].info.max_total_num_tokens)
        return replicas

    # ---- requests ---------------------------------------------------------------------

    def submit(self, batch: RequestBatch, sink: Sink, stream: bool) -> Submission:
        if self._stopped:
            raise RuntimeError("the engine has been shut down")
        routed = [0] * len(self._replicas)  # this call's requests count as load already
        routes = []
        for request in batch.requests:
            routes.append(self._route(request, routed))
            routed[routes[-1]] += request.sampling_params.n
        shares: dict[int, list[int]] = {}
        for i, replica in enumerate(routes):
            shares.setdefault(replica, []).append(i)
        first_output = list(itertools.accumulate(
            (r.sampling_params.n for r in batch.requests), initial=0))
        parts = []
        for replica, indices in shares.items():
            positions = [first_output[i] + j for i in indices
                         for j in range(batch.requests[i].sampling_params.n)]
            part = _Part(replica, next(self._ids), sink, positions)
            share = RequestBatch([batch.requests[i] for i in indices], batch.prompts_are_list,
                                 positions=[batch.positions[i] if batch.positions else i
                                            for i in indices])
            parts.append(part)
            with self._lock:
                alive = self._replicas[replica].alive
                if alive:  # else it died since routing: fail the part below
                    self._parts[part.call] = self._unanswered[part.call] = part
                    self._replicas[replica].in_flight += part.left
            if alive:
                self._send_or_fail(part, ("submit", part.call, share, stream))
            else:
                part.fail(self._death_reason(self._replicas[replica]))
        submission = Submission(first_output[-1], lambda: self._abort(parts))
        errors = [error for part in parts if (error := part.accepted.get()) is not None]
        if errors:
            submission.abort()
            raise errors[0]
        return submission

    def _route(self, request: GenerateRequest, routed: list[int]) -> int:
        ids = self._routing_ids(request)
        with self._lock:
            loads = [r.in_flight + extra for r, extra in zip(self._replicas, routed)]
            alive = [r.alive for r in self._replicas]
            if not any(alive):
                raise EngineError("every data-parallel replica has died; restart the engine")
            return self.router.choose(ids, loads, alive)

    def _routing_ids(self, request: GenerateRequest) -> list[int]:
        """The prompt's token ids, as near as the front can tell (a prompt that does not
        tokenize here is routed by load; its replica reports what is wrong with it)."""
        try:
            if request.input_ids is not None:
                return list(request.input_ids)
            if request.prompt is not None:
                return self.tokenizer.encode(request.prompt)
            return self.tokenizer.apply_chat_template(request.messages)
        except Exception:  # noqa: BLE001 - validation is the replica's job
            return []

    def _send_or_fail(self, part: _Part, message: tuple) -> None:
        replica = self._replicas[part.replica]
        if not replica.send(message):
            self._replica_died(replica)

    def _abort(self, parts: list[_Part]) -> None:
        for part in parts:
            replica = self._replicas[part.replica]
            if replica.alive:
                replica.send(("abort", part.call))

    def abort(self, rid: str) -> None:
        self._broadcast(("abort_rid", rid))

    def abort_all(self) -> None:
        self._call_all("abort_all")

    # ---- replies from the replicas --------------------------------------------------------

    def _read(self, replica: _Replica) -> None:
        while True:
            try:
                message = replica.conn.recv()
            except (EOFError, OSError):
                break
            match message:
                case ("output", call, index, out):
                    with self._lock:
                        part = self._parts.get(call)
                        if part is not None and out.finish_reason is not None:
                            replica.in_flight -= 1
                    if part is not None and part.deliver(index, out):
                        with self._lock:
                            self._parts.pop(call, None)
                case ("accepted", call, _):
                    with self._lock:
                        part = self._unanswered.pop(call, None)  # None: failed already
                    if part is not None:
                        part.accepted.put(None)
                case ("rejected", call, kind, text):
                    with self._lock:
                        part = self._unanswered.pop(call, None)
                        if part is not None:
                            self._parts.pop(call, None)
                            replica.in_flight -= part.left
                    if part is not None:
                        part.accepted.put(EngineError(text) if kind == "EngineError"
                                          else ValueError(text))
                case ("reply", reply, ok, value):
                    with self._lock:
                        _, answer = self._replies.pop(reply)
                    answer.put((ok, value))
        if not self._stopped:
            self._replica_died(replica)

    def _replica_died(self, replica: _Replica) -> None:
        """Fail what the replica had; the others keep serving."""
        with self._lock:
            if not replica.alive:
                return
            replica.alive = False
            parts = [p for p in self._parts.values() if p.replica == replica.rank]
            for part in parts:
                del self._parts[part.call]
                self._unanswered.pop(part.call, None)
            replica.in_flight = 0
            replies = [self._replies.pop(reply_id) for reply_id, (rank, _) in
                       list(self._replies.items()) if rank == replica.rank]
        reason = self._death_reason(replica)
        logger.error("%s", reason.message)
        for part in parts:
            part.fail(reason)
        for _, answer in replies:  # a caller waiting on this replica hears it died
            answer.put((False, EngineError(reason.message)))

    @staticmethod
    def _death_reason(replica: _Replica) -> FinishReason:
        replica.process.join(1.0)  # its exit code, when it has one
        return FinishReason.abort(
            f"engine error: data-parallel replica {replica.rank} died (exit code "
            f"{replica.process.exitcode}); its requests failed, the others go on",
            ENGINE_ERROR_STATUS)

    # ---- the engine's other methods, on every replica ------------------------------------

    def _call(self, replica: _Replica, method: str, *args: Any) -> Any:
        reply_id = next(self._ids)
        answer: queue.Queue = queue.Queue()
        with self._lock:
            if not replica.alive:
                raise EngineError(f"data-parallel replica {replica.rank} has died")
            self._replies[reply_id] = (replica.rank, answer)
        if not replica.send(("call", reply_id, method, args)):
            self._replica_died(replica)  # answers this call's reply with the error
        ok, value = answer.get()
        if not ok:
            raise value
        return value

    def _call_all(self, method: str, *args: Any) -> list[Any]:
        return [self._call(r, method, *args) for r in self._replicas if r.alive]

    def _broadcast(self, message: tuple) -> None:
        for replica in self._replicas:
            if replica.alive:
                replica.send(message)

    def flush_cache(self) -> bool:
        return all(self._call_all("flush_cache"))

    def load(self) -> dict[str, float]:
        """The replicas' loads summed (token_usage: of all their KV slots)."""
        loads = self.loads()
        total = {k: sum(load[k] for load in loads) for k in loads[0]} if loads else {}
        if total:
            total["token_usage"] = total["num_used_tokens"] / total["max_total_num_tokens"]
        return total

    def loads(self) -> list[dict[str, float]]:
        return [{**self._call(r, "load"), "dp_rank": r.rank, "pid": r.process.pid}
                for r in self._replicas if r.alive]

    @property
    def stats(self) -> EngineStats:
        return EngineStats.merged(list(self.replica_stats().values()))

    def replica_stats(self) -> dict[int, EngineStats]:
        return {r.rank: self._call(r, "stats") for r in self._replicas if r.alive}

    def start_profile(self, output_dir: str | None = None, num_steps: int | None = None,
                      record_shapes: bool = False, with_stack: bool = False,
                      activities: list[str] | None = None) -> Any:
        """Profiles replica 0 (each replica's engine thread works like the others')."""
        return self._call(self._replicas[0], "start_profile", output_dir, num_steps,
                          record_shapes, with_stack, activities)

    def stop_profile(self) -> Any:
        return self._call(self._replicas[0], "stop_profile")

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.shutdown)
        for replica in self._replicas:
            _stop(replica)


def _stop(replica: _Replica) -> None:
    """Ask the replica to stop; kill it if it has not within STOP_TIMEOUT_S."""
    replica.send(("stop",))
    replica.process.join(STOP_TIMEOUT_S)
    if replica.process.is_alive():
        replica.process.kill()
        replica.process.join()
    replica.conn.close()
