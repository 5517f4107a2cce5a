"""Random ragged batches over a paged KV pool, the shapes the kernel tests sweep."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglbatch.engine.attention.base import LayerAttention
from sglbatch.engine.batch import ForwardBatch
from sglbatch.engine.kv_pool import KVPool

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The 16-bit dtype the tests sweep: bf16 on a GPU. Triton's interpreter computes on numpy
# arrays, and numpy has no bf16 (its arithmetic would run on the raw bits), so fp16 there.
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16


@dataclass
class Ragged:
    k_buf: torch.Tensor  # [kv_heads, slots + 1, head_dim]
    v_buf: torch.Tensor
    req_to_token: torch.Tensor  # [rows, max_len]
    req_pool_indices: torch.Tensor  # [batch]
    prefix_lens: torch.Tensor  # [batch] int32: tokens already in the pool
    extend_lens: torch.Tensor  # [batch] int32: new tokens this step
    extend_start: torch.Tensor  # [batch] int32
    new_loc: torch.Tensor  # [sum(extend_lens)] the new tokens' slots


def ragged_batch(prefix_lens: list[int], extend_lens: list[int], kv_heads: int, head_dim: int,
                 dtype: torch.dtype, seed: int) -> Ragged:
    """Each request gets a table row (rows shuffled) naming scattered slots: its prefix's,
    then its new tokens'. Pool contents are random; slot 0 stays zero, as in the engine."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(prefix_lens)
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    num_slots = sum(seq_lens) + 16
    slots = torch.randperm(num_slots, generator=gen)[:sum(seq_lens)] + 1
    rows = torch.randperm(batch + 2, generator=gen)[:batch]
    table = torch.zeros((batch + 2, max(seq_lens) + 8), dtype=torch.int64)
    new_loc, taken = [], 0
    for b, (p, s) in enumerate(zip(prefix_lens, seq_lens)):
        table[rows[b], :s] = slots[taken:taken + s]
        new_loc.append(slots[taken + p:taken + s])
        taken += s
    shape = (kv_heads, num_slots + 1, head_dim)
    k_buf = torch.randn(shape, generator=gen).to(dtype)
    v_buf = torch.randn(shape, generator=gen).to(dtype)
    k_buf[:, 0] = 0
    v_buf[:, 0] = 0
    starts = [sum(extend_lens[:b]) for b in range(batch)]

    def ints(values):
        return torch.tensor(values, dtype=torch.int32, device=DEVICE)

    return Ragged(k_buf.to(DEVICE), v_buf.to(DEVICE), table.to(DEVICE), rows.to(DEVICE),
                  ints(prefix_lens), ints(extend_lens), ints(starts),
                  torch.cat(new_loc).to(DEVICE))


def poison_before(r: Ragged, rows: list[int], ends: list[int]) -> None:
    """NaN into K and V of each request's slots before column ends[b] (its first key in the
    window): a kernel that reads any of them, even masked, returns NaN (0 * NaN in p @ v)."""
    for row, end in zip(rows, ends):
        slots = r.req_to_token[row, :max(end, 0)]
        r.k_buf[:, slots] = float("nan")
        r.v_buf[:, slots] = float("nan")


def random_lens(n: int, low: int, high: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (n,), generator=gen).tolist()


def tolerance(dtype: torch.dtype) -> dict:
    return {"atol": 2e-5, "rtol": 2e-5} if dtype == torch.float32 else \
        {"atol": 2e-2, "rtol": 2e-2}


def decode_out_tolerance(dtype: torch.dtype, head_dim: int, tol: float) -> dict:
    """The CPU decode kernel's output tolerance against an exact reference: `tol` (its sums
    are fp32), but for bf16 at head_dim 64 or 128, whose AVX512-BF16 path rounds each
    probability to bf16 for the value sums (a relative 2^-9) in a weighted mean of values of
    size ~1 to ~3."""
    if dtype == torch.bfloat16 and head_dim % 64 == 0:
        return {"atol": 6e-3, "rtol": 1e-2}
    return {"atol": tol, "rtol": tol}


def forward_reference(q: torch.Tensor, kv_pool: KVPool, layer_id: int, fb: ForwardBatch,
                      layer: LayerAttention, heads: int) -> torch.Tensor:
    """What an attention backend's forward returns for `fb` once it stored the step's K/V:
    each request's new tokens (q: [tokens, heads * head_dim]) over its row of slots in the
    pool, by the dense reference with `layer`'s scale, window and soft-cap."""
    from sglbatch.kernels.extend_attention import attention_reference

    q = q.view(len(q), heads, -1)
    out = torch.empty_like(q)
    for b, (prefix, seq_len) in enumerate(zip(fb.prefix_lens_cpu, fb.seq_lens_cpu)):
        slots = fb.req_to_token[fb.req_pool_indices[b], :seq_len]
        k, v = kv_pool.get_kv(layer_id, slots)
        first = int(fb.extend_start[b])
        rows = slice(first, first + seq_len - prefix)
        positions = torch.arange(prefix, seq_len, device=q.device)
        out[rows] = attention_reference(q[rows], k.transpose(0, 1), v.transpose(0, 1),
                                        positions, layer.scale, layer.sliding_window,
                                        layer.logit_softcap)[0].to(q.dtype)
    return out.view(len(q), -1)
