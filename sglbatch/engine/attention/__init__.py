"""Attention backends by name; each module is imported only when chosen."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch

from sglbatch.engine.attention import cpu_kernels
from sglbatch.engine.attention.base import AttentionBackend, LayerAttention
from sglbatch.engine.kv_pool import KVPool

SUPPORTED_BACKENDS = ("cpu", "torch", "triton", "flashinfer")


def is_installed(module: str) -> bool:
    """Whether an optional package (triton, flashinfer) can be imported, without importing it."""
    return importlib.util.find_spec(module) is not None


# The C++ modules the cpu backend runs on (attention/csrc).
CPU_BACKEND_KERNELS = ("decode_attention", "extend_attention")


def resolve_backend_name(name: str, device: str, dtype: torch.dtype | None = None) -> str:
    if name == "auto":
        if device == "cuda":
            # FlashInfer's kernels take 16-bit K/V only.
            if is_installed("flashinfer") and dtype != torch.float32:
                return "flashinfer"
            return "triton" if is_installed("triton") else "torch"
        kernels_built = all(cpu_kernels.load(k) is not None for k in CPU_BACKEND_KERNELS)
        return "cpu" if device == "cpu" and kernels_built else "torch"
    if name not in SUPPORTED_BACKENDS:
        raise ValueError(f"attention_backend={name!r} is not one of "
                         f"{['auto', *SUPPORTED_BACKENDS]}")
    return name


def create_attention_backend(name: str, device: str, kv_pool: KVPool, num_heads: int,
                             num_kv_heads: int, head_dim: int,
                             layers: Sequence[LayerAttention] | None = None) -> AttentionBackend:
    args = (kv_pool, num_heads, num_kv_heads, head_dim, layers)
    if name == "deterministic":  # enable_deterministic_inference, on any device
        from sglbatch.engine.attention import deterministic

        if resolve_backend_name("auto", device) == "cpu":  # the CPU kernels build here
            return deterministic.CpuDeterministicBackend(*args)
        return deterministic.DeterministicBackend(*args)
    name = resolve_backend_name(name, device, kv_pool.k_buffers[0].dtype)
    if name == "cpu":
        from sglbatch.engine.attention.cpu import CpuBackend

        return CpuBackend(*args)
    if name == "torch":
        from sglbatch.engine.attention.torch_native import TorchNativeBackend

        return TorchNativeBackend(*args)
    if name == "triton":
        if not is_installed("triton"):
            raise ValueError("attention_backend='triton' needs the triton package "
                             "(pip install 'sglbatch[gpu]' or pip install triton)")
        if device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            # Stock Triton compiles for GPUs only; its interpreter runs the kernels on CPU
            # tensors (slowly: for tests).
            raise ValueError("attention_backend='triton' on the CPU needs TRITON_INTERPRET=1 "
                             "in the environment (Triton's interpreter, slow; for tests)")
        from sglbatch.engine.attention.triton_backend import TritonBackend

        return TritonBackend(*args)
    if name == "flashinfer":
        from sglbatch.engine.attention.flashinfer_backend import FlashInferBackend

        return FlashInferBackend(*args)
    raise AssertionError(name)
