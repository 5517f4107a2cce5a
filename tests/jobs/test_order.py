"""Prefix-aware ordering puts every set of rows sharing a prefix into one contiguous run."""

from __future__ import annotations

import random

from sglbatch.jobs.order import order_by_prefix


def test_rows_sharing_a_prefix_become_contiguous_longest_shared_innermost():
    rng = random.Random(0)
    prefixes = {name: [rng.randrange(1000) for _ in range(8)] for name in "abc"}
    items = [(name, prefixes[name] + [rng.randrange(1000) for _ in range(3)])
             for name in "abcabcabcabc"]
    ordered = order_by_prefix(items, lambda item: item[1])
    names = [name for name, _ in ordered]
    # Each prefix's rows form one run: the name changes exactly twice.
    assert sum(a != b for a, b in zip(names, names[1:])) == 2
    assert sorted(ordered) == sorted(items)


def test_equal_prompts_keep_input_order():
    items = [("first", [1, 2, 3]), ("second", [1, 2, 3]), ("third", [1, 2])]
    assert [n for n, _ in order_by_prefix(items, lambda i: i[1])] == ["third", "first", "second"]
