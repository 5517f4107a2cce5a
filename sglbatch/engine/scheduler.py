"""Continuous batching: which requests run this step, and what happens after they ran.

Prefill first (as SGLang and nano-vllm do): when waiting requests fit, the step is an extend
batch of them, else it is one decode token for every running request. KV slots are taken
here, at scheduling time, and given back when a request finishes, aborts or is retracted.
"""

from __future__ import annotations

import logging
from collections import deque

import torch

from sglbatch.engine.batch import Batch, ForwardMode
from sglbatch.engine.config import EngineConfig
from sglbatch.engine.kv_pool import KVPool, ReqToTokenPool
from sglbatch.engine.request import FinishReason, Req, ReqStatus

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, config: EngineConfig, kv_pool: KVPool, req_to_token: ReqToTokenPool,
                 eos_token_ids: tuple[int, ...]):
        self.config = config
        self.kv_pool = kv_pool
        self.req_to_token = req_to_token
        self.eos_token_ids = set(eos_token_ids)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.chunked_req: Req | None = None  # mid-prompt; continues before anyone else
        self.num_retractions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked_req)

    def add_request(self, req: Req) -> None:
        self.waiting.append(req)

    def schedule(self) -> Batch | None:
        return self._schedule_prefill() or self._schedule_decode()

    def _schedule_prefill(self) -> Batch | None:
        chunking = self.config.chunked_prefill_size > 0
        budget = self.config.prefill_token_budget
        prior_chunked = self.chunked_req
        candidates = ([prior_chunked] if prior_chunked else []) + list(self.waiting)
        reqs: list[Req] = []
        lens: list[int] = []
        slots: list[torch.Tensor] = []
        for req in candidates:
            is_new = req.req_pool_idx is None
            if budget <= 0 or (is_new and len(self.running) + len(reqs)
                               >= self.config.max_running_requests):
                break
            extend_len = req.pending_len
            if extend_len > budget:
                if not chunking and reqs:
                    break
                extend_len = budget if chunking else extend_len
            # Keep one slot per decoding request free so the next decode step fits.
            room = self.kv_pool.num_free - (len(self.running) + len(reqs) + 1)
            if extend_len > room:
                if not chunking or room <= 0:
                    break
                extend_len = room
            if is_new:
                row = self.req_to_token.alloc()
                if row is None:
                    break
                req.req_pool_idx = row
            new_slots = self.kv_pool.alloc(extend_len)
            self.req_to_token.table[req.req_pool_idx, req.kv_len:req.kv_len + extend_len] = new_slots
            reqs.append(req)
            lens.append(extend_len)
            slots.append(new_slots)
            budget -= extend_len
        if not reqs:
            return None
        if reqs[0] is prior_chunked:
            self.chunked_req = None  # process_output sets it again if still unfinished
        for _ in range(sum(r is not prior_chunked for r in reqs)):
            self.waiting.popleft()  # admitted waiting requests are a prefix of the queue
        return Batch(ForwardMode.EXTEND, reqs, lens, torch.cat(slots))

    def _schedule_decode(self) -> Batch | None:
        while self.running and self.kv_pool.num_free < len(self.running):
            self._retract(self._pick_retract_victim())
        if not self.running:
            return None
        slots = self.kv_pool.alloc(len(self.running))
        for req, slot in zip(self.running, slots):
            self.req_to_token.table[req.req_pool_idx, req.kv_len] = slot
        return Batch(ForwardMode.DECODE, list(self.running), [1] * len(self.running), slots)

    def _pick_retract_victim(self) -> Req:
        # Least decoded work is lost by retracting the request with the fewest outputs;
        # among equals the latest admitted, which has waited least.
        return min(reversed(self.running), key=lambda r: len(r.output_ids))

    def _retract(self, req: Req) -> None:
        """Give back a running request's KV; it waits at the head of the queue to recompute."""
        self.running.remove(req)
        self._free_kv(req)
        req.status = ReqStatus.WAITING
        req.num_retractions += 1
        self.num_retractions += 1
        self.waiting.appendleft(req)
        logger.info("KV pool exhausted: retracted %s (%d tokens to recompute)",
                    req.rid, req.fill_len)

    def process_output(self, batch: Batch, next_token_ids: list[int]) -> list[Req]:
        """Record a step's results; returns the requests that received a new token."""
        updated = []
        for i, req in enumerate(batch.reqs):
            gets_token = batch.samples(i)
            req.kv_len += batch.extend_lens[i]
            if not gets_token:
                self.chunked_req = req
                continue
            if batch.mode == ForwardMode.EXTEND:
                req.status = ReqStatus.RUNNING
                self.running.append(req)
            req.output_ids.append(next_token_ids[i])
            self._check_token_finish(req)
            updated.append(req)
        return updated

    def _check_token_finish(self, req: Req) -> None:
        params = req.sampling_params
        token = req.output_ids[-1]
        if len(req.output_ids) >= params.max_new_tokens:
            req.finish_reason = FinishReason.max_length(len(req.output_ids))
        elif (token in self.eos_token_ids and not params.ignore_eos) or \
                token in params.stop_token_ids:
            req.finish_reason = FinishReason.stop(token)

    def release_finished(self) -> list[Req]:
        """Remove finished requests from the running set and free their KV."""
        finished = [r for r in self.running if r.is_finished]
        if finished:
            self.running = [r for r in self.running if not r.is_finished]
            for req in finished:
                self._free_kv(req)
                req.status = ReqStatus.FINISHED
        return finished

    def abort(self, rid: str, message: str) -> Req | None:
        """Drop a request wherever it is; returns it (finished as aborted) or None if unknown."""
        for req in [*self.waiting, *self.running, *([self.chunked_req] if self.chunked_req else [])]:
            if req.rid == rid:
                break
        else:
            return None
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
        if req is self.chunked_req:
            self.chunked_req = None
        self._free_kv(req)
        req.finish_reason = FinishReason.abort(message)
        req.status = ReqStatus.FINISHED
        return req

    def abort_all(self, message: str) -> list[Req]:
        reqs = [*self.waiting, *self.running, *([self.chunked_req] if self.chunked_req else [])]
        return [self.abort(r.rid, message) for r in reqs]

    def _free_kv(self, req: Req) -> None:
        if req.req_pool_idx is None:
            return
        self.kv_pool.free(self.req_to_token.table[req.req_pool_idx, :req.kv_len])
        self.req_to_token.free(req.req_pool_idx)
        req.req_pool_idx = None
        req.kv_len = 0
