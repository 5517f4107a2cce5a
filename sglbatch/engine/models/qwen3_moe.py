"""Qwen3-MoE: Qwen3 attention (per-head q/k RMSNorm) with Qwen2-MoE's sparse MLP layers
(qwen2_moe.qwen_moe_mlp), without a shared expert; `norm_topk_prob` renormalises the top-k
routing weights (transformers' default is off; Qwen3-MoE checkpoints turn it on)."""

from __future__ import annotations

from torch import nn

from sglbatch.engine.config import ModelConfig
from sglbatch.engine.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from sglbatch.engine.models.qwen2_moe import qwen_moe_mlp
from sglbatch.engine.models.qwen3 import Qwen3Attention


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    def make_layer(self, config: ModelConfig, layer_id: int, rotary: nn.Module) -> nn.Module:
        return LlamaDecoderLayer(
            config, layer_id, Qwen3Attention(config, layer_id, rotary, self.shard, self.group),
            qwen_moe_mlp(config, layer_id, self.shard, self.group))


ARCHITECTURES = {"Qwen3MoeForCausalLM": Qwen3MoeForCausalLM}
