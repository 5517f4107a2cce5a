"""Qwen3 (dense): Llama with each attention head's q and k RMS-normed before rope.

`Qwen3Attention` is the piece other families reuse (Qwen3-MoE, Gemma 3 with its own norm).
"""

from __future__ import annotations

import torch
from torch import nn

from sglbatch.engine.config import ModelConfig
from sglbatch.engine.layers.norm import RMSNorm
from sglbatch.engine.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
)
from sglbatch.engine.parallel.group import TPGroup
from sglbatch.engine.parallel.shard import RankShard


class Qwen3Attention(LlamaAttention):
    norm_class: type[nn.Module] = RMSNorm  # over one head's head_dim values

    def __init__(self, config: ModelConfig, layer_id: int, rotary: nn.Module,
                 shard: RankShard, group: TPGroup | None):
        super().__init__(config, layer_id, rotary, shard, group)
        # Per-head weights, the same on every tensor-parallel rank.
        self.q_norm = self.norm_class(config.head_dim, config.rms_norm_eps)
        self.k_norm = self.norm_class(config.head_dim, config.rms_norm_eps)

    def norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.q_norm(q.unflatten(-1, (-1, self.head_dim))).flatten(1)
        k = self.k_norm(k.unflatten(-1, (-1, self.head_dim))).flatten(1)
        return q, k


class Qwen3ForCausalLM(LlamaForCausalLM):
    def make_layer(self, config: ModelConfig, layer_id: int, rotary: nn.Module) -> nn.Module:
        return LlamaDecoderLayer(
            config, layer_id, Qwen3Attention(config, layer_id, rotary, self.shard, self.group),
            LlamaMLP(config, self.shard, self.group))


ARCHITECTURES = {"Qwen3ForCausalLM": Qwen3ForCausalLM}
