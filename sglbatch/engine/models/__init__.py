"""Model registry: config.json's architecture name -> model class."""

from __future__ import annotations

from torch import nn

from sglbatch.engine.config import SUPPORTED_ARCHITECTURES, ModelConfig
from sglbatch.engine.parallel.group import TPGroup
from sglbatch.engine.parallel.shard import RankShard


def create_model(config: ModelConfig, shard: RankShard | None = None,
                 group: TPGroup | None = None) -> nn.Module:
    """The whole model, or with `shard` and `group` one tensor-parallel rank's part of it."""
    # Qwen2 is Llama plus a q/k/v bias, which ModelConfig.attention_bias carries; Mistral
    # (without sliding-window attention) is Llama with an explicit head_dim.
    if config.architecture in SUPPORTED_ARCHITECTURES:
        from sglbatch.engine.models.llama import LlamaForCausalLM

        return LlamaForCausalLM(config, shard, group)
    raise ValueError(f"architecture {config.architecture!r} is not supported; "
                     f"supported: {list(SUPPORTED_ARCHITECTURES)}")
