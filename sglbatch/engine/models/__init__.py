"""Model registry: config.json's architecture name -> model class."""

from __future__ import annotations

from torch import nn

from sglbatch.engine.config import SUPPORTED_ARCHITECTURES, ModelConfig


def create_model(config: ModelConfig) -> nn.Module:
    # Qwen2 is Llama plus a q/k/v bias, which ModelConfig.attention_bias carries; Mistral
    # (without sliding-window attention) is Llama with an explicit head_dim.
    if config.architecture in SUPPORTED_ARCHITECTURES:
        from sglbatch.engine.models.llama import LlamaForCausalLM

        return LlamaForCausalLM(config)
    raise ValueError(f"architecture {config.architecture!r} is not supported; "
                     f"supported: {list(SUPPORTED_ARCHITECTURES)}")
