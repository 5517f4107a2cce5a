"""RMSNorm, optionally fused with the residual add before it (one read and write of the
hidden state instead of three).

Rounding follows the unfused torch path (`sglbatch.engine.layers.norm.rms_norm` after
`hidden = hidden + x`): the sum is rounded to the input dtype, normalized in fp32, rounded
again, then scaled by the weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglbatch.kernels.common import block_size


@triton.jit
def _rmsnorm_kernel(X, Residual, W, Out, eps, stride_x, stride_r, stride_o,
                    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(Residual + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(Residual + row * stride_r + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / HIDDEN + eps)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    # The product of two 16-bit values is exact in fp32: rounding it once at the store is
    # what torch's 16-bit multiply does.
    y = w * (xf * rstd).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Out + row * stride_o + offs, y.to(Out.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """x: [tokens, hidden]. Returns the normed rows; with `residual`, first does
    `residual += x` in place and norms that sum (the pre-norm transformer's step)."""
    assert x.stride(-1) == 1 and (residual is None or residual.stride(-1) == 1)
    tokens, hidden = x.shape
    out = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
    if tokens == 0:
        return out
    _rmsnorm_kernel[(tokens,)](
        x, residual if residual is not None else x, weight, out, eps, x.stride(0),
        residual.stride(0) if residual is not None else 0, out.stride(0),
        HIDDEN=hidden, BLOCK=block_size(hidden), HAS_RESIDUAL=residual is not None)
    return out


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                      residual: torch.Tensor | None = None) -> torch.Tensor:
    if residual is not None:
        residual.add_(x)
        x = residual
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
