"""Rotary position embeddings (rotate-half layout, as in Hugging Face Llama/Qwen2)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama-3.1 frequency scaling: long wavelengths are divided by `factor`, short ones kept,
    and the band between is interpolated smoothly."""
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _longrope_attention_factor(scaling: dict[str, Any]) -> float:
    """How much longrope scales cos and sin: given, or the LongRoPE paper's choice for the
    context extension `factor`."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = scaling["factor"]
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(scaling["original_max_position_embeddings"]))


def compute_inv_freq(dim: int, base: float, scaling: dict[str, Any] | None,
                     context_len: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of `dim` rotated values, and the factor cos and sin are scaled
    by. Longrope (Phi-3) takes its long factors when the served `context_len` exceeds the
    pretraining length, its short ones otherwise, for every position: transformers switches
    per forward pass by the current length, which the KV cache cannot follow (keys cached
    under one set would meet queries under the other)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (base ** exponents)
    if scaling is None:
        return inv_freq, 1.0
    rope_type = scaling.get("rope_type") or scaling.get("type")
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling), 1.0
    if rope_type == "linear":
        return inv_freq / scaling["factor"], 1.0
    if rope_type == "longrope":
        long = context_len > scaling["original_max_position_embeddings"]
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"],
                               dtype=torch.float32)
        return 1.0 / (factors * base ** exponents), _longrope_attention_factor(scaling)
    raise ValueError(f"rope_scaling type {rope_type!r} is not supported; "
                     "supported: llama3, linear, longrope")


class RotaryEmbedding(nn.Module):
    """Applies RoPE to flattened q/k given each token's absolute position; with `rotary_dim`
    below head_dim, to each head's first `rotary_dim` values only (partial rotary)."""

    def __init__(self, head_dim: int, max_position: int, base: float,
                 scaling: dict[str, Any] | None, rotary_dim: int | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        inv_freq, cos_sin_scale = compute_inv_freq(self.rotary_dim, base, scaling, max_position)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cache", emb.cos() * cos_sin_scale, persistent=False)
        self.register_buffer("sin_cache", emb.sin() * cos_sin_scale, persistent=False)
        # The CPU kernel behind `rotate_and_store` (layers.fused_cpu); None: torch ops only.
        self.rope_store_kv: Callable[..., None] | None = None

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos_cache[positions].to(q.dtype).unsqueeze(1)  # [tokens, 1, rotary_dim]
        sin = self.sin_cache[positions].to(q.dtype).unsqueeze(1)
        q = self._rotate(q.view(q.shape[0], -1, self.head_dim), cos, sin)
        k = self._rotate(k.view(k.shape[0], -1, self.head_dim), cos, sin)
        return q.flatten(1), k.flatten(1)

    def rotate_and_store(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                         slots: torch.Tensor) -> None:
        """`forward` done in place on q and k (the bits it gives), with k and v also
        written to `slots` of a layer's KV pool buffers, in one pass per token."""
        self.rope_store_kv(positions, q, k, v, self.cos_cache, self.sin_cache, self.rotary_dim,
                           k_buffer, v_buffer, slots)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rotary_dim == self.head_dim:
            return x * cos + _rotate_half(x) * sin
        rotated, passed = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        return torch.cat((rotated * cos + _rotate_half(rotated) * sin, passed), dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
