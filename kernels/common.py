"""Small helpers shared by the kernel wrappers."""

from __future__ import annotations

import torch
import triton


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact products ("ieee"): Triton's default for fp32 is TF32 on GPUs,
    which would break fp32 greedy equality with the torch backend. 16-bit inputs are exact
    in any mode."""
    return "ieee" if dtype == torch.float32 else "tf32"


def block_size(n: int) -> int:
    return triton.next_power_of_2(n)
