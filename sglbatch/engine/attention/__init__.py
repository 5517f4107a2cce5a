"""Attention backends by name; each module is imported only when chosen."""

from __future__ import annotations

from sglbatch.engine.attention import cpu_kernels
from sglbatch.engine.attention.base import AttentionBackend
from sglbatch.engine.kv_pool import KVPool

SUPPORTED_BACKENDS = ("cpu", "torch")


def resolve_backend_name(name: str, device: str) -> str:
    if name == "auto":
        # The GPU backends (triton, flashinfer) plug in here.
        return "cpu" if device == "cpu" and cpu_kernels.load() is not None else "torch"
    if name not in SUPPORTED_BACKENDS:
        raise ValueError(f"attention_backend={name!r} is not one of {['auto', *SUPPORTED_BACKENDS]}")
    return name


def create_attention_backend(name: str, device: str, kv_pool: KVPool, num_heads: int,
                             num_kv_heads: int, head_dim: int) -> AttentionBackend:
    name = resolve_backend_name(name, device)
    if name == "cpu":
        from sglbatch.engine.attention.cpu import CpuBackend

        return CpuBackend(kv_pool, num_heads, num_kv_heads, head_dim)
    if name == "torch":
        from sglbatch.engine.attention.torch_native import TorchNativeBackend

        return TorchNativeBackend(kv_pool, num_heads, num_kv_heads, head_dim)
    raise AssertionError(name)
