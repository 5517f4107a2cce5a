"""The data-parallel router: prefix trees and the routing rule, no model needed."""

from __future__ import annotations

from sglbatch.engine.dp.router import PrefixTree, Router


def test_prefix_tree_matches_what_was_inserted():
    tree = PrefixTree(max_tokens=100)
    tree.insert([1, 2, 3, 4])
    tree.insert([1, 2, 9])
    assert tree.match([1, 2, 3, 4, 5]) == 4
    assert tree.match([1, 2, 9, 9]) == 3
    assert tree.match([7]) == 0
    assert tree.size == 5


def test_prefix_tree_evicts_the_least_recently_used_branch():
    tree = PrefixTree(max_tokens=10)
    tree.insert([1, 2, 3, 4, 5])
    tree.insert([6, 7, 8, 9, 10])
    tree.insert([1, 2, 3, 4, 5])  # the first branch is used again
    tree.insert([11, 12, 13])  # over the limit: the [6..10] branch goes first
    assert tree.size <= 10
    assert tree.match([1, 2, 3, 4, 5]) == 5 and tree.match([11, 12, 13]) == 3
    assert tree.match([6, 7, 8, 9, 10]) < 5


def test_a_shared_prefix_goes_where_it_is_cached_while_loads_are_balanced():
    router = Router(2)
    group_a, group_b = [1] * 50, [2] * 50
    first_a = router.choose(group_a + [3], loads=[0, 0], alive=[True, True])
    first_b = router.choose(group_b + [3], loads=[1, 0], alive=[True, True])
    assert first_a != first_b  # no match: the least loaded takes the new group
    for i in range(10):
        assert router.choose(group_a + [i], loads=[5, 5], alive=[True, True]) == first_a
        assert router.choose(group_b + [i], loads=[5, 5], alive=[True, True]) == first_b


def test_imbalance_sends_work_to_the_least_loaded_even_against_the_cache():
    router = Router(2, balance_abs_threshold=4)
    prefix = [5] * 40
    assert router.choose(prefix + [0], loads=[0, 0], alive=[True, True]) == 0
    assert router.choose(prefix + [1], loads=[3, 0], alive=[True, True]) == 0  # balanced
    assert router.choose(prefix + [2], loads=[10, 0], alive=[True, True]) == 1  # not


def test_a_short_match_counts_for_nothing():
    router = Router(2, cache_threshold=0.5)
    router.choose([1, 2, 3, 4], loads=[0, 0], alive=[True, True])  # replica 0
    assert router.choose([1, 9, 9, 9], loads=[1, 0], alive=[True, True]) == 1


def test_dead_replicas_take_nothing_and_random_spreads():
    router = Router(3, policy="random", seed=1)
    chosen = {router.choose([i], loads=[0, 0, 0], alive=[True, False, True])
              for i in range(50)}
    assert chosen == {0, 2}
    assert Router(2, policy="shortest_queue").choose([1], [4, 2], [True, True]) == 1
