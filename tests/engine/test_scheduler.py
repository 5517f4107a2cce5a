"""The scheduler alone, with no model: admission, chunked prefill, decode, the prefix cache,
retraction when the pool runs dry, and a failed batch's slots coming back. A step's results
are made up (`_record`); the model runner is never involved."""

from __future__ import annotations

import torch

from sglbatch.engine.api_types import FinishReason
from sglbatch.engine.batch import Batch, ForwardMode, StepResult
from sglbatch.engine.cache_manager import CacheManager
from sglbatch.engine.config import EngineConfig
from sglbatch.engine.kv_pool import KVPool, ReqToTokenPool
from sglbatch.engine.request import Req
from sglbatch.engine.sampling_params import SamplingParams
from sglbatch.engine.scheduler import Scheduler


def _scheduler(slots: int = 64, **config) -> Scheduler:
    config = EngineConfig(device="cpu", **config)
    pool = KVPool(slots, num_layers=1, num_kv_heads=1, head_dim=2, dtype=torch.float32)
    memory = CacheManager(pool, ReqToTokenPool(4, 128), not config.disable_radix_cache)
    return Scheduler(config, memory)


def _req(rid: str, ids: list[int], max_new_tokens: int = 4) -> Req:
    return Req(rid, ids, SamplingParams(max_new_tokens=max_new_tokens))


def _record(scheduler: Scheduler, batch: Batch, token: int = 7) -> list[Req]:
    """What the engine does around a forward pass: book the launched step, read its
    results, then finish at max_new_tokens."""
    n = len(batch.reqs)
    scheduler.on_launched(batch, [-(i + 1) for i in range(n)])
    updated = scheduler.process_output(batch, StepResult([token] * n, [None] * n, [[]] * n))
    for req in updated:
        if len(req.output_ids) >= req.sampling_params.max_new_tokens:
            req.finish_reason = FinishReason.max_length(len(req.output_ids))
    return scheduler.release_finished()


def _owned_slots(scheduler: Scheduler) -> int:
    pool, cache = scheduler.memory.kv_pool, scheduler.cache
    return pool.num_slots - pool.num_free - (cache.total_size if cache else 0)


def test_waiting_requests_are_admitted_together_then_decode_one_token_each():
    s = _scheduler()
    a, b = _req("a", [1, 2, 3]), _req("b", [4, 5])
    s.add_request(a)
    s.add_request(b)
    batch = s.schedule()
    assert batch.mode == ForwardMode.EXTEND and batch.reqs == [a, b]
    assert batch.extend_lens == [3, 2] and batch.out_cache_loc.numel() == 5
    row = s.memory.req_to_token.table[a.req_pool_idx, :3]
    assert row.tolist() == batch.out_cache_loc[:3].tolist()  # the slots the step writes
    _record(s, batch)
    assert s.running == [a, b] and a.output_ids == [7] and a.kv_len == 3
    decode = s.schedule()
    assert decode.mode == ForwardMode.DECODE and decode.extend_lens == [1, 1]
    assert s.memory.req_to_token.table[a.req_pool_idx, 3] == decode.out_cache_loc[0]


def test_a_long_prompt_is_chunked_and_its_chunks_go_first():
    s = _scheduler(chunked_prefill_size=4)
    long, short = _req("long", list(range(1, 11))), _req("short", [3, 4])
    s.add_request(long)
    s.add_request(short)
    first = s.schedule()
    assert first.reqs == [long] and first.extend_lens == [4]
    assert _record(s, first) == [] and s.chunked_req is long and not long.output_ids
    second = s.schedule()
    assert second.reqs[0] is long and second.extend_lens[0] == 4
    _record(s, second)
    third = s.schedule()
    assert third.reqs[0] is long and third.extend_lens[0] == 2  # the last chunk samples
    _record(s, third)
    assert long.output_ids == [7] and long.kv_len == 10


def test_a_finished_prompt_is_cached_and_the_next_request_reuses_it():
    s = _scheduler()
    first = _req("first", list(range(1, 21)), max_new_tokens=1)
    s.add_request(first)
    assert _record(s, s.schedule()) == [first]
    # The prompt is cached; its one output token was sampled but never computed.
    assert _owned_slots(s) == 0 and s.cache.total_size == 20
    again = _req("again", list(range(1, 21)) + [99])
    s.add_request(again)
    batch = s.schedule()
    assert again.cached_tokens == 20 and batch.extend_lens == [1]


def test_a_dry_pool_retracts_the_request_with_the_fewest_outputs():
    s = _scheduler(slots=12, disable_radix_cache=True, schedule_conservativeness=0.01)
    a, b = _req("a", [1, 2, 3, 4], max_new_tokens=8), _req("b", [5, 6, 7, 8], max_new_tokens=8)
    s.add_request(a)
    _record(s, s.schedule())
    _record(s, s.schedule())  # a decodes once more than b will have
    s.add_request(b)
    _record(s, s.schedule())
    assert s.running == [a, b]
    while s.num_retractions == 0:
        batch = s.schedule()
        _record(s, batch)
    assert s.waiting[0] is b and b.req_pool_idx is None and s.running == [a]


def test_a_failed_batch_gives_back_every_slot_and_row():
    s = _scheduler(disable_radix_cache=True)
    a, b = _req("a", [1, 2, 3]), _req("b", [4, 5])
    s.add_request(a)
    s.add_request(b)
    _record(s, s.schedule())
    decode = s.schedule()
    assert s.fail_batch(decode) == [a, b]
    assert not s.has_work
    assert s.memory.kv_pool.num_free == s.memory.kv_pool.num_slots
    assert s.memory.req_to_token.num_free == s.memory.req_to_token.num_rows


def test_fill_span_is_a_slice_of_fill_ids():
    req = Req("r", [1, 2, 3], SamplingParams())
    req.output_ids = [4, 5]
    for start in range(6):
        for end in range(start, 6):
            assert req.fill_span(start, end) == req.fill_ids[start:end], (start, end)
