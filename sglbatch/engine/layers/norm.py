"""RMSNorm, computed in fp32 and cast back as transformers does (bit-identical in fp32).

Called with a `residual`, it is the pre-norm block's "add, then norm" step: it returns
(norm(residual + x), residual + x). On CUDA that step is one fused Triton kernel
(`sglbatch.kernels.rmsnorm`, see `use_fused_kernel`); on the CPU, for 16-bit models, a C++
kernel (`layers.fused_cpu`); elsewhere it is the same two torch ops the unfused model runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.impl = rms_norm  # swapped for a compiled one by layers.compile
        # (x, weight, eps, residual) -> normed, adding x into residual in place.
        self.fused_add_norm: Callable[..., torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self.impl(x, self.weight, self.eps)
        if self.fused_add_norm is not None:
            return self.fused_add_norm(x, self.weight, self.eps, residual), residual
        residual = residual + x
        return self.impl(residual, self.weight, self.eps), residual


def use_fused_kernel(model: nn.Module) -> None:
    """Every RMSNorm's add-then-norm step runs the Triton kernel (the CUDA path; on the CPU
    only under TRITON_INTERPRET=1, for tests)."""
    from sglbatch.kernels.rmsnorm import rmsnorm

    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.fused_add_norm = rmsnorm
