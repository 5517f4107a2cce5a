"""Batch-invariant attention, for `enable_deterministic_inference`.

A query row's result is computed by the same arithmetic whatever else shares its batch,
however its prompt was chunked, and whether its prefix came from the radix cache.

On the CPU, where its kernels build, `CpuDeterministicBackend` runs every row, a decode
token's too, as a row of the CPU backend's extend kernel: a task's query lanes never mix
(each has its own dot products, softmax and value sums), key blocks sit at fixed positions,
and a masked key adds an exact 0.

Elsewhere `DeterministicBackend` does it in torch ops:

- every row reads its keys back from the pool (its own included, written first), in fixed
  blocks of BLOCK positions counted from position 0, merged in order by an online softmax;
- every product and sum is an elementwise op or a reduction over a fixed-length dimension
  (head_dim, BLOCK), never a matmul, whose kernels choose their reduction order by the
  matrix shape; every exp runs on a tensor whose trailing dimension is BLOCK wide, so that
  no element lands in the scalar tail of a vectorized kernel (see `_exp_per_row`);
- a masked key contributes an exact 0 and a block with no visible key leaves the running
  state bitwise unchanged, so a row padded to the batch's longest gets the same bits.

There is no shared-prefix (cascade) merge and no split-KV: those change the order of the
sums with the batch. The price is speed (see the README's measurement).
"""

from __future__ import annotations

import torch

from sglbatch.engine.attention.base import AttentionBackend, LayerAttention
from sglbatch.engine.attention.cpu import CpuBackend
from sglbatch.engine.batch import ForwardBatch

BLOCK = 64  # keys per block: the fixed split size
ROW_CHUNK = 64  # query rows per pass, to bound the [rows, heads, BLOCK, head_dim] products


class DeterministicBackend(AttentionBackend):
    accepts_stored_kv = True  # every row reads its keys back from the pool

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        # Each new token's request row in the req -> token table, and its position: it sees
        # keys 0..position (or its window of them).
        self._pool_rows = fb.req_pool_indices.repeat_interleave(
            fb.extend_lens, output_size=len(fb.input_ids))
        self._positions = fb.positions
        self._num_blocks = -(-max(fb.seq_lens_cpu) // BLOCK)
        self._table = fb.req_to_token

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                fb: ForwardBatch, kv_stored: bool = False) -> torch.Tensor:
        if not kv_stored:
            self.store_kv(layer_id, fb, k, v)
        group = self.num_heads // self.num_kv_heads
        q = q.view(-1, self.num_kv_heads, group, self.head_dim)
        out = torch.empty_like(q)
        for start in range(0, q.shape[0], ROW_CHUNK):
            rows = slice(start, start + ROW_CHUNK)
            out[rows] = self._attend(q[rows], self._pool_rows[rows], self._positions[rows],
                                     layer_id).to(q.dtype)
        return out.view(-1, self.num_heads * self.head_dim)

    def _attend(self, q: torch.Tensor, pool_rows: torch.Tensor, positions: torch.Tensor,
                layer_id: int) -> torch.Tensor:
        """q [rows, kv_heads, group, dim] against each row's keys; fp32 [rows, kv_heads,
        group, dim]."""
        layer: LayerAttention = self.layers[layer_id]
        k_buf, v_buf = self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id]
        q = q.float().unsqueeze(3)  # [rows, kv_heads, group, 1, dim]
        rows = q.shape[0]
        state = q.new_zeros(rows, self.num_kv_heads, q.shape[2], self.head_dim)
        total = q.new_zeros(rows, self.num_kv_heads, q.shape[2])
        running_max = torch.full_like(total, float("-inf"))
        offsets = torch.arange(BLOCK, device=q.device)
        last_column = self._table.shape[1] - 1
        for block in range(self._num_blocks):
            keys = block * BLOCK + offsets  # absolute positions: the same for every batching
            hidden = keys[None, :] > positions[:, None]
            if layer.sliding_window is not None:
                hidden |= keys[None, :] <= positions[:, None] - layer.sliding_window
            slots = self._table[pool_rows[:, None], keys.clamp(max=last_column)[None, :]]
            # [rows, kv_heads, 1, BLOCK, dim] from the pool's [kv_heads, slots, dim].
            k_blk = k_buf[:, slots].permute(1, 0, 2, 3).float().unsqueeze(2)
            scores = (q * k_blk).sum(-1) * layer.scale  # [rows, kv_heads, group, BLOCK]
            if layer.logit_softcap is not None:
                scores = torch.tanh(scores / layer.logit_softcap) * layer.logit_softcap
            scores = scores.masked_fill(hidden[:, None, None, :], float("-inf"))
            new_max = torch.maximum(running_max, scores.amax(-1))
            # A row with no visible key yet keeps max -inf; subtract 0 there, not -inf.
            shift = torch.where(new_max == float("-inf"), 0.0, new_max)
            probs = torch.exp(scores - shift.unsqueeze(-1))
            rescale = _exp_per_row(running_max - shift)
            v_blk = v_buf[:, slots].permute(1, 0, 2, 3).float().unsqueeze(2)
            state = state * rescale.unsqueeze(-1) + (probs.unsqueeze(-1) * v_blk).sum(-2)
            total = total * rescale + probs.sum(-1)
            running_max = new_max
        return state / total.unsqueeze(-1)


class CpuDeterministicBackend(CpuBackend):
    """Every forward, decode included, through the extend kernel with fixed key blocks;
    without the cascade and the decode kernel's split of long rows, which would change a
    row's sums with its batch."""

    fixed_blocks = True

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        self._init_extend_metadata(fb)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                fb: ForwardBatch, kv_stored: bool = False) -> torch.Tensor:
        if not kv_stored:
            self.store_kv(layer_id, fb, k, v)
        out = self._extend(q.view(-1, self.num_heads, self.head_dim), k, v, layer_id, fb)
        return out.view(-1, self.num_heads * self.head_dim)


def _exp_per_row(x: torch.Tensor) -> torch.Tensor:
    """exp of x [rows, heads, group], each element computed the same way whatever `rows` is.

    torch's CPU kernels run a tensor's elements in vector chunks and the last few (numel
    modulo the chunk) through a scalar exp that can round differently, so which elements fall
    in that tail depends on the row count. Widened to BLOCK columns, numel is a multiple of
    every vector chunk and no element is ever in a tail."""
    return torch.exp(x.unsqueeze(-1).expand(*x.shape, BLOCK).contiguous())[..., 0]
