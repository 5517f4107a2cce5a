"""Extend (prefill) attention: each request's new tokens attend, causally, the new tokens
themselves, read from the step's contiguous K/V, and its cached prefix, read from the paged
pool through `req_to_token`.

A program handles one (request, query head, block of BLOCK_M new tokens). A block past a
request's new tokens runs no iterations (its loop bounds are multiplied by zero) rather
than returning early, which keeps the kernel a single structured region.

With a sliding window W a query at position i sees keys i-W+1 .. i: both loops start at the
block's first visible key (the keys before it stay in the pool, unread), and a mask cuts
each row's own window. A logit soft-cap s maps each scaled score x to s * tanh(x / s).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglbatch.kernels.common import block_size, dot_precision, online_softmax_step

BLOCK_M = 32  # query rows per program
BLOCK_N = 32  # keys per inner step


@triton.jit
def scaled_scores(q, k, scale, softcap, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """q @ k times `scale`, soft-capped when SOFTCAP. tanh is written with exp: Triton has
    no portable tanh (libdevice's does not run under the interpreter); exp overflowing to
    inf still gives the right limit, 1."""
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale
    if SOFTCAP:
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
    return s


@triton.jit
def _extend_kernel(Q, K, V, O, K_buf, V_buf, Req_to_token, Req_pool_indices, Prefix_lens,
                   Extend_lens, Extend_start, scale, window, softcap,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_ot, stride_oh, stride_kbh, stride_kbs, stride_vbh, stride_vbs,
                   stride_r2t,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr,
                   SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
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
    # Each row's position among the new tokens, for the masks.
    q_pos = m_idx
    new_lo = 0  # the first new token any row of the block sees
    if WINDOW:
        # Padding rows take the last row's window, so they too see a key (no 0/0). Every
        # row's first visible key then lies in the first block of the loop below, as
        # online_softmax_step needs, because a block of keys covers a block of rows.
        tl.static_assert(BLOCK_M <= BLOCK_N)
        q_pos = tl.minimum(m_idx, extend_len - 1)
        new_lo = tl.maximum(block_m * BLOCK_M - window + 1, 0)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q = tl.load(Q + (first + m_idx[:, None]) * stride_qt + head * stride_qh + d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # The new tokens first, causally: the block's rows see keys up to their own position.
    # Every row sees one key in the first block (key 0, or its window's first), so the
    # prefix loop may then mask a row's whole block.
    seen = tl.minimum(extend_len, (block_m + 1) * BLOCK_M) * live
    for n0 in range(new_lo, seen, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < extend_len
        k = tl.load(K + (first + n[None, :]) * stride_kt + kv_head * stride_kh + d[:, None],
                    mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        s = scaled_scores(q, k, scale, softcap, SOFTCAP, DOT_PRECISION)
        visible = n_mask[None, :] & (n[None, :] <= q_pos[:, None])
        if WINDOW:
            visible = visible & (n[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        v = tl.load(V + (first + n[:, None]) * stride_vt + kv_head * stride_vh + d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        m, l, acc = online_softmax_step(s, v, m, l, acc, DOT_PRECISION)

    # The cached prefix: all in every new token's past, some of it left behind by a window.
    prefix_lo = 0
    if WINDOW:
        prefix_lo = tl.maximum(prefix_len + block_m * BLOCK_M - window + 1, 0)
    for n0 in range(prefix_lo, prefix_len * live, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < prefix_len
        slots = tl.load(Req_to_token + row * stride_r2t + n, mask=n_mask, other=0).to(tl.int64)
        k = tl.load(K_buf + kv_head * stride_kbh + slots[None, :] * stride_kbs + d[:, None],
                    mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        s = scaled_scores(q, k, scale, softcap, SOFTCAP, DOT_PRECISION)
        visible = n_mask[None, :]
        if WINDOW:
            visible = visible & (n[None, :] > prefix_len + q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        v = tl.load(V_buf + kv_head * stride_vbh + slots[:, None] * stride_vbs + d[None, :],
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
                     max_extend_len: int, sliding_window: int | None = None,
                     logit_softcap: float | None = None) -> torch.Tensor:
    """q: [tokens, heads, head_dim], k, v: [tokens, kv_heads, head_dim], the new tokens of
    all requests concatenated (request b's at extend_start[b] : + extend_lens[b]);
    its cached prefix is slots req_to_token[req_pool_indices[b], :prefix_lens[b]] of
    k_buf, v_buf: [kv_heads, slots + 1, head_dim]. `sliding_window` and `logit_softcap` as
    in `LayerAttention` (None: none). Returns [tokens, heads, head_dim]."""
    tokens, heads, head_dim = q.shape
    out = torch.empty_like(q)
    batch = len(extend_lens)
    if tokens == 0 or batch == 0:
        return out
    grid = (batch, heads, triton.cdiv(max_extend_len, BLOCK_M))
    _extend_kernel[grid](
        q, k, v, out, k_buf, v_buf, req_to_token, req_pool_indices, prefix_lens, extend_lens,
        extend_start, scale, sliding_window or 0, logit_softcap or 0.0, q.stride(0),
        q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
        out.stride(1), k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        req_to_token.stride(0),
        GROUP=heads // k.shape[1], HEAD_DIM=head_dim, BLOCK_D=block_size(head_dim),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, WINDOW=sliding_window is not None,
        SOFTCAP=logit_softcap is not None, DOT_PRECISION=dot_precision(q.dtype))
    return out


def attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        q_positions: torch.Tensor, scale: float,
                        sliding_window: int | None = None, logit_softcap: float | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of one request in fp32: q [n, heads, dim] at positions `q_positions`
    [n] over keys, values [len, kv_heads, dim] at positions 0 .. len - 1, causal and within
    the window. Returns the output [n, heads, dim] and its log-sum-exp [n, heads]."""
    group = q.shape[1] // keys.shape[1]
    keys = keys.float().repeat_interleave(group, dim=1)
    values = values.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), keys) * scale
    if logit_softcap is not None:
        scores = logit_softcap * torch.tanh(scores / logit_softcap)
    behind = q_positions[:, None] - torch.arange(len(keys), device=q.device)[None, :]
    visible = behind >= 0
    if sliding_window is not None:
        visible &= behind < sliding_window
    scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), values)
    return out, torch.logsumexp(scores, dim=-1).transpose(0, 1)


def extend_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               k_buf: torch.Tensor, v_buf: torch.Tensor,
                               req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                               prefix_lens: torch.Tensor, extend_lens: torch.Tensor,
                               extend_start: torch.Tensor, scale: float,
                               sliding_window: int | None = None,
                               logit_softcap: float | None = None) -> torch.Tensor:
    """The same contract, one request at a time in fp32."""
    out = torch.empty_like(q)
    for row, prefix, n, first in zip(req_pool_indices.tolist(), prefix_lens.tolist(),
                                     extend_lens.tolist(), extend_start.tolist()):
        slots = req_to_token[row, :prefix]
        keys = torch.cat([k_buf[:, slots].transpose(0, 1), k[first:first + n]])
        values = torch.cat([v_buf[:, slots].transpose(0, 1), v[first:first + n]])
        positions = torch.arange(prefix, prefix + n, device=q.device)
        out[first:first + n] = attention_reference(
            q[first:first + n], keys, values, positions, scale, sliding_window,
            logit_softcap)[0].to(q.dtype)
    return out
