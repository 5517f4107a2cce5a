"""Continuous batching: which requests run this step, and what happens after they ran.

Prefill first (as SGLang and nano-vllm do): when waiting requests fit, the step is an extend
batch of them, else it is one decode token for every running request. KV slots are taken
here, at scheduling time. A request's cached prefix comes from the radix cache (locked while
the request runs); its computed tokens go back into the cache after each prefill and when it
finishes, is retracted or aborted, so the next request with the same prefix skips them.
"""

from __future__ import annotations

import logging
import random
from collections import deque

import torch

from sglbatch.engine.batch import Batch, ForwardMode, StepResult
from sglbatch.engine.config import EngineConfig
from sglbatch.engine.kv_pool import KVPool, ReqToTokenPool
from sglbatch.engine.logprobs import first_input_step
from sglbatch.engine.policy import NewTokenRatio, order_waiting
from sglbatch.engine.radix_cache import RadixCache
from sglbatch.engine.request import FinishReason, Req

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, config: EngineConfig, kv_pool: KVPool, req_to_token: ReqToTokenPool,
                 eos_token_ids: tuple[int, ...]):
        self.config = config
        self.kv_pool = kv_pool
        self.req_to_token = req_to_token
        self.eos_token_ids = set(eos_token_ids)
        self.cache = None if config.disable_radix_cache else RadixCache(kv_pool)
        self.policy = config.schedule_policy if self.cache else (
            "fcfs" if config.schedule_policy == "lpm" else config.schedule_policy)
        self.new_token_ratio = NewTokenRatio(config.schedule_conservativeness)
        self._rng = random.Random(config.random_seed)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.chunked_req: Req | None = None  # mid-prompt; continues before anyone else
        self.num_retractions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked_req)

    @property
    def num_available_slots(self) -> int:
        """Free slots plus cached ones that eviction could free."""
        return self.kv_pool.num_free + (self.cache.evictable_size if self.cache else 0)

    def add_request(self, req: Req) -> None:
        self.waiting.append(req)

    def schedule(self) -> Batch | None:
        return self._schedule_prefill() or self._schedule_decode()

    # ---- prefill ------------------------------------------------------------------------

    def _schedule_prefill(self) -> Batch | None:
        if not (self.waiting or self.chunked_req):
            return None
        # Slots the running requests are expected to need for their remaining decode steps.
        reserved = sum(self.new_token_ratio.reserve(r) for r in self.running)
        if self.num_available_slots - reserved <= 1:
            return None
        self.waiting, deferred = order_waiting(self.policy, self.waiting, self.cache, self._rng)
        chunking = self.config.chunked_prefill_size > 0
        budget = self.config.prefill_token_budget
        prior_chunked = self.chunked_req
        reqs: list[Req] = []
        lens: list[int] = []
        slots: list[torch.Tensor] = []
        for req in ([prior_chunked] if prior_chunked else []) + list(self.waiting):
            if id(req) in deferred:
                continue
            is_new = req.req_pool_idx is None
            if budget <= 0 or (is_new and len(self.running) + len(reqs)
                               >= self.config.max_running_requests):
                break
            if is_new and not self._claim_row_and_prefix(req):
                break
            extend_len = req.pending_len
            if extend_len > budget:
                if chunking:
                    extend_len = budget
                elif reqs:
                    self._unclaim(req)
                    break
                # else: with chunking off, a prompt over the budget runs alone, whole.
            room = self.num_available_slots - reserved
            if extend_len + self.new_token_ratio.reserve(req) > room:
                if not chunking or room <= 1:
                    if is_new:
                        self._unclaim(req)
                    break
                extend_len = min(extend_len, room - 1)  # a chunk; its decode reserve comes later
            new_slots = self._alloc_slots(extend_len)
            self.req_to_token.table[req.req_pool_idx, req.kv_len:req.kv_len + extend_len] = \
                new_slots
            reqs.append(req)
            lens.append(extend_len)
            slots.append(new_slots)
            budget -= extend_len
            reserved += extend_len + self.new_token_ratio.reserve(req)
        if not reqs:
            return None
        if reqs[0] is prior_chunked:
            self.chunked_req = None  # process_output sets it again if still unfinished
        admitted = {id(r) for r in reqs}
        self.waiting = deque(r for r in self.waiting if id(r) not in admitted)
        return Batch(ForwardMode.EXTEND, reqs, lens, torch.cat(slots))

    def _claim_row_and_prefix(self, req: Req) -> bool:
        """Give a newly admitted request a table row and its cached prefix (locked)."""
        row = self.req_to_token.alloc()
        if row is None:
            return False
        req.req_pool_idx = row
        if self.cache is None:
            return True
        # At least one token must be computed: its logits give the next token. Positions
        # whose logits give input logprobs must be computed too.
        limit = req.fill_len - 1
        if req.next_input_logprob_position is not None:
            limit = min(limit, req.next_input_logprob_position)
        prefix, node = self.cache.match_prefix(req.fill_ids[:limit])
        self.cache.lock(node)
        self.req_to_token.table[row, :len(prefix)] = prefix
        req.kv_len = req.tree_len = len(prefix)
        req.tree_node = node
        req.cached_tokens = max(req.cached_tokens, min(len(prefix), len(req.input_ids)))
        return True

    def _unclaim(self, req: Req) -> None:
        """Undo `_claim_row_and_prefix` for a request that did not fit after all."""
        if self.cache is not None and req.tree_node is not None:
            self.cache.unlock(req.tree_node)
        self.req_to_token.free(req.req_pool_idx)
        req.req_pool_idx, req.tree_node, req.kv_len, req.tree_len = None, None, 0, 0

    def _alloc_slots(self, n: int) -> torch.Tensor:
        slots = self.kv_pool.alloc(n)
        if slots is None and self.cache is not None:
            self.cache.evict(n - self.kv_pool.num_free)
            slots = self.kv_pool.alloc(n)
        if slots is None:
            raise RuntimeError(f"KV pool: {n} slots asked for, {self.kv_pool.num_free} free")
        return slots

    # ---- decode -------------------------------------------------------------------------

    def _schedule_decode(self) -> Batch | None:
        while self.running and self.num_available_slots < len(self.running):
            self._retract(self._pick_retract_victim())
        if not self.running:
            return None
        slots = self._alloc_slots(len(self.running))
        for req, slot in zip(self.running, slots):
            self.req_to_token.table[req.req_pool_idx, req.kv_len] = slot
        self.new_token_ratio.on_decode_step()
        return Batch(ForwardMode.DECODE, list(self.running), [1] * len(self.running), slots)

    def _pick_retract_victim(self) -> Req:
        # Least decoded work is lost by retracting the request with the fewest outputs;
        # among equals the latest admitted, which has waited least.
        return min(reversed(self.running), key=lambda r: len(r.output_ids))

    def _retract(self, req: Req) -> None:
        """Give back a running request's KV; it waits at the head of the queue to recompute
        (with the radix cache on, from whatever of its tokens is still cached)."""
        self.running.remove(req)
        self._release(req)
        self.num_retractions += 1
        self.new_token_ratio.on_retract()
        self.waiting.appendleft(req)
        logger.info("KV pool exhausted: retracted %s (%d tokens to recompute)",
                    req.rid, req.fill_len)

    # ---- after the forward pass ---------------------------------------------------------

    def process_output(self, batch: Batch, step: StepResult) -> list[Req]:
        """Record a step's results; returns the requests that received a new token."""
        updated = []
        for i, req in enumerate(batch.reqs):
            gets_token = batch.samples(i)
            if step.input_logprobs[i] or req.next_input_logprob_position == 0:
                self._record_input_logprobs(req, step.input_logprobs[i])
            req.kv_len += batch.extend_lens[i]
            if batch.mode == ForwardMode.EXTEND and self.cache is not None:
                self._cache_computed_prefix(req)
            if not gets_token:
                self.chunked_req = req
                continue
            if batch.mode == ForwardMode.EXTEND:
                self.running.append(req)
            if req.sampling_params.max_new_tokens == 0:  # prefill only: cache, logprobs
                req.finish_reason = FinishReason.max_length(0)
                continue
            req.output_ids.append(step.next_ids[i])
            if step.output_logprobs[i] is not None:
                req.logprobs.output.append(step.output_logprobs[i])
            self._check_token_finish(req)
            updated.append(req)
        return updated

    @staticmethod
    def _record_input_logprobs(req: Req, steps: list) -> None:
        if req.logprob_options.start + len(req.logprobs.input) == 0:
            req.logprobs.input.append(first_input_step(req.input_ids[0]))
        req.logprobs.input.extend(steps)

    def _cache_computed_prefix(self, req: Req) -> None:
        """Move a request's computed tokens into the cache so waiting requests can share them.
        Where the cache already had some of them, the request switches to the cached slots
        and frees its own copies."""
        token_ids = self._insert_into_cache(req)
        row = self.req_to_token.table[req.req_pool_idx]
        slots, node = self.cache.match_prefix(token_ids)
        row[:len(slots)] = slots
        self.cache.lock(node)
        self.cache.unlock(req.tree_node)
        req.tree_node, req.tree_len = node, len(slots)

    def _insert_into_cache(self, req: Req) -> list[int]:
        """Cache the request's computed tokens; its slots for tokens the cache already held
        (beyond its own locked prefix) are duplicates and go back to the pool."""
        token_ids = req.fill_ids[:req.kv_len]
        row = self.req_to_token.table[req.req_pool_idx]
        already = self.cache.insert(token_ids, row[:req.kv_len].clone())
        self.kv_pool.free(row[req.tree_len:already].clone())
        return token_ids

    def _check_token_finish(self, req: Req) -> None:
        params = req.sampling_params
        token = req.output_ids[-1]
        if req.grammar is not None and not req.grammar.accept(token):
            # The mask only allows tokens the grammar accepts, so this is an engine bug.
            req.finish_reason = FinishReason.abort(f"the grammar rejected token {token}")
        elif len(req.output_ids) >= params.max_new_tokens:
            req.finish_reason = FinishReason.max_length(len(req.output_ids))
        elif (token in self.eos_token_ids and not params.ignore_eos) or \
                token in params.stop_token_ids:
            req.finish_reason = FinishReason.stop(token)

    def release_finished(self) -> list[Req]:
        """Remove finished requests from the running set and release their KV."""
        finished = [r for r in self.running if r.is_finished]
        if finished:
            self.running = [r for r in self.running if not r.is_finished]
            for req in finished:
                self._release(req)
        return finished

    def abort(self, rid: str, message: str) -> Req | None:
        """Drop a request wherever it is; returns it (finished as aborted) or None if unknown."""
        for req in self._all_reqs():
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
        self._release(req)
        req.finish_reason = FinishReason.abort(message)
        return req

    def fail_batch(self, batch: Batch) -> list[Req]:
        """Drop the requests of a batch whose forward pass failed, wherever they are (an
        admitted request is in no queue until its output is processed), and give back the
        slots the step took: nothing was written to them."""
        self.kv_pool.free(batch.out_cache_loc)
        failed = {id(req) for req in batch.reqs}
        self.waiting = deque(r for r in self.waiting if id(r) not in failed)
        self.running = [r for r in self.running if id(r) not in failed]
        if self.chunked_req is not None and id(self.chunked_req) in failed:
            self.chunked_req = None
        for req in batch.reqs:
            self._release(req)
        return batch.reqs

    def abort_all(self, message: str) -> list[Req]:
        return [self.abort(r.rid, message) for r in self._all_reqs()]

    def flush_cache(self) -> bool:
        """Empty the prefix cache; refused (False) while any request is in flight."""
        if self.has_work:
            return False
        if self.cache is not None:
            self.cache.flush()
        return True

    def _all_reqs(self) -> list[Req]:
        return [*self.waiting, *self.running, *([self.chunked_req] if self.chunked_req else [])]

    def _release(self, req: Req) -> None:
        """Give back a request's row and KV: computed tokens into the cache (its duplicates
        and the rest freed), or everything freed when caching is off."""
        if req.req_pool_idx is None:
            return
        row = self.req_to_token.table[req.req_pool_idx]
        if self.cache is None:
            self.kv_pool.free(row[:req.kv_len].clone())
        else:
            self._insert_into_cache(req)
            self.cache.unlock(req.tree_node)
        self.req_to_token.free(req.req_pool_idx)
        req.req_pool_idx, req.tree_node, req.kv_len, req.tree_len = None, None, 0, 0
