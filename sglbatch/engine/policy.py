"""Waiting-queue order (SGLang's schedule policies) and the new-token ratio used at admission."""

from __future__ import annotations

import random
from collections import deque

from sglbatch.engine.radix_cache import RadixCache
from sglbatch.engine.request import Req

SCHEDULE_POLICIES = ("lpm", "fcfs", "lof", "random")
# Matching every waiting request against the tree costs time; past this many, LPM is not
# worth it and the queue stays first come first served (SGLang uses the same cut-off).
LPM_MAX_QUEUE = 128
# Requests whose first tokens beyond the cache are this many tokens alike share a prefix
# that is not cached yet.
IN_BATCH_PREFIX_TOKENS = 32


def order_waiting(policy: str, waiting: deque[Req], cache: RadixCache | None,
                  rng: random.Random) -> tuple[deque[Req], set[int]]:
    """The queue in the order admission should try it, and the ids of requests to hold back
    this step: with lpm, a request that shares an uncached prefix with one ahead of it waits
    until that one has put the prefix in the cache, instead of computing it a second time."""
    if policy == "fcfs" or len(waiting) <= 1:
        return waiting, set()
    if policy == "lpm":
        if cache is None or len(waiting) > LPM_MAX_QUEUE:
            return waiting, set()
        # Longest cached prefix first: requests sharing a prefix run while it is cached.
        # sorted() is stable, so equal matches keep their arrival order.
        matched = {id(r): len(cache.match_prefix(r.fill_ids)[0]) for r in waiting}
        ordered = deque(sorted(waiting, key=lambda r: -matched[id(r)]))
        return ordered, _share_uncached_prefix(ordered, matched)
    if policy == "lof":
        return deque(sorted(waiting, key=lambda r: -r.sampling_params.max_new_tokens)), set()
    if policy == "random":
        items = list(waiting)
        rng.shuffle(items)
        return deque(items), set()
    raise ValueError(f"schedule_policy={policy!r} is not one of {list(SCHEDULE_POLICIES)}")


def _share_uncached_prefix(ordered: deque[Req], matched: dict[int, int]) -> set[int]:
    seen: set[tuple[int, ...]] = set()
    deferred = set()
    for req in ordered:
        if matched[id(req)] >= IN_BATCH_PREFIX_TOKENS or req.fill_len <= IN_BATCH_PREFIX_TOKENS:
            continue
        key = tuple(req.fill_ids[:IN_BATCH_PREFIX_TOKENS])
        if key in seen:
            deferred.add(id(req))
        seen.add(key)
    return deferred


class NewTokenRatio:
    """How much of their remaining max_new_tokens running requests are expected to use.

    Admission reserves `ratio * remaining` slots per running request so the pool is not
    over-committed. The ratio starts high, decays with every decode step (most requests stop
    well before max_new_tokens), and jumps back after a retraction shows it was too low.
    """

    def __init__(self, conservativeness: float):
        self.initial = min(0.7 * conservativeness, 1.0)
        self.minimum = min(0.14 * conservativeness, self.initial)
        self.decay = (self.initial - self.minimum) / 600
        self.value = self.initial

    def on_decode_step(self) -> None:
        self.value = max(self.minimum, self.value - self.decay)

    def on_retract(self) -> None:
        self.value = self.initial

    def reserve(self, req: Req) -> int:
        remaining = req.sampling_params.max_new_tokens - req.output_len
        return max(1, int(remaining * self.value))
