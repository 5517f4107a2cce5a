"""Decode attention: one new query token per request over its K/V in the paged pool.

Split-KV ("flash decoding"): stage 1 gives each (request, kv head, split) a program that
attends the split's slice of the sequence and writes a partial output and its log-sum-exp;
stage 2 merges a request's splits exactly. Long contexts with few requests thus still fill
the GPU. Grouped-query attention: a program handles all query heads sharing one kv head,
so each K/V block is loaded once per group (padded to 16 rows, the smallest `tl.dot`).

A sliding window W makes a request attend only its last W keys: the splits divide that
range, from the window's first key (the keys before it stay in the pool, unread). A logit
soft-cap is applied to the scaled scores as in extend attention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglbatch.kernels.common import block_size, dot_precision, online_softmax_step
from sglbatch.kernels.extend_attention import attention_reference, scaled_scores

BLOCK_N = 64  # keys per inner step; splits are whole multiples of it
MAX_NUM_SPLITS = 8
MIN_SPLIT_LEN = 4 * BLOCK_N  # below this a split's work does not pay for its launch


def num_splits_for(max_seq_len: int, sliding_window: int | None = None) -> int:
    """Splits for a batch whose longest sequence is `max_seq_len` (of which a window attends
    only the last `sliding_window` keys): enough to spread a long context over the GPU, none
    wasted on short ones. (A CUDA graph fixes one count for all replays; it uses
    MAX_NUM_SPLITS, and splits past a sequence's end exit at once.)"""
    keys = min(max_seq_len, sliding_window or max_seq_len)
    return max(1, min(MAX_NUM_SPLITS, triton.cdiv(keys, MIN_SPLIT_LEN)))


@triton.jit
def _split_bounds(seq_len, window, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
                  WINDOW: tl.constexpr):
    # The keys attended start at the window's first; splits are whole blocks of them, so a
    # short sequence uses only its first splits.
    first = 0
    if WINDOW:
        first = tl.maximum(seq_len - window, 0)
    split_len = tl.cdiv(tl.cdiv(seq_len - first, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = first + split * split_len
    return start, tl.minimum(start + split_len, seq_len)


@triton.jit
def _decode_stage1(Q, K_buf, V_buf, Req_to_token, Req_pool_indices, Seq_lens, Mid_o, Mid_lse,
                   scale, window, softcap, stride_qt, stride_qh, stride_kh, stride_ks,
                   stride_vh, stride_vs, stride_r2t, stride_mo_b, stride_mo_h, stride_mo_s,
                   stride_ml_b, stride_ml_h,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    h = tl.arange(0, BLOCK_H)
    h_mask = h < GROUP
    heads = kv_head * GROUP + h
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    seq_len = tl.load(Seq_lens + b)
    row = tl.load(Req_pool_indices + b).to(tl.int64)
    start, end = _split_bounds(seq_len, window, split, NUM_SPLITS, BLOCK_N, WINDOW)

    q = tl.load(Q + b * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < end
        slots = tl.load(Req_to_token + row * stride_r2t + n, mask=n_mask, other=0).to(tl.int64)
        k = tl.load(K_buf + kv_head * stride_kh + slots[None, :] * stride_ks + d[:, None],
                    mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        s = scaled_scores(q, k, scale, softcap, SOFTCAP, DOT_PRECISION)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        v = tl.load(V_buf + kv_head * stride_vh + slots[:, None] * stride_vs + d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        m, l, acc = online_softmax_step(s, v, m, l, acc, DOT_PRECISION)
    if end > start:
        mid = b * stride_mo_b + heads[:, None] * stride_mo_h + split * stride_mo_s + d[None, :]
        tl.store(Mid_o + mid, acc / l[:, None], mask=h_mask[:, None] & d_mask[None, :])
        tl.store(Mid_lse + b * stride_ml_b + heads * stride_ml_h + split, m + tl.log(l),
                 mask=h_mask)


@triton.jit
def _decode_stage2(Mid_o, Mid_lse, O, Seq_lens, window, stride_mo_b, stride_mo_h, stride_mo_s,
                   stride_ml_b, stride_ml_h, stride_ot, stride_oh,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   NUM_SPLITS: tl.constexpr, WINDOW: tl.constexpr):
    b = tl.program_id(0)
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    seq_len = tl.load(Seq_lens + b)
    m = float("-inf")
    l = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    for split in range(NUM_SPLITS):
        start, end = _split_bounds(seq_len, window, split, NUM_SPLITS, BLOCK_N, WINDOW)
        if end > start:
            o = tl.load(Mid_o + b * stride_mo_b + head * stride_mo_h + split * stride_mo_s + d,
                        mask=d_mask, other=0.0)
            lse = tl.load(Mid_lse + b * stride_ml_b + head * stride_ml_h + split)
            m_new = tl.maximum(m, lse)
            old = tl.exp(m - m_new)
            w = tl.exp(lse - m_new)
            acc = acc * old + o * w
            l = l * old + w
            m = m_new
    tl.store(O + b * stride_ot + head * stride_oh + d, (acc / l).to(O.dtype.element_ty),
             mask=d_mask)


def decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                     req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, num_splits: int,
                     sliding_window: int | None = None,
                     logit_softcap: float | None = None) -> torch.Tensor:
    """q: [batch, heads, head_dim]; k_buf, v_buf: [kv_heads, slots + 1, head_dim];
    request b attends slots req_to_token[req_pool_indices[b], :seq_lens[b]] (seq_lens >= 1),
    only the last `sliding_window` of them when given; `logit_softcap` as in
    `LayerAttention`. Returns [batch, heads, head_dim] in q's dtype."""
    batch, heads, head_dim = q.shape
    kv_heads = k_buf.shape[0]
    group = heads // kv_heads
    out = torch.empty_like(q)
    if batch == 0:
        return out
    mid_o = torch.empty((batch, heads, num_splits, head_dim), dtype=torch.float32,
                        device=q.device)
    mid_lse = torch.empty((batch, heads, num_splits), dtype=torch.float32, device=q.device)
    block_d = block_size(head_dim)
    window = sliding_window or 0
    _decode_stage1[(batch, kv_heads, num_splits)](
        q, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens, mid_o, mid_lse, scale,
        window, logit_softcap or 0.0, q.stride(0), q.stride(1), k_buf.stride(0),
        k_buf.stride(1), v_buf.stride(0), v_buf.stride(1), req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0),
        mid_lse.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_H=max(16, block_size(group)), BLOCK_D=block_d,
        BLOCK_N=BLOCK_N, NUM_SPLITS=num_splits, WINDOW=sliding_window is not None,
        SOFTCAP=logit_softcap is not None, DOT_PRECISION=dot_precision(q.dtype))
    _decode_stage2[(batch, heads)](
        mid_o, mid_lse, out, seq_lens, window, mid_o.stride(0), mid_o.stride(1),
        mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1), out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=BLOCK_N, NUM_SPLITS=num_splits,
        WINDOW=sliding_window is not None)
    return out


def decode_attention_reference(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                               req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                               seq_lens: torch.Tensor, scale: float,
                               sliding_window: int | None = None,
                               logit_softcap: float | None = None) -> torch.Tensor:
    """The same contract, one request at a time in fp32."""
    out = torch.empty_like(q)
    for b, (row, seq_len) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
        slots = req_to_token[row, :seq_len]
        position = torch.tensor([seq_len - 1], device=q.device)
        out[b] = attention_reference(
            q[b:b + 1], k_buf[:, slots].transpose(0, 1), v_buf[:, slots].transpose(0, 1),
            position, scale, sliding_window, logit_softcap)[0][0].to(q.dtype)
    return out
