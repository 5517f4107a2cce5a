"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2 attention (q/k/v bias, `qkv_bias`) with a
sparse MoE block: softmax routing to the top `num_experts_per_tok` of `num_experts`,
renormalised only with `norm_topk_prob` (default off), plus a shared expert every token
takes, scaled by sigmoid(`shared_expert_gate`). Layers in `mlp_only_layers`, or off the
`decoder_sparse_step` grid, keep a dense MLP, as transformers builds them."""

from __future__ import annotations

import dataclasses

from torch import nn

from sglbatch.engine.config import ModelConfig
from sglbatch.engine.layers.moe import SparseMoeBlock, expert_count
from sglbatch.engine.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
)
from sglbatch.engine.parallel.group import TPGroup
from sglbatch.engine.parallel.shard import RankShard


def qwen_moe_mlp(config: ModelConfig, layer_id: int, shard: RankShard,
                 group: TPGroup | None) -> nn.Module:
    """Layer `layer_id`'s MLP in Qwen2-MoE and Qwen3-MoE: sparse (with a shared expert when
    config.json sizes one) or dense."""
    hf, experts = config.hf, expert_count(config.hf)
    sparse = layer_id not in (hf.get("mlp_only_layers") or []) and experts > 0 and \
        (layer_id + 1) % hf.get("decoder_sparse_step", 1) == 0
    if not sparse:
        return LlamaMLP(config, shard, group)
    shared = len(shard.shared_intermediate) if hf.get("shared_expert_intermediate_size") \
        else None
    return SparseMoeBlock(config.hidden_size, experts, hf["num_experts_per_tok"],
                          len(shard.expert_intermediate), hf.get("norm_topk_prob", False),
                          group, shared)


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig, shard: RankShard | None = None,
                 group: TPGroup | None = None):
        # Qwen2-MoE's q/k/v bias is `qkv_bias` (on unless config.json says otherwise).
        config = dataclasses.replace(config, attention_bias=config.hf.get("qkv_bias", True))
        super().__init__(config, shard, group)

    def make_layer(self, config: ModelConfig, layer_id: int, rotary: nn.Module) -> nn.Module:
        return LlamaDecoderLayer(
            config, layer_id, LlamaAttention(config, layer_id, rotary, self.shard, self.group),
            qwen_moe_mlp(config, layer_id, self.shard, self.group))


ARCHITECTURES = {"Qwen2MoeForCausalLM": Qwen2MoeForCausalLM}
