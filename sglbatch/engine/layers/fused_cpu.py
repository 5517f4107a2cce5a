"""The CPU's fused elementwise kernels (attention/csrc/fused_ops.cpp) plugged into a model:
each RMSNorm (with the residual add before it) in one pass per row, and rope together with
the store of the new K/V into the pool (models.llama's attention decides where it runs).

Rope gives the torch ops' bits in every dtype (in bf16 with AVX512-BF16, but for values
below bf16's normal range, ~1e-38, which its rounding instruction flushes to zero). The norm
sums its squares in another order than torch's reduction, so fp32 models, which must match
transformers token for token, keep torch's norm; 16-bit ones round as torch does but for a
rare one-unit difference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sglbatch.engine.attention import cpu_kernels
from sglbatch.engine.layers.norm import RMSNorm
from sglbatch.engine.layers.rotary import RotaryEmbedding
from sglbatch.engine.trace import trace_range

# Profiles see a C++ call made outside torch's dispatcher only through a range around it.
TRACE_NAME = "sglbatch.cpu_elementwise"


def _traced(kernel: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        with trace_range(TRACE_NAME):
            return kernel(*args)
    return call


def use_fused_cpu_ops(model: nn.Module, dtype: torch.dtype) -> None:
    """Plugs the kernels into `model`'s layers; nothing changes where they cannot be built."""
    kernels = cpu_kernels.load("fused_ops")
    if kernels is None:
        return
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.rope_store_kv = _traced(kernels.rope_store_kv)
        elif isinstance(module, RMSNorm) and dtype != torch.float32:
            module.impl = _traced(kernels.rms_norm)
            module.fused_add_norm = _traced(kernels.fused_add_rms_norm)
