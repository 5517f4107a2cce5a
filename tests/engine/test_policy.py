"""Waiting-queue order and the admission reserve."""

from __future__ import annotations

import random
from collections import deque

import torch

from sglbatch.engine.kv_pool import KVPool
from sglbatch.engine.policy import LPM_MAX_QUEUE, NewTokenRatio, order_waiting
from sglbatch.engine.radix_cache import RadixCache
from sglbatch.engine.request import Req
from sglbatch.engine.sampling_params import SamplingParams


def _req(rid: str, ids: list[int], max_new: int = 16) -> Req:
    return Req(rid, ids, SamplingParams(max_new_tokens=max_new))


def _cache_with(ids: list[int]) -> RadixCache:
    cache = RadixCache(KVPool(1000, 1, 1, 2, torch.float32))
    cache.insert(ids, cache.kv_pool.alloc(len(ids)))
    return cache


def test_lpm_puts_longest_cached_prefix_first_and_keeps_ties_in_order():
    cache = _cache_with(list(range(50)))
    queue = deque([_req("none", [99] * 40), _req("short", list(range(10)) + [77] * 30),
                   _req("long", list(range(45)) + [88]), _req("none2", [98] * 40)])
    ordered, deferred = order_waiting("lpm", queue, cache, random.Random(0))
    assert [r.rid for r in ordered] == ["long", "short", "none", "none2"]
    assert not deferred


def test_lpm_defers_requests_sharing_an_uncached_prefix():
    cache = _cache_with([1, 2, 3])
    shared = list(range(100, 140))
    queue = deque([_req("a", shared + [1]), _req("b", shared + [2]), _req("c", [5] * 40),
                   _req("d", shared + [3])])
    ordered, deferred = order_waiting("lpm", queue, cache, random.Random(0))
    assert {r.rid for r in ordered if id(r) in deferred} == {"b", "d"}


def test_lpm_falls_back_to_fcfs_for_long_queues():
    cache = _cache_with(list(range(50)))
    queue = deque(_req(str(i), [i + 1000] * 3) for i in range(LPM_MAX_QUEUE))
    queue.append(_req("cached", list(range(50))))
    ordered, _ = order_waiting("lpm", queue, cache, random.Random(0))
    assert ordered[-1].rid == "cached"


def test_lof_random_fcfs():
    queue = deque([_req("s", [1], 8), _req("l", [2], 64), _req("m", [3], 32)])
    assert [r.rid for r in order_waiting("lof", queue, None, random.Random(0))[0]] == \
        ["l", "m", "s"]
    assert [r.rid for r in order_waiting("fcfs", queue, None, random.Random(0))[0]] == \
        ["s", "l", "m"]
    shuffled = [sorted(r.rid for r in order_waiting("random", queue, None, random.Random(s))[0])
                for s in range(3)]
    assert all(s == ["l", "m", "s"] for s in shuffled)


def test_new_token_ratio_decays_and_resets():
    ratio = NewTokenRatio(conservativeness=1.0)
    req = _req("r", [1], max_new=100)
    first = ratio.reserve(req)
    for _ in range(1000):
        ratio.on_decode_step()
    assert ratio.reserve(req) < first and ratio.value == ratio.minimum
    ratio.on_retract()
    assert ratio.reserve(req) == first == 70
    assert NewTokenRatio(conservativeness=2.0).reserve(req) == 100
