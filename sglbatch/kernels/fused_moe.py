"""Fused mixture-of-experts MLP (SGLang's / vLLM's fused_moe design).

Each (token, expert) pair the router picked is placed, grouped by expert, into blocks of
BLOCK_M rows, each block one expert's (`moe_align_block_size`; an expert's last block is
padded). One grouped GEMM kernel then runs every block against its expert's weights, so a
batch costs two launches whatever the routing:

1. w13 with SwiGLU: each program computes matching tiles of the gate and up projections
   and stores silu(gate) * up, so the [pairs, 2 * inter] projection never reaches memory;
2. w2, each row scaled by its routing weight; the top-k rows of each token are then summed.

The alignment is torch ops with no host sync and the grids are sized from the pair count
alone, so a decode step can be captured in a CUDA graph. Accumulation is fp32; fp32 inputs
get exact ("ieee") products (see common.dot_precision).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglbatch.kernels.common import dot_precision


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted pair ids, each block's expert, rows used) for topk_ids [tokens, top_k].

    Pair p = token * top_k + k. `sorted_ids` lists the pairs expert by expert, each expert's
    run padded to a multiple of `block_m` with the id `pairs` (masked by the kernel); its
    length is a static bound, `pairs + min(pairs, experts) * (block_m - 1)` rounded up to a
    block. `block_expert[b]` is block b's expert (`num_experts` past the used rows, which
    the kernel skips: `rows_used` [1] is how many rows of `sorted_ids` are real or padding).
    """
    flat = topk_ids.flatten().long()
    pairs = flat.numel()
    device = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = flat.argsort(stable=True)
    sorted_experts = flat[order]
    # Row of the i-th pair in expert order: its expert's first row + its rank among the
    # expert's pairs (i - the expert's first index in `order`).
    first_pair = counts.cumsum(0) - counts
    rows = (ends - padded - first_pair)[sorted_experts] + torch.arange(pairs, device=device)
    capacity = triton.cdiv(pairs + min(pairs, num_experts) * (block_m - 1), block_m) * block_m
    sorted_ids = torch.full((capacity,), pairs, dtype=torch.int32, device=device)
    sorted_ids[rows] = order.to(torch.int32)
    block_starts = torch.arange(0, capacity, block_m, device=device)
    block_expert = torch.searchsorted(ends, block_starts, right=True).to(torch.int32)
    return sorted_ids, block_expert, ends[-1:]


@triton.jit
def _moe_gemm_kernel(A, W, C, RoutingWeights, SortedIds, BlockExpert, RowsUsed,
                     num_pairs, N, K, stride_am, stride_we, stride_wn, stride_wk, stride_cm,
                     A_ROW_DIV: tl.constexpr, SWIGLU: tl.constexpr, MUL_WEIGHT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """C[pair, n] = A[pair // A_ROW_DIV] . W[expert, n] for one block of pairs (one expert)
    and BLOCK_N output columns. SWIGLU: W holds gate rows [0, N) and up rows [N, 2N), and C
    gets silu(gate) * up. MUL_WEIGHT: each row is scaled by its pair's routing weight."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(RowsUsed):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(SortedIds + offs_m)
    row_ok = pair < num_pairs
    expert = tl.load(BlockExpert + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + (pair // A_ROW_DIV).to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    w_ptrs = W + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        if SWIGLU:
            w_up = tl.load(w_ptrs + N * stride_wn, mask=k_ok[:, None] & col_ok[None, :],
                           other=0.0)
            acc_up = tl.dot(a, w_up, acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc_up
    if MUL_WEIGHT:
        acc = acc * tl.load(RoutingWeights + pair, mask=row_ok, other=0.0)[:, None]
    c_ptrs = C + pair.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _tile(n: int) -> int:
    return min(64, max(16, triton.next_power_of_2(n)))  # tl.dot needs 16 or more


def _gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, routing_weights: torch.Tensor,
          aligned: tuple[torch.Tensor, torch.Tensor, torch.Tensor], a_row_div: int, n: int,
          swiglu: bool, block_m: int) -> None:
    sorted_ids, block_expert, rows_used = aligned
    k = a.shape[1]
    block_n, block_k = _tile(n), _tile(k)
    grid = (sorted_ids.numel() // block_m, triton.cdiv(n, block_n))
    _moe_gemm_kernel[grid](
        a, w, out, routing_weights, sorted_ids, block_expert, rows_used, out.shape[0], n, k,
        a.stride(0), w.stride(0), w.stride(1), w.stride(2), out.stride(0),
        A_ROW_DIV=a_row_div, SWIGLU=swiglu, MUL_WEIGHT=not swiglu, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, DOT_PRECISION=dot_precision(a.dtype))


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """x [tokens, hidden]; w13 [experts, 2 * inter, hidden] (gate rows, then up); w2
    [experts, hidden, inter]; topk_weights [tokens, top_k] (fp32) and topk_ids [tokens,
    top_k]. Returns sum_k topk_weights[t, k] * expert_k(x[t]) as [tokens, hidden]."""
    assert x.stride(-1) == 1 and w13.stride(-1) == 1 and w2.stride(-1) == 1
    tokens, top_k = topk_ids.shape
    num_experts, inter = w13.shape[0], w2.shape[2]
    if tokens == 0:
        return x.new_zeros(x.shape)
    pairs = tokens * top_k
    # Small blocks when each expert gets few rows (decode): less padding per expert.
    block_m = 16 if pairs <= 16 * num_experts else 64
    aligned = moe_align_block_size(topk_ids, block_m, num_experts)
    weights = topk_weights.float().contiguous()
    act = x.new_empty(pairs, inter)
    _gemm(x, w13, act, weights, aligned, top_k, inter, True, block_m)
    out = x.new_empty(pairs, x.shape[1])
    _gemm(act, w2, out, weights, aligned, 1, x.shape[1], False, block_m)
    return out.view(tokens, top_k, -1).sum(dim=1)
