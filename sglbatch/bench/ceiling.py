"""The compute ceiling for batched decode on this machine: what a large matmul in the
model's dtype reaches, divided by the model's FLOPs per generated token."""

from __future__ import annotations

import time

import torch


def matmul_flops_per_second(dtype: torch.dtype, size: int = 1024, repeats: int = 20) -> float:
    """The fastest of `repeats` timed matmuls: a ceiling is the best rate, and a shared
    machine's passing load must not lower it (an MFU over it would pass 100%)."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    fastest = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        fastest = min(fastest, time.perf_counter() - start)
    return 2 * size ** 3 / fastest


def decode_ceiling(flops_per_token: int, dtype: torch.dtype) -> dict[str, float]:
    flops = matmul_flops_per_second(dtype)
    return {"matmul_gflops": flops / 1e9, "model_mflops_per_token": flops_per_token / 1e6,
            "ceiling_tokens_per_s": flops / flops_per_token}
