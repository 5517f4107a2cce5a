"""Prefix-aware ordering: requests sharing a prompt prefix run back to back, so the radix
cache computes the prefix once and every later request reuses it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def order_by_prefix(items: Sequence[T], token_ids: Callable[[T], Sequence]) -> list[T]:
    """Sort by token ids (or characters, where the server tokenizes), lexicographically.
    This is the depth-first order of the token trie:
    every set of requests sharing a prefix becomes one contiguous run, the longest shared
    prefixes innermost. Ties keep input order (the sort is stable)."""
    return sorted(items, key=lambda item: tuple(token_ids(item)))
