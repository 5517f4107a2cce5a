"""Which replica takes a request: SGLang's cache-aware routing, plus the plain policies.

The router keeps, per replica, an approximate tree of the token ids it sent there (the
replica's radix cache holds about those). While the replicas' loads are balanced, a request
goes to the replica whose tree shares the longest prefix with it, if that covers more than
`cache_threshold` of the prompt; otherwise to the least-loaded replica. Once loads drift
apart (by more than `balance_abs_threshold` requests and `balance_rel_threshold` times), the
least-loaded replica takes it regardless: a shared prefix must not pile every request onto
one replica. The defaults are SGLang's router's.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


class _Node:
    __slots__ = ("children", "last_used", "parent", "token")

    def __init__(self, token: int | None, parent: _Node | None):
        self.token = token
        self.parent = parent
        self.children: dict[int, _Node] = {}
        self.last_used = 0


class PrefixTree:
    """Token ids sent to one replica, one node per token, the least recently used leaves
    evicted beyond `max_tokens`."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.root = _Node(None, None)
        self.size = 0
        self._clock = 0

    def match(self, ids: Sequence[int]) -> int:
        """How many leading tokens of `ids` the tree holds."""
        node, n = self.root, 0
        for token in ids:
            node = node.children.get(token)
            if node is None:
                break
            n += 1
        return n

    def insert(self, ids: Sequence[int]) -> None:
        self._clock += 1
        node = self.root
        for token in ids:
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = _Node(token, node)
                self.size += 1
            child.last_used = self._clock
            node = child
        if self.size > self.max_tokens:  # down to 90%, so eviction is not paid per insert
            self._evict(self.size - self.max_tokens * 9 // 10)

    def _evict(self, count: int) -> None:
        leaves = sorted(self._leaves(), key=lambda n: n.last_used)
        for leaf in leaves:
            while count > 0 and leaf is not self.root and not leaf.children:
                parent = leaf.parent
                del parent.children[leaf.token]
                self.size -= 1
                count -= 1
                leaf = parent
            if count <= 0:
                return

    def _leaves(self) -> list[_Node]:
        leaves, todo = [], [self.root]
        while todo:
            node = todo.pop()
            if node.children:
                todo.extend(node.children.values())
            elif node is not self.root:
                leaves.append(node)
        return leaves


class Router:
    def __init__(self, num_replicas: int, policy: str = "cache_aware",  # as EngineConfig's
                 cache_threshold: float = 0.5, balance_abs_threshold: int = 32,
                 balance_rel_threshold: float = 1.0001, max_tree_tokens: int = 1 << 18,
                 seed: int = 0):
        self.policy = policy
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.trees = [PrefixTree(max_tree_tokens) for _ in range(num_replicas)]
        self._random = random.Random(seed)

    def choose(self, ids: Sequence[int], loads: Sequence[int], alive: Sequence[bool]) -> int:
        """The replica for a prompt of token ids `ids`, given each replica's requests in
        flight; only live replicas are candidates. Records the choice in its tree."""
        candidates = [r for r in range(len(loads)) if alive[r]]
        if not candidates:
            raise RuntimeError("no replica is alive")
        least_loaded = min(candidates, key=lambda r: loads[r])
        if self.policy == "random":
            chosen = self._random.choice(candidates)
        elif self.policy == "shortest_queue" or self._imbalanced(loads, candidates):
            chosen = least_loaded
        else:
            matched = {r: self.trees[r].match(ids) for r in candidates}
            best = max(candidates, key=lambda r: (matched[r], -loads[r]))
            covers = matched[best] / len(ids) if ids else 0.0
            chosen = best if covers > self.cache_threshold else least_loaded
        self.trees[chosen].insert(ids)
        return chosen

    def _imbalanced(self, loads: Sequence[int], candidates: list[int]) -> bool:
        high = max(loads[r] for r in candidates)
        low = min(loads[r] for r in candidates)
        return high - low > self.balance_abs_threshold and \
            high > self.balance_rel_threshold * low
