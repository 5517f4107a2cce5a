"""Gemma 2 and Gemma 3 (text): Llama's projections with Gemma's own choices.

- RMSNorm scales by (1 + weight), multiplied in fp32 before the cast back;
- "sandwich" norms: each sublayer's output is normed again before the residual add;
- a gated MLP with tanh-approximated GELU;
- embeddings scaled by sqrt(hidden), that factor rounded to the model dtype first;
- attention scaled by query_pre_attn_scalar ** -0.5, sliding-window and global layers
  alternating (`layer_types`, or Gemma 2's every other layer / Gemma 3's pattern);
- Gemma 2 soft-caps attention logits and final logits (s * tanh(x / s));
- Gemma 3 norms q and k per head (as Qwen3 does) and gives its local (sliding) layers their
  own rope base, the rope scaling only to the global ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sglbatch.engine.attention.base import AttentionBackend, LayerAttention
from sglbatch.engine.batch import ForwardBatch
from sglbatch.engine.config import ModelConfig
from sglbatch.engine.layers.activation import gelu_tanh_and_mul
from sglbatch.engine.layers.rotary import RotaryEmbedding
from sglbatch.engine.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP
from sglbatch.engine.models.qwen3 import Qwen3Attention
from sglbatch.engine.parallel.group import TPGroup
from sglbatch.engine.parallel.shard import RankShard
from sglbatch.engine.trace import trace_range

SLIDING, FULL = "sliding_attention", "full_attention"


class GemmaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float()
        normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


class Gemma3Attention(Qwen3Attention):
    norm_class = GemmaRMSNorm


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, self_attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        norm = lambda: GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
        self.trace_name = f"sglbatch.layer.{layer_id}"

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, fb: ForwardBatch,
                attn: AttentionBackend) -> torch.Tensor:
        """The residual stream after this layer."""
        with trace_range(self.trace_name):
            out = self.self_attn(positions, self.input_layernorm(hidden), fb, attn)
            hidden = hidden + self.post_attention_layernorm(out)
            out = self.mlp(self.pre_feedforward_layernorm(hidden))
            return hidden + self.post_feedforward_layernorm(out)


class Gemma2ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig, shard: RankShard | None = None,
                 group: TPGroup | None = None):
        if config.hf.get("use_bidirectional_attention"):
            raise ValueError(f"{config.architecture} with use_bidirectional_attention "
                             "(an embedding model) is not supported")
        self.layer_types = self._layer_types(config)  # read by make_layer, during super()
        super().__init__(config, shard, group)
        # transformers rounds the factor to the weights' dtype (55.5 for sqrt(3072) in bf16);
        # a float buffer, so `model.to(dtype)` does the same.
        self.register_buffer("embed_scale", torch.tensor(config.hidden_size ** 0.5),
                             persistent=False)

    @staticmethod
    def _layer_types(config: ModelConfig) -> list[str]:
        if config.hf.get("layer_types"):
            return list(config.hf["layer_types"])
        # Gemma 2: layers 0, 2, 4 ... slide.
        return [SLIDING if i % 2 == 0 else FULL for i in range(config.num_hidden_layers)]

    def make_layer(self, config: ModelConfig, layer_id: int, rotary: nn.Module) -> nn.Module:
        mlp = LlamaMLP(config, self.shard, self.group)
        mlp.act = gelu_tanh_and_mul
        return GemmaDecoderLayer(config, layer_id, self.make_attention(config, layer_id, rotary),
                                 mlp)

    def make_attention(self, config: ModelConfig, layer_id: int, rotary: nn.Module) -> nn.Module:
        return LlamaAttention(config, layer_id, rotary, self.shard, self.group)

    def make_norm(self, config: ModelConfig) -> nn.Module:
        return GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def attention_layers(self) -> list[LayerAttention]:
        hf = self.config.hf
        scale = hf.get("query_pre_attn_scalar", self.config.head_dim) ** -0.5
        cap = hf.get("attn_logit_softcapping")
        return [LayerAttention(scale, hf.get("sliding_window") if t == SLIDING else None, cap)
                for t in self.layer_types]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch,
                attn: AttentionBackend) -> torch.Tensor:
        hidden = self.embed(input_ids) * self.embed_scale
        for layer in self.model.layers:
            hidden = layer(positions, hidden, fb, attn)
        return self.model.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = super().compute_logits(hidden)
        cap = self.config.hf.get("final_logit_softcapping")
        if logits is None or cap is None:
            return logits
        return torch.tanh(logits / cap) * cap


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    @staticmethod
    def _layer_types(config: ModelConfig) -> list[str]:
        if config.hf.get("layer_types"):
            return list(config.hf["layer_types"])
        # Every `sliding_window_pattern`-th layer is global, the others slide.
        pattern = config.hf.get("sliding_window_pattern", 6)
        return [FULL if (i + 1) % pattern == 0 else SLIDING
                for i in range(config.num_hidden_layers)]

    def make_rotary(self, config: ModelConfig) -> nn.Module:
        return nn.ModuleDict({
            kind: RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                  *_gemma3_rope(config.hf, kind))
            for kind in (SLIDING, FULL)})

    def make_attention(self, config: ModelConfig, layer_id: int, rotary: nn.Module) -> nn.Module:
        return Gemma3Attention(config, layer_id, rotary[self.layer_types[layer_id]], self.shard,
                               self.group)


def _gemma3_rope(hf: dict[str, Any], kind: str) -> tuple[float, dict[str, Any] | None]:
    """(rope base, rope scaling) of Gemma 3's local or global layers, from either config
    format: transformers 5's `rope_parameters` per layer type, or the Hub's `rope_theta`,
    `rope_local_base_freq` and `rope_scaling` (global layers only)."""
    params = (hf.get("rope_parameters") or {}).get(kind)
    if params is None:
        if kind == SLIDING:
            return float(hf.get("rope_local_base_freq", 10_000.0)), None
        params = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 1e6)}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    return float(params["rope_theta"]), None if rope_type == "default" else params


ARCHITECTURES = {"Gemma2ForCausalLM": Gemma2ForCausalLM, "Gemma3ForCausalLM": Gemma3ForCausalLM}
