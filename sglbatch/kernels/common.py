"""Helpers shared by the kernels and their wrappers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact products ("ieee"): Triton's default for fp32 is TF32 on GPUs,
    which would break fp32 greedy equality with the torch backend. 16-bit inputs are exact
    in any mode."""
    return "ieee" if dtype == torch.float32 else "tf32"


def block_size(n: int) -> int:
    return triton.next_power_of_2(n)


@triton.jit
def online_softmax_step(s, v, m, l, acc, DOT_PRECISION: tl.constexpr):
    """One block of keys into a running softmax: scores `s` [rows, keys] (masked keys at
    -inf; every row must see one real key in its first block), values `v` [keys, dim]; the
    running max `m`, sum `l` and unnormalized output `acc` are rescaled to the new max."""
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l, acc
