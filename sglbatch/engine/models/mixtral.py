"""Mixtral: Llama attention (each layer sliding when config.json has a `sliding_window`, see
llama.layer_windows) with a sparse MoE block in place of the MLP: softmax routing to the top
`num_experts_per_tok` of `num_local_experts` experts, their weights renormalised to sum to
one (layers/moe.py)."""

from __future__ import annotations

from torch import nn

from sglbatch.engine.config import ModelConfig
from sglbatch.engine.layers.moe import SparseMoeBlock, expert_count
from sglbatch.engine.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class MixtralForCausalLM(LlamaForCausalLM):
    # Checkpoints name the block `block_sparse_moe` (transformers 5 in memory: `mlp`).
    checkpoint_renames = {".block_sparse_moe.": ".mlp."}

    def make_layer(self, config: ModelConfig, layer_id: int, rotary: nn.Module) -> nn.Module:
        moe = SparseMoeBlock(config.hidden_size, expert_count(config.hf),
                             config.hf["num_experts_per_tok"],
                             len(self.shard.expert_intermediate), True, self.group)
        return LlamaDecoderLayer(
            config, layer_id, LlamaAttention(config, layer_id, rotary, self.shard, self.group),
            moe)


ARCHITECTURES = {"MixtralForCausalLM": MixtralForCausalLM}
