"""The compute ceiling for batched decode on this machine: what a large matmul in the
model's dtype reaches, divided by the model's FLOPs per generated token."""

from __future__ import annotations

import time

import torch


def matmul_flops_per_second(dtype: torch.dtype, size: int = 1024, repeats: int = 20) -> float:
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def decode_ceiling(flops_per_token: int, dtype: torch.dtype) -> dict[str, float]:
    flops = matmul_flops_per_second(dtype)
    return {"matmul_gflops": flops / 1e9, "model_mflops_per_token": flops_per_token / 1e6,
            "ceiling_tokens_per_s": flops / flops_per_token}
