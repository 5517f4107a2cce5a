"""Attention on plain torch over the paged KV pool: the CPU path and the oracle.

Decode uses cascade attention: requests whose slot rows begin with the same slots (a
prefix shared through the radix cache) form a group; the group's prefix K/V is gathered
once and attended by all its queries in one matmul, each request's own suffix separately,
and the two softmax parts are merged exactly through their log-sum-exps.

Each layer's `LayerAttention` sets its scale, soft-cap and sliding window. A window is only
a mask (keys before it stay in the pool, so the radix cache needs no change); decode
metadata is built once per distinct window, and a windowed request attends only the
columns its window reaches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglbatch.engine.attention.base import AttentionBackend, LayerAttention
from sglbatch.engine.batch import ForwardBatch, ForwardMode
from sglbatch.engine.kv_pool import KVPool

# A shared prefix shorter than this is not worth a separate pass.
MIN_SHARED_PREFIX = 32
# Decode requests are attended in buckets of similar length, each padded only to its own
# longest: one long prompt must not make the whole batch gather its length. Buckets cost
# extra ops per layer, so they are formed only when padding would waste this share.
DECODE_BUCKET = 32
MAX_PADDING_WASTE = 0.25
# Extend attention takes this many query rows at a time: scores stay cache-sized.
EXTEND_CHUNK = 128


@dataclass
class _SharedPrefix:
    rows: torch.Tensor  # batch indices of the requests sharing it
    slots: torch.Tensor | slice  # the prefix's slots (a slice when consecutive)
    # Under a sliding window: [1, len(rows) * heads per kv head, len(slots)], True where a
    # request's window has already left the prefix key.
    hidden: torch.Tensor | None = None


@dataclass
class _Bucket:
    rows: torch.Tensor  # batch indices of the requests in it
    slots: torch.Tensor  # [len(rows) * max_len] their slots after any shared prefix, padded
    pad: torch.Tensor  # [1, len(rows), 1, max_len] True where padding
    max_len: int


@dataclass
class _DecodeMetadata:
    shared: object  # the shared prefixes, in the form the backend attends them
    suffix: object  # how the backend attends each request's own suffix


def _shared_prefixes(table: torch.Tensor, pool_rows: torch.Tensor, seq_lens: list[int]
                     ) -> tuple[list[_SharedPrefix], list[int]]:
    """Groups of requests whose slot rows start alike, and each request's shared length.
    Only the first column is read for all requests: whole rows are gathered only for groups
    (all of them cost a [batch, longest] copy per step)."""
    by_first: dict[int, list[int]] = {}
    for b, first in enumerate(table[pool_rows, 0].tolist()):
        by_first.setdefault(first, []).append(b)
    prefix_lens = [0] * len(seq_lens)
    shared = []
    for members in by_first.values():
        if len(members) < 2:
            continue
        # The current token's slot is each request's own, so a prefix is always < seq_len.
        width = min(seq_lens[b] for b in members) - 1
        index = torch.tensor(members, device=pool_rows.device)
        sub = table[pool_rows[index], :width]
        same = (sub == sub[:1]).all(dim=0)
        length = int(same.logical_not().nonzero()[0]) if not bool(same.all()) else width
        if length < MIN_SHARED_PREFIX:
            continue
        for b in members:
            prefix_lens[b] = length
        shared.append(_SharedPrefix(index, KVPool.as_span(sub[0, :length])))
    return shared, prefix_lens


def _windowed_prefixes(shared: list[_SharedPrefix], prefix_lens: list[int],
                       starts: list[int], group: int) -> tuple[list[_SharedPrefix], list[int]]:
    """The shared prefixes as a sliding window sees them, given each request's first
    visible position (`starts`): a prefix keeps the requests that still see part of it, from
    the earliest position any of them sees, masked per request; one left with fewer than two
    requests is dropped (its part goes back to each request's own columns). Returns the
    prefixes and each request's shared length under the window."""
    windowed, lens = [], [0] * len(prefix_lens)
    for prefix in shared:
        members = [b for b in prefix.rows.tolist() if starts[b] < prefix_lens[b]]
        if len(members) < 2:
            continue
        length = prefix_lens[members[0]]
        first = min(starts[b] for b in members)
        device = prefix.rows.device
        columns = torch.arange(first, length, device=device)
        hidden = columns[None, :] < torch.tensor([starts[b] for b in members],
                                                 device=device)[:, None]
        slots = prefix.slots
        slots = slice(slots.start + first, slots.stop) if isinstance(slots, slice) \
            else slots[first:]
        windowed.append(_SharedPrefix(
            torch.tensor(members, device=device), slots,
            hidden.repeat_interleave(group, dim=0)[None]))
        for b in members:
            lens[b] = length
    return windowed, lens


class TorchNativeBackend(AttentionBackend):
    accepts_stored_kv = True

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        if fb.mode == ForwardMode.DECODE:
            shared, prefix_lens = _shared_prefixes(fb.req_to_token, fb.req_pool_indices,
                                                   fb.seq_lens_cpu)
            self._decode_metas = {
                window: self._decode_metadata(fb, shared, prefix_lens, window)
                for window in {layer.sliding_window for layer in self.layers}}
            # The metadata of the layer being run (`forward` switches it per layer).
            self._decode_meta = self._decode_metas[self.layers[0].sliding_window]
            return
        self._extend_slots = [
            KVPool.as_span(fb.req_to_token[fb.req_pool_indices[i], :seq_len]) if prefix_len
            else None
            for i, (prefix_len, seq_len) in enumerate(zip(fb.prefix_lens_cpu, fb.seq_lens_cpu))]

    def _decode_metadata(self, fb: ForwardBatch, shared: list[_SharedPrefix],
                         prefix_lens: list[int], window: int | None) -> _DecodeMetadata:
        if window is None:
            return _DecodeMetadata(shared, self._suffix_metadata(fb, prefix_lens))
        # The decoded token (position seq_len - 1) sees positions seq_len - window onwards.
        starts = [max(0, s - window) for s in fb.seq_lens_cpu]
        shared, prefix_lens = _windowed_prefixes(shared, prefix_lens, starts,
                                                 self.num_heads // self.num_kv_heads)
        own = [max(p, s) for p, s in zip(prefix_lens, starts)]
        return _DecodeMetadata(shared, self._suffix_metadata(fb, own))

    def _suffix_metadata(self, fb: ForwardBatch, prefix_lens: list[int]) -> list[_Bucket]:
        """Each request attends its columns prefix_lens[b]..seq_len (its own, past any shared
        prefix or before its window)."""
        rows = fb.req_to_token[fb.req_pool_indices, :max(fb.seq_lens_cpu)]
        device = rows.device
        suffix_lens = torch.tensor([s - p for s, p in zip(fb.seq_lens_cpu, prefix_lens)],
                                   device=device)
        padded = int(suffix_lens.max()) * len(suffix_lens)
        if len(suffix_lens) <= DECODE_BUCKET or \
                padded * (1 - MAX_PADDING_WASTE) <= int(suffix_lens.sum()):
            # Batch order: no scatter back needed.
            groups = [torch.arange(len(suffix_lens), device=device)]
        else:
            groups = list(torch.argsort(suffix_lens).split(DECODE_BUCKET))
        buckets = []
        for members in groups:
            lens = suffix_lens[members]
            max_len = int(lens.max())
            cols = (torch.tensor(prefix_lens, device=device)[members, None]
                    + torch.arange(max_len, device=device)[None, :])
            # Padding columns read the row's last entry; the mask hides them.
            slots = rows[members].gather(1, cols.clamp(max=rows.shape[1] - 1))
            pad = torch.arange(max_len, device=device)[None, :] >= lens[:, None]
            buckets.append(_Bucket(members, slots.reshape(-1), pad[None, :, None, :], max_len))
        return buckets

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                fb: ForwardBatch, kv_stored: bool = False) -> torch.Tensor:
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if not kv_stored:
            self.store_kv(layer_id, fb, k, v)
        q = q.view(-1, self.num_heads, self.head_dim)
        if fb.mode == ForwardMode.DECODE:
            self._decode_meta = self._decode_metas[self.layers[layer_id].sliding_window]
            out = self._decode(q, layer_id)
        else:
            out = self._extend(q, k, v, layer_id, fb)
        return out.reshape(-1, self.num_heads * self.head_dim)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                pad: torch.Tensor | None, layer: LayerAttention
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax attention and its log-sum-exp (fp32) for merging with other parts.
        Batched matmuls with a kv head's query heads as rows: SDPA's CPU kernels are several
        times slower at query length 1 (bf16 most of all)."""
        scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(layer.scale)
        _soft_cap(scores, layer.logit_softcap)
        if pad is not None:
            scores.masked_fill_(pad, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        probs = torch.exp(scores.sub_(lse))
        return torch.matmul(probs.to(v.dtype), v).float(), lse

    def _decode(self, q: torch.Tensor, layer_id: int) -> torch.Tensor:
        meta = self._decode_meta
        batch = q.shape[0]
        group = self.num_heads // self.num_kv_heads
        # [batch, kv_heads, group, head_dim] fp32 and its log-sum-exp [..., 1].
        out, lse = self._decode_suffixes(q, layer_id)
        q = q.view(batch, self.num_kv_heads, group, self.head_dim)
        for prefix in meta.shared:
            # One matmul for all queries of the group against the prefix gathered once.
            k_p, v_p = self.kv_pool.get_kv(layer_id, prefix.slots)
            n = len(prefix.rows)
            q_g = q[prefix.rows].transpose(0, 1).reshape(self.num_kv_heads, n * group,
                                                          self.head_dim)
            out_p, lse_p = self._attend(q_g, k_p, v_p, prefix.hidden,
                                        self.layers[layer_id])
            out_p = out_p.view(self.num_kv_heads, n, group, self.head_dim).transpose(0, 1)
            lse_p = lse_p.view(self.num_kv_heads, n, group, 1).transpose(0, 1)
            lse_s = lse[prefix.rows]
            total = torch.logaddexp(lse_s, lse_p)
            out[prefix.rows] = (out[prefix.rows] * torch.exp(lse_s - total)
                                + out_p * torch.exp(lse_p - total))
        return out.to(q.dtype).reshape(batch, self.num_heads, self.head_dim)

    def _decode_suffixes(self, q: torch.Tensor, layer_id: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of each request over its slots after any shared prefix."""
        buckets = self._decode_meta.suffix
        batch = q.shape[0]
        group = self.num_heads // self.num_kv_heads
        q = q.view(batch, self.num_kv_heads, group, self.head_dim).transpose(0, 1)
        if len(buckets) == 1:
            out, lse = self._attend_bucket(q, layer_id, buckets[0])
        else:
            out = q.new_empty(q.shape, dtype=torch.float32)
            lse = q.new_empty((*q.shape[:-1], 1), dtype=torch.float32)
            for bucket in buckets:
                out[:, bucket.rows], lse[:, bucket.rows] = self._attend_bucket(
                    q[:, bucket.rows], layer_id, bucket)
        return out.transpose(0, 1), lse.transpose(0, 1)

    def _attend_bucket(self, q: torch.Tensor, layer_id: int, bucket: _Bucket
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv_pool.get_kv(layer_id, bucket.slots)
        shape = (self.num_kv_heads, len(bucket.rows), bucket.max_len, self.head_dim)
        return self._attend(q, k.view(shape), v.view(shape), bucket.pad,
                            self.layers[layer_id])

    def _extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                fb: ForwardBatch) -> torch.Tensor:
        out = torch.empty_like(q)
        layer = self.layers[layer_id]
        start = 0
        for i, (prefix_len, ext_len) in enumerate(zip(fb.prefix_lens_cpu, fb.extend_lens_cpu)):
            end = start + ext_len
            k_start = 0
            if prefix_len == 0:
                # Nothing cached: the step's own K/V is the whole sequence, no gather needed.
                k_i, v_i = k[start:end].transpose(0, 1), v[start:end].transpose(0, 1)
            else:
                slots = self._extend_slots[i]
                if layer.sliding_window is not None:
                    # Gather only from the first key the first new token's window reaches.
                    k_start = max(0, prefix_len - layer.sliding_window + 1)
                    slots = slots[k_start:] if isinstance(slots, torch.Tensor) else \
                        slice(slots.start + k_start, slots.stop)
                k_i, v_i = self.kv_pool.get_kv(layer_id, slots)
            self._causal_attention(q[start:end], k_i, v_i, prefix_len, out[start:end], layer,
                                   k_start)
            start = end
        return out

    def _causal_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          q_start: int, out: torch.Tensor, layer: LayerAttention,
                          k_start: int = 0) -> None:
        """One request's new tokens (q: [n, heads, dim], at positions q_start..) against its
        sequence from position k_start (k, v: [kv_heads, q_start + n - k_start, dim]; under a
        sliding window k_start may skip keys no new token sees), written into out
        [n, heads, dim].

        Query rows go in chunks, each against only the keys it may see, as batched matmuls
        with a kv head's query heads stacked: 4-5x faster than CPU SDPA here (bf16), whose
        kernels fall back to the unfused math path for these shapes."""
        n = q.shape[0]
        group = self.num_heads // self.num_kv_heads
        window = layer.sliding_window
        # [kv_heads, group, n, dim]: a kv head's query heads share its K/V in one matmul.
        q = q.view(n, self.num_kv_heads, group, self.head_dim).permute(1, 2, 0, 3)
        out = out.view(n, self.num_kv_heads, group, self.head_dim).permute(1, 2, 0, 3)
        for c in range(0, n, EXTEND_CHUNK):
            c_end = min(c + EXTEND_CHUNK, n)
            seen = q_start + c_end  # keys the chunk's last row may see
            # The first key the chunk's first row may see.
            first = 0 if window is None else max(0, q_start + c - window + 1)
            rows = c_end - c
            q_c = q[:, :, c:c_end].reshape(self.num_kv_heads, group * rows, self.head_dim)
            scores = torch.matmul(q_c * layer.scale,
                                  k[:, first - k_start:seen - k_start].transpose(1, 2)).float()
            _soft_cap(scores, layer.logit_softcap)
            scores_4d = scores.view(self.num_kv_heads, group, rows, seen - first)
            if window is None:
                # Only the chunk's own diagonal block holds keys in some row's future.
                future = torch.ones(rows, rows, dtype=torch.bool, device=q.device).triu_(1)
                scores_4d[..., q_start + c - first:].masked_fill_(future, float("-inf"))
            else:
                positions = torch.arange(q_start + c, seen, device=q.device)[:, None]
                keys = torch.arange(first, seen, device=q.device)[None, :]
                hidden = (keys > positions) | (keys <= positions - window)
                scores_4d.masked_fill_(hidden, float("-inf"))
            probs = torch.softmax(scores, dim=-1).to(v.dtype)
            out[:, :, c:c_end] = torch.matmul(probs, v[:, first - k_start:seen - k_start]).view(
                self.num_kv_heads, group, rows, self.head_dim)


def _soft_cap(scores: torch.Tensor, cap: float | None) -> None:
    """cap * tanh(scores / cap), in place (Gemma 2's attention logit soft-capping)."""
    if cap is not None:
        scores.div_(cap).tanh_().mul_(cap)
