"""`CacheManager`: the one owner of KV memory. It holds the pool of K/V slots, the radix
prefix cache over them, and the req -> token table (each request's row of slots).

The scheduler decides who runs and asks the manager for rows and slots; the model runner and
the attention backends only read `kv_pool` and `req_to_token.table`. Bookkeeping reads and
writes the table's host copy; on a GPU the changed spans reach the device table in one
write per step (`commit`), not one tiny copy per request.
"""

from __future__ import annotations

import torch

from sglbatch.engine.kv_pool import KVPool, ReqToTokenPool
from sglbatch.engine.radix_cache import RadixCache
from sglbatch.engine.request import Req


class CacheManager:
    def __init__(self, kv_pool: KVPool, req_to_token: ReqToTokenPool, radix_cache: bool):
        self.kv_pool = kv_pool
        self.req_to_token = req_to_token
        self.cache = RadixCache(kv_pool) if radix_cache else None

    @property
    def num_available_slots(self) -> int:
        """Free slots plus cached ones that eviction could free."""
        return self.kv_pool.num_free + (self.cache.evictable_size if self.cache else 0)

    # ---- rows and prefixes --------------------------------------------------------------

    def claim(self, req: Req, max_prefix: int) -> bool:
        """Give a newly admitted request a table row and its cached prefix (at most
        `max_prefix` tokens, locked in the cache). False when no row is free."""
        row = self.req_to_token.alloc()
        if row is None:
            return False
        req.req_pool_idx = row
        if self.cache is None:
            return True
        prefix, node = self.cache.match_prefix(req.fill_ids[:max_prefix])
        self.cache.lock(node)
        self.req_to_token.write(row, 0, prefix)
        req.kv_len = req.tree_len = len(prefix)
        req.tree_node = node
        req.cached_tokens = max(req.cached_tokens, min(len(prefix), len(req.input_ids)))
        return True

    def unclaim(self, req: Req) -> None:
        """Undo `claim` for a request that did not fit after all."""
        if self.cache is not None and req.tree_node is not None:
            self.cache.unlock(req.tree_node)
        self.req_to_token.free(req.req_pool_idx)
        req.req_pool_idx, req.tree_node, req.kv_len, req.tree_len = None, None, 0, 0

    # ---- slots --------------------------------------------------------------------------

    def extend(self, req: Req, n: int) -> torch.Tensor:
        """`n` new slots for the request's tokens after its `kv_len`, written to its row."""
        slots = self._alloc(n)
        self.req_to_token.write(req.req_pool_idx, req.kv_len, slots)
        return slots

    def extend_each(self, reqs: list[Req]) -> torch.Tensor:
        """One new slot for each request (a decode step), written to their rows."""
        slots = self._alloc(len(reqs))
        self.req_to_token.write_points([r.req_pool_idx for r in reqs],
                                       [r.kv_len for r in reqs], slots)
        return slots

    def _alloc(self, n: int) -> torch.Tensor:
        slots = self.kv_pool.alloc(n)
        if slots is None and self.cache is not None:
            self.cache.evict(n - self.kv_pool.num_free)
            slots = self.kv_pool.alloc(n)
        if slots is None:
            raise RuntimeError(f"KV pool: {n} slots asked for, {self.kv_pool.num_free} free")
        return slots

    def free_slots(self, slots: torch.Tensor) -> None:
        """Give back slots whose K/V is no request's: those of a step that never ran (its
        forward pass failed), or of drafts a verify step rejected."""
        self.kv_pool.free(slots)

    def commit(self) -> None:
        """Push this step's table changes to the device the model reads from."""
        self.req_to_token.commit()

    # ---- the prefix cache ---------------------------------------------------------------

    def cache_computed_prefix(self, req: Req) -> None:
        """Move a request's computed tokens into the cache so waiting requests can share them.
        Where the cache already had some of them, the request switches to the cached slots
        and frees its own copies."""
        token_ids = self._insert_into_cache(req)
        slots, node = self.cache.match_prefix(token_ids)
        self.req_to_token.write(req.req_pool_idx, 0, slots)
        self.cache.lock(node)
        self.cache.unlock(req.tree_node)
        req.tree_node, req.tree_len = node, len(slots)

    def _insert_into_cache(self, req: Req) -> list[int]:
        """Cache the request's computed tokens; its slots for tokens the cache already held
        (beyond its own locked prefix) are duplicates and go back to the pool."""
        token_ids = req.fill_ids[:req.kv_len]
        row = self.req_to_token.host[req.req_pool_idx]
        already = self.cache.insert(token_ids, row[:req.kv_len].clone())
        self.kv_pool.free(row[req.tree_len:already].clone())
        return token_ids

    def release(self, req: Req) -> None:
        """Give back a request's row and KV: computed tokens into the cache (its duplicates
        and the rest freed), or everything freed when caching is off."""
        if req.req_pool_idx is None:
            return
        if self.cache is None:
            self.kv_pool.free(self.req_to_token.host[req.req_pool_idx, :req.kv_len].clone())
        else:
            self._insert_into_cache(req)
            self.cache.unlock(req.tree_node)
        self.req_to_token.free(req.req_pool_idx)
        req.req_pool_idx, req.tree_node, req.kv_len, req.tree_len = None, None, 0, 0

    def discard(self, req: Req, length: int) -> None:
        """Give back the first `length` slots of a request's row, and the row, past the
        prefix cache (a benchmark's synthetic requests are not worth keeping)."""
        self.kv_pool.free(self.req_to_token.host[req.req_pool_idx, :length].clone())
        self.unclaim(req)

    def flush(self) -> None:
        if self.cache is not None:
            self.cache.flush()

    def reset(self) -> None:
        """Forget every request and cached prefix: all slots and rows free again (after an
        engine failure left the bookkeeping in an unknown state)."""
        self.kv_pool.free_all()
        self.req_to_token.free_all()
        if self.cache is not None:
            self.cache = RadixCache(self.kv_pool)
