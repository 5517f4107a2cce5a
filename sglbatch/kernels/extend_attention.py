"""Extend (prefill) attention: each request's new tokens attend its cached prefix, read from
the paged pool through `req_to_token`, and then the new tokens themselves, read from the
step's contiguous K/V, causally.

A program handles one (request, query head, block of BLOCK_M new tokens). A block past a
request's new tokens runs no iterations (its loop bounds are multiplied by zero) rather
than returning early, which keeps the kernel a single structured region.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglbatch.kernels.common import block_size, dot_precision, online_softmax_step

BLOCK_M = 32  # query rows per program
BLOCK_N = 32  # keys per inner step


@triton.jit
def _extend_kernel(Q, K, V, O, K_buf, V_buf, Req_to_token, Req_pool_indices, Prefix_lens,
                   Extend_lens, Extend_start, scale,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_ot, stride_oh, stride_kbh, stride_kbs, stride_vbh, stride_vbs,
                   stride_r2t,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    b = tl.program_id(0)
    head = tl.program_id(1)
    block_m = tl.program_id(2)
    kv_head = head // GROUP
    prefix_len = tl.load(Prefix_lens + b)
    extend_len = tl.load(Extend_lens + b)
    first = tl.load(Extend_start + b).to(tl.int64)
    row = tl.load(Req_pool_indices + b).to(tl.int64)
    live = (block_m * BLOCK_M < extend_len).to(tl.int32)

    m_idx = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m_idx < extend_len
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q = tl.load(Q + (first + m_idx[:, None]) * stride_qt + head * stride_qh + d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # The cached prefix: every new token sees all of it.
    for n0 in range(0, prefix_len * live, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < prefix_len
        slots = tl.load(Req_to_token + row * stride_r2t + n, mask=n_mask, other=0).to(tl.int64)
        k = tl.load(K_buf + kv_head * stride_kbh + slots[None, :] * stride_kbs + d[:, None],
                    mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        v = tl.load(V_buf + kv_head * stride_vbh + slots[:, None] * stride_vbs + d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        m, l, acc = online_softmax_step(s, v, m, l, acc, DOT_PRECISION)

    # The new tokens, causally: the block's rows see keys up to their own position.
    seen = tl.minimum(extend_len, (block_m + 1) * BLOCK_M) * live
    for n0 in range(0, seen, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < extend_len
        k = tl.load(K + (first + n[None, :]) * stride_kt + kv_head * stride_kh + d[:, None],
                    mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale
        s = tl.where(n_mask[None, :] & (n[None, :] <= m_idx[:, None]), s, float("-inf"))
        v = tl.load(V + (first + n[:, None]) * stride_vt + kv_head * stride_vh + d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        m, l, acc = online_softmax_step(s, v, m, l, acc, DOT_PRECISION)

    # A row that saw any key has l >= 1 (its max term is exp(0)); only the rows of a dead
    # block have l == 0, and they are masked out of the store: no 0/0 computed for them.
    out = acc / tl.maximum(l, 1.0)[:, None]
    tl.store(O + (first + m_idx[:, None]) * stride_ot + head * stride_oh + d[None, :],
             out.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def extend_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_buf: torch.Tensor,
                     v_buf: torch.Tensor, req_to_token: torch.Tensor,
                     req_pool_indices: torch.Tensor, prefix_lens: torch.Tensor,
                     extend_lens: torch.Tensor, extend_start: torch.Tensor, scale: float,
                     max_extend_len: int) -> torch.Tensor:
    """q: [tokens, heads, head_dim], k, v: [tokens, kv_heads, head_dim], the new tokens of
    all requests concatenated (request b's at extend_start[b] : + extend_lens[b]);
    its cached prefix is slots req_to_token[req_pool_indices[b], :prefix_lens[b]] of
    k_buf, v_buf: [kv_heads, slots + 1, head_dim]. Returns [tokens, heads, head_dim]."""
    tokens, heads, head_dim = q.shape
    out = torch.empty_like(q)
    batch = len(extend_lens)
    if tokens == 0 or batch == 0:
        return out
    grid = (batch, heads, triton.cdiv(max_extend_len, BLOCK_M))
    _extend_kernel[grid](
        q, k, v, out, k_buf, v_buf, req_to_token, req_pool_indices, prefix_lens, extend_lens,
        extend_start, scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), out.stride(0), out.stride(1), k_buf.stride(0), k_buf.stride(1),
        v_buf.stride(0), v_buf.stride(1), req_to_token.stride(0),
        GROUP=heads // k.shape[1], HEAD_DIM=head_dim, BLOCK_D=block_size(head_dim),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, DOT_PRECISION=dot_precision(q.dtype))
    return out


def extend_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               k_buf: torch.Tensor, v_buf: torch.Tensor,
                               req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                               prefix_lens: torch.Tensor, extend_lens: torch.Tensor,
                               extend_start: torch.Tensor, scale: float) -> torch.Tensor:
    """The same contract, one request at a time in fp32."""
    heads, kv_heads = q.shape[1], k.shape[1]
    out = torch.empty_like(q)
    for row, prefix, n, first in zip(req_pool_indices.tolist(), prefix_lens.tolist(),
                                     extend_lens.tolist(), extend_start.tolist()):
        slots = req_to_token[row, :prefix]
        keys = torch.cat([k_buf[:, slots].transpose(0, 1), k[first:first + n]]).float()
        values = torch.cat([v_buf[:, slots].transpose(0, 1), v[first:first + n]]).float()
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)
        values = values.repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[first:first + n].float(), keys) * scale
        keys_at = torch.arange(prefix + n, device=q.device)
        visible = keys_at[None, :] <= keys_at[prefix:, None]
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        out[first:first + n] = torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)
    return out
