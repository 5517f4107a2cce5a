"""Radix tree over token ids whose values are KV slots (SGLang's RadixAttention).

Ownership: every KV slot is free in the pool, owned by exactly one tree node, or owned by
one request (its tokens after the cached prefix). A request that uses a cached prefix locks
the path to its deepest node, so eviction only ever frees unlocked leaves.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import torch

from sglbatch.engine.kv_pool import KVPool

_clock = itertools.count()  # monotonic access stamps; ties broken deterministically


@dataclass(eq=False)
class TreeNode:
    key: list[int] = field(default_factory=list)  # token ids on the edge from the parent
    value: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    parent: TreeNode | None = None
    children: dict[int, TreeNode] = field(default_factory=dict)  # first token -> child
    lock_ref: int = 0
    last_access: int = field(default_factory=lambda: next(_clock))

    def __lt__(self, other: TreeNode) -> bool:  # heap order: least recently used first
        return self.last_access < other.last_access


def _common_len(a: list[int], b: list[int]) -> int:
    """Length of the common prefix; slice comparisons run in C, so bisect with them."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # invariant: a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class RadixCache:
    def __init__(self, kv_pool: KVPool):
        self.kv_pool = kv_pool
        self.reset()

    def reset(self) -> None:
        self.root = TreeNode()
        self.root.lock_ref = 1  # the root is never evicted
        self.evictable_size = 0  # tokens in unlocked nodes
        self.protected_size = 0  # tokens in nodes some running request has locked

    @property
    def total_size(self) -> int:
        return self.evictable_size + self.protected_size

    def match_prefix(self, token_ids: list[int]) -> tuple[torch.Tensor, TreeNode]:
        """Slots of the longest cached prefix of `token_ids`, and the node where it ends
        (a node is split so the match ends exactly on a node boundary)."""
        node, matched, pos = self.root, [], 0
        stamp = next(_clock)
        node.last_access = stamp
        while pos < len(token_ids) and token_ids[pos] in node.children:
            child = node.children[token_ids[pos]]
            n = _common_len(child.key, token_ids[pos:])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = stamp
            matched.append(child.value)
            node, pos = child, pos + n
        slots = torch.cat(matched) if matched else torch.empty(0, dtype=torch.int64)
        return slots, node

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut `child`'s edge after `n` tokens; returns the new upper node."""
        upper = TreeNode(key=child.key[:n], value=child.value[:n], parent=child.parent,
                         lock_ref=child.lock_ref, last_access=child.last_access)
        upper.children = {child.key[n]: child}
        child.parent.children[child.key[0]] = upper
        child.parent = upper
        child.key, child.value = child.key[n:], child.value[n:]
        return upper

    def insert(self, token_ids: list[int], slots: torch.Tensor) -> int:
        """Cache `token_ids` with their `slots`. Returns how many leading tokens were already
        cached: the caller still owns those slots of its own and must free them (duplicates)."""
        node, pos = self.root, 0
        stamp = next(_clock)
        while pos < len(token_ids):
            child = node.children.get(token_ids[pos])
            if child is None:
                new = TreeNode(key=list(token_ids[pos:]), value=slots[pos:].clone(), parent=node,
                               last_access=stamp)
                node.children[token_ids[pos]] = new
                self.evictable_size += len(new.key)
                return pos
            n = _common_len(child.key, token_ids[pos:])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = stamp
            node, pos = child, pos + n
        return pos

    def lock(self, node: TreeNode) -> None:
        """Protect `node` and its ancestors from eviction (one lock per running request)."""
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_size -= len(node.key)
                self.protected_size += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: TreeNode) -> None:
        while node is not self.root:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.evictable_size += len(node.key)
                self.protected_size -= len(node.key)
            node = node.parent

    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` slots from least recently used unlocked leaves, as far
        as there are any. Returns the number freed."""
        leaves = [n for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_tokens and leaves:
            leaf = heapq.heappop(leaves)
            self.kv_pool.free(leaf.value)
            freed += len(leaf.key)
            self.evictable_size -= len(leaf.key)
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, parent)
        return freed

    def _nodes(self) -> list[TreeNode]:
        out, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def flush(self) -> None:
        """Drop every cached prefix; only valid while no request holds a lock."""
        if self.protected_size:
            raise RuntimeError("cannot flush the cache while requests are running")
        for node in self._nodes():
            self.kv_pool.free(node.value)
        self.reset()
