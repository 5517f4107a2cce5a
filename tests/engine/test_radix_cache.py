"""RadixCache invariants: match/insert/split/evict/lock, checked against a reference model."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglbatch.engine.kv_pool import KVPool
from sglbatch.engine.radix_cache import RadixCache


def _pool(n: int = 1000) -> KVPool:
    return KVPool(n, num_layers=1, num_kv_heads=1, head_dim=2, dtype=torch.float32)


def _insert(cache: RadixCache, ids: list[int]) -> torch.Tensor:
    """Insert `ids` as a request would: fresh slots for all, duplicates of the prefix freed."""
    slots = cache.kv_pool.alloc(len(ids))
    already = cache.insert(ids, slots)
    cache.kv_pool.free(slots[:already])
    return slots


def test_match_insert_and_split():
    cache = RadixCache(_pool())
    a = _insert(cache, [1, 2, 3, 4])
    slots, node = cache.match_prefix([1, 2, 3, 4, 5])
    assert slots.tolist() == a.tolist() and node.key == [1, 2, 3, 4]
    # A partial match splits the edge so the match ends on a node boundary.
    slots, node = cache.match_prefix([1, 2, 9])
    assert slots.tolist() == a[:2].tolist() and node.key == [1, 2]
    assert [c.key for c in node.children.values()] == [[3, 4]]
    # Inserting a branch reuses the shared part and reports it as already cached.
    b = cache.kv_pool.alloc(4)
    assert cache.insert([1, 2, 7, 8], b) == 2
    cache.kv_pool.free(b[:2])
    assert cache.match_prefix([1, 2, 7, 8])[0].tolist() == a[:2].tolist() + b[2:].tolist()
    assert cache.match_prefix([5])[0].numel() == 0
    assert cache.evictable_size == 6 and cache.protected_size == 0


def test_lock_protects_from_eviction_and_eviction_is_lru():
    cache = RadixCache(_pool(100))
    _insert(cache, [1, 2, 3])
    _insert(cache, [4, 5])
    _insert(cache, [6, 7, 8, 9])
    _, locked = cache.match_prefix([1, 2, 3])
    cache.lock(locked)
    assert cache.protected_size == 3 and cache.evictable_size == 6
    cache.match_prefix([6, 7])  # touch: [4, 5] is now the least recently used leaf
    assert cache.evict(1) == 2
    assert cache.match_prefix([4, 5])[0].numel() == 0
    assert cache.match_prefix([6, 7, 8, 9])[0].numel() == 4
    assert cache.evict(100) == 4  # everything unlocked goes, the locked path stays
    assert cache.match_prefix([1, 2, 3])[0].numel() == 3
    cache.unlock(locked)
    assert cache.protected_size == 0 and cache.evictable_size == 3
    assert cache.evict(100) == 3
    assert cache.kv_pool.num_free == 100


def test_evicting_a_leaf_exposes_its_parent():
    cache = RadixCache(_pool(100))
    _insert(cache, [1, 2, 3, 4])
    _insert(cache, [1, 2, 5, 6])  # splits into [1, 2] -> {[3, 4], [5, 6]}
    assert cache.evict(6) == 6
    assert cache.total_size == 0 and cache.kv_pool.num_free == 100


def test_flush_refused_while_locked():
    cache = RadixCache(_pool(10))
    _insert(cache, [1, 2])
    _, node = cache.match_prefix([1, 2])
    cache.lock(node)
    with pytest.raises(RuntimeError, match="running"):
        cache.flush()
    cache.unlock(node)
    cache.flush()
    assert cache.kv_pool.num_free == 10 and cache.total_size == 0


operations = st.lists(st.tuples(
    st.sampled_from(["insert", "match", "evict", "lock"]),
    st.lists(st.integers(0, 3), min_size=1, max_size=8),  # small alphabet: many shared prefixes
    st.integers(1, 10)), max_size=40)


@settings(max_examples=150, deadline=None)
@given(operations)
def test_random_operations_agree_with_a_reference_dict(ops):
    """The cache holds a set of token sequences; a match is the longest cached prefix. Slots
    are conserved: free + cached == pool size, always, and match returns the slots inserted."""
    pool = _pool(200)
    cache = RadixCache(pool)
    slot_of: dict[tuple[int, ...], int] = {}  # reference: each cached prefix -> its last slot
    locks = []
    for op, ids, n in ops:
        if op == "insert" and pool.num_free >= len(ids):
            slots = _insert(cache, ids)
            for i in range(len(ids)):
                slot_of.setdefault(tuple(ids[:i + 1]), int(slots[i]))
        elif op == "match":
            got, _ = cache.match_prefix(ids)
            expect = 0
            while expect < len(ids) and tuple(ids[:expect + 1]) in slot_of:
                expect += 1
            assert got.tolist() == [slot_of[tuple(ids[:i + 1])] for i in range(expect)]
        elif op == "lock":
            _, node = cache.match_prefix(ids)
            cache.lock(node)
            locks.append(node)
        else:
            cache.evict(n)
            # Rebuild the reference from what is still cached.
            slot_of = {k: v for k, v in slot_of.items()
                       if cache.match_prefix(list(k))[0].numel() == len(k)}
        assert pool.num_free + cache.total_size == pool.num_slots
        assert len(slot_of) == cache.total_size
    for node in locks:
        cache.unlock(node)
    assert cache.protected_size == 0
    cache.evict(10**6)
    assert pool.num_free == pool.num_slots
