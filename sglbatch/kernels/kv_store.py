"""KV store: write a step's new K/V rows into their slots of the paged pool."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglbatch.kernels.common import block_size


@triton.jit
def _store_kv_kernel(K_new, V_new, Loc, K_buf, V_buf,
                     stride_knt, stride_knh, stride_vnt, stride_vnh,
                     stride_kbh, stride_kbs, stride_vbh, stride_vbs,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    slot = tl.load(Loc + token).to(tl.int64)
    k = tl.load(K_new + token * stride_knt + head * stride_knh + d, mask=d_mask)
    v = tl.load(V_new + token * stride_vnt + head * stride_vnh + d, mask=d_mask)
    tl.store(K_buf + head * stride_kbh + slot * stride_kbs + d, k, mask=d_mask)
    tl.store(V_buf + head * stride_vbh + slot * stride_vbs + d, v, mask=d_mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, loc: torch.Tensor, k_buf: torch.Tensor,
             v_buf: torch.Tensor) -> None:
    """k, v: [tokens, kv_heads, head_dim]; loc: [tokens] slots; k_buf, v_buf:
    [kv_heads, slots + 1, head_dim], written in place."""
    tokens, kv_heads, head_dim = k.shape
    if tokens == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_buf.stride(-1) == 1
    _store_kv_kernel[(tokens, kv_heads)](
        k, v, loc, k_buf, v_buf, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_size(head_dim))


def store_kv_reference(k: torch.Tensor, v: torch.Tensor, loc: torch.Tensor,
                       k_buf: torch.Tensor, v_buf: torch.Tensor) -> None:
    k_buf[:, loc] = k.transpose(0, 1)
    v_buf[:, loc] = v.transpose(0, 1)
