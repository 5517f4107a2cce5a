"""Continuous batching: which requests run this step, and what happens after they ran.

Prefill first (as SGLang and nano-vllm do): when waiting requests fit, the step is an extend
batch of them, else it is one decode token for every running request. The scheduler only
decides: KV slots, table rows and the prefix cache belong to the CacheManager, which it asks
at scheduling time. A request's cached prefix stays locked while the request runs; its
computed tokens go back into the cache after each prefill and when it finishes, is retracted
or aborted, so the next request with the same prefix skips them.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable

import torch

from sglbatch.engine.api_types import FinishReason
from sglbatch.engine.batch import Batch, ForwardMode, StepResult
from sglbatch.engine.cache_manager import CacheManager
from sglbatch.engine.config import EngineConfig
from sglbatch.engine.logprobs import first_input_step
from sglbatch.engine.ngram import NgramIndex
from sglbatch.engine.policy import NewTokenRatio, order_waiting
from sglbatch.engine.radix_cache import RadixCache
from sglbatch.engine.request import Req

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, config: EngineConfig, memory: CacheManager):
        self.config = config
        self.memory = memory
        self.policy = config.schedule_policy if memory.cache else (
            "fcfs" if config.schedule_policy == "lpm" else config.schedule_policy)
        self.new_token_ratio = NewTokenRatio(config.schedule_conservativeness)
        self._rng = random.Random(config.random_seed)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.chunked_req: Req | None = None  # mid-prompt; continues before anyone else
        self.num_retractions = 0
        if config.speculative_algorithm is not None:
            logger.info("%s speculative decoding: up to %d drafted tokens per greedy request, "
                        "in decode steps of at most %d requests",
                        config.speculative_algorithm, config.speculative_num_draft_tokens - 1,
                        config.speculative_max_batch_size)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked_req)

    @property
    def cache(self) -> RadixCache | None:
        return self.memory.cache

    @property
    def num_available_slots(self) -> int:
        return self.memory.num_available_slots

    def add_request(self, req: Req) -> None:
        self.waiting.append(req)

    def schedule(self) -> Batch | None:
        batch = self._schedule_prefill() or self._schedule_decode()
        self.memory.commit()  # the step's table changes, in one write to the device
        return batch

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
            if is_new and not self.memory.claim(req, self._max_cached_prefix(req)):
                break
            extend_len = req.pending_len
            if extend_len > budget:
                if chunking:
                    extend_len = budget
                elif reqs:
                    self.memory.unclaim(req)
                    break
                # else: with chunking off, a prompt over the budget runs alone, whole.
            room = self.num_available_slots - reserved
            if extend_len + self.new_token_ratio.reserve(req) > room:
                if not chunking or room <= 1:
                    if is_new:
                        self.memory.unclaim(req)
                    break
                extend_len = min(extend_len, room - 1)  # a chunk; its decode reserve comes later
            new_slots = self.memory.extend(req, extend_len)
            reqs.append(req)
            lens.append(extend_len)
            slots.append(new_slots)
            budget -= extend_len
            reserved += extend_len + self.new_token_ratio.reserve(req)
        if not reqs:
            return None
        if reqs[0] is prior_chunked:
            self.chunked_req = None  # on_launched sets it again if still unfinished
        admitted = {id(r) for r in reqs}
        self.waiting = deque(r for r in self.waiting if id(r) not in admitted)
        return Batch(ForwardMode.EXTEND, reqs, lens, torch.cat(slots))

    @staticmethod
    def _max_cached_prefix(req: Req) -> int:
        # At least one token must be computed: its logits give the next token. Positions
        # whose logits give input logprobs must be computed too.
        limit = req.fill_len - 1
        if req.next_input_logprob_position is not None:
            limit = min(limit, req.next_input_logprob_position)
        return limit

    # ---- decode -------------------------------------------------------------------------

    def _schedule_decode(self) -> Batch | None:
        decoding = self._decoding()
        while decoding and self.num_available_slots < len(decoding):
            victim = self._pick_retract_victim(decoding)
            decoding.remove(victim)
            self._retract(victim)
        if not decoding:
            return None
        self.new_token_ratio.on_decode_step()
        verify = self._schedule_verify(decoding)
        if verify is not None:
            return verify
        slots = self.memory.extend_each(decoding)
        return Batch(ForwardMode.DECODE, decoding, [1] * len(decoding), slots)

    @property
    def may_speculate(self) -> bool:
        """Whether a decode step now could carry drafts: it needs every result read first
        (a draft continues the request's last token, which must be known)."""
        return (self.config.speculative_algorithm is not None
                and 0 < len(self.running) <= self.config.speculative_max_batch_size
                and any(req.can_speculate for req in self.running))

    def _schedule_verify(self, decoding: list[Req]) -> Batch | None:
        """A decode step with NGRAM drafts, as one extend: each request runs its last token
        and its drafts (none for a request that cannot speculate). None where no request has
        a draft, or the drafts' slots are not free: then a plain decode step runs."""
        if not self.may_speculate:
            return None
        drafts = [self._draft(req) for req in decoding]
        lens = [1 + len(draft) for draft in drafts]
        if not any(drafts) or sum(lens) > self.memory.kv_pool.num_free:
            return None
        slots = torch.cat([self.memory.extend(req, n) for req, n in zip(decoding, lens)])
        return Batch(ForwardMode.EXTEND, decoding, lens, slots, drafts=drafts)

    def _draft(self, req: Req) -> list[int]:
        if not req.can_speculate or req.pending_ids:
            return []
        index = req.draft_index
        if index is None:
            index = req.draft_index = NgramIndex(
                self.config.speculative_ngram_max_match_window_size)
        index.extend(req.fill_span(len(index.tokens), req.fill_len))  # the new tokens only
        # The step yields up to 1 + len(draft) tokens: never past max_new_tokens.
        room = req.sampling_params.max_new_tokens - req.output_len - 1
        return index.propose(min(self.config.speculative_num_draft_tokens - 1, room))

    def _decoding(self) -> list[Req]:
        """The running requests that may still sample. Under the overlap schedule, one whose
        last step (not read yet) gave it max_new_tokens sits this step out: it will finish."""
        return [r for r in self.running if r.output_len < r.sampling_params.max_new_tokens]

    @property
    def may_retract(self) -> bool:
        """Whether a decode step now could retract: it needs every result read first (a
        retracted request recomputes from token values)."""
        return self.num_available_slots < len(self.running)

    @staticmethod
    def _pick_retract_victim(decoding: list[Req]) -> Req:
        # Least decoded work is lost by retracting the request with the fewest outputs;
        # among equals the latest admitted, which has waited least.
        return min(reversed(decoding), key=lambda r: r.output_len)

    def _retract(self, req: Req) -> None:
        """Give back a running request's KV; it waits at the head of the queue to recompute
        (with the radix cache on, from whatever of its tokens is still cached)."""
        assert not req.pending_ids, "retracting a request whose last token is not read yet"
        self.running.remove(req)
        self.memory.release(req)
        self.num_retractions += 1
        self.new_token_ratio.on_retract()
        self.waiting.appendleft(req)
        logger.info("KV pool exhausted: retracted %s (%d tokens to recompute)",
                    req.rid, req.fill_len)

    # ---- after the forward pass ---------------------------------------------------------

    def on_launched(self, batch: Batch, placeholders: list[int]) -> None:
        """Book a step the model runner has launched: its tokens' K/V is computed, and each
        request that completed its prompt (or decoded) has one more token, known by its
        placeholder until `process_output` reads it. The next step can be scheduled from
        here, before this one's results are read (the overlap schedule)."""
        # A verify step is a decode step here: its drafts' K/V counts once it is accepted.
        extend = batch.mode == ForwardMode.EXTEND and not batch.is_verify
        batch.completes = [not extend or batch.samples(i) for i in range(len(batch.reqs))]
        for req, extend_len, completes, placeholder in zip(
                batch.reqs, batch.extend_lens, batch.completes, placeholders):
            req.kv_len += extend_len if extend else 1
            if extend:
                if self.memory.cache is not None:
                    self.memory.cache_computed_prefix(req)
                if not completes:
                    self.chunked_req = req
                    continue
                self.running.append(req)
            if req.sampling_params.max_new_tokens > 0:  # else prefill only: cache, logprobs
                req.pending_ids.append(placeholder)

    def process_output(self, batch: Batch, step: StepResult,
                       on_token: Callable[[Req], None] = lambda req: None) -> list[Req]:
        """Read a launched step's results; returns the requests that received a new token
        (or, with max_new_tokens=0, finished their prefill). Whether they are finished is
        decided by the output processor, before `release_finished`. A request finished or
        aborted since the step was launched is skipped: its token is dropped.

        `on_token(req)` runs after each token recorded: a verify step records a request's
        accepted drafts one by one, and stops where `on_token` finished the request."""
        extend = batch.mode == ForwardMode.EXTEND and not batch.is_verify
        updated = []
        accepted = [0] * len(batch.reqs)
        for i, req in enumerate(batch.reqs):
            if req.is_finished:
                continue
            if extend and (step.input_logprobs[i] or req.next_input_logprob_position == 0):
                self._record_input_logprobs(req, step.input_logprobs[i])
            if not batch.completes[i]:  # mid-prompt
                continue
            updated.append(req)
            if req.sampling_params.max_new_tokens == 0:
                on_token(req)
                continue
            req.pending_ids.pop(0)  # tokens are read in the order they were launched
            req.output_ids.append(step.next_ids[i])
            if step.output_logprobs[i] is not None:
                req.logprobs.output.append(step.output_logprobs[i])
            on_token(req)
            if batch.is_verify:
                accepted[i] = self._accept_drafts(req, batch.drafts[i],
                                                  step.draft_targets[i], on_token)
        if batch.is_verify:
            batch.accepted_drafts = sum(accepted)
            self._free_rejected_drafts(batch, accepted)
        return updated

    @staticmethod
    def _accept_drafts(req: Req, draft: list[int], targets: list[int],
                       on_token: Callable[[Req], None]) -> int:
        """Record the model's tokens after each draft that matched the token before it
        (whose K/V the step computed); returns how many drafts were accepted."""
        for j, token in enumerate(draft):
            if req.is_finished or token != req.output_ids[-1]:
                return j
            req.kv_len += 1  # the draft's K/V is the accepted token's
            req.output_ids.append(targets[j])
            on_token(req)
        return len(draft)

    def _free_rejected_drafts(self, batch: Batch, accepted: list[int]) -> None:
        """Give back the slots of drafts that were not accepted: their K/V is not the
        request's."""
        starts = batch.token_starts
        self.memory.free_slots(torch.cat([
            batch.out_cache_loc[start + 1 + kept:end]
            for start, end, kept in zip(starts, starts[1:], accepted)]))

    @staticmethod
    def _record_input_logprobs(req: Req, steps: list) -> None:
        if req.logprob_options.start + len(req.logprobs.input) == 0:
            req.logprobs.input.append(first_input_step(req.input_ids[0]))
        req.logprobs.input.extend(steps)

    def release_finished(self) -> list[Req]:
        """Remove finished requests from the running set and release their KV."""
        finished = [r for r in self.running if r.is_finished]
        if finished:
            self.running = [r for r in self.running if not r.is_finished]
            for req in finished:
                # A token launched after the finishing one is dropped; the K/V of the tokens
                # before it is computed (the step launched it) and cached with them.
                req.pending_ids.clear()
                self.memory.release(req)
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
        self.memory.release(req)  # its K/V stops before any token not read yet
        req.pending_ids.clear()
        req.finish_reason = FinishReason.abort(message)
        return req

    def fail_batch(self, batch: Batch) -> list[Req]:
        """Drop the requests of a batch whose forward pass failed, wherever they are (an
        admitted request is in no queue until its output is processed), and give back the
        slots the step took: nothing was written to them."""
        self.memory.free_slots(batch.out_cache_loc)
        failed = {id(req) for req in batch.reqs}
        self.waiting = deque(r for r in self.waiting if id(r) not in failed)
        self.running = [r for r in self.running if id(r) not in failed]
        if self.chunked_req is not None and id(self.chunked_req) in failed:
            self.chunked_req = None
        for req in batch.reqs:
            self.memory.release(req)
            req.pending_ids.clear()
        return batch.reqs

    def abort_all(self, message: str) -> list[Req]:
        return [self.abort(r.rid, message) for r in self._all_reqs()]

    def flush_cache(self) -> bool:
        """Empty the prefix cache; refused (False) while any request is in flight."""
        if self.has_work:
            return False
        self.memory.flush()
        return True

    def _all_reqs(self) -> list[Req]:
        return [*self.waiting, *self.running, *([self.chunked_req] if self.chunked_req else [])]
