"""Phi-3 / Phi-3.5 / Phi-4-mini: Llama with longrope ("su") rope scaling and, in Phi-4-mini,
partial rotary. Checkpoints store q/k/v and gate/up already fused (the loader splits them
into the parts' names so tensor parallelism slices each as for Llama); every layer slides
when config.json has a `sliding_window` (see llama.layer_windows)."""

from __future__ import annotations

from typing import Any

from torch import nn

from sglbatch.engine.config import ModelConfig
from sglbatch.engine.layers.rotary import RotaryEmbedding
from sglbatch.engine.models.llama import LlamaForCausalLM


def phi3_rope_scaling(config: ModelConfig) -> dict[str, Any] | None:
    """config.json's rope scaling with what longrope reads made explicit, as transformers
    fills it: the pretraining length (the top-level field wins) and the extension factor,
    from the checkpoint's own max_position_embeddings (not the served context length)."""
    scaling = config.rope_scaling
    if scaling is None:
        return None
    scaling = dict(scaling)
    if (scaling.get("rope_type") or scaling.get("type")) in ("su", "yarn", "longrope"):
        scaling["rope_type"] = "longrope"  # transformers reads Phi-3's "su" / "yarn" so
        hf = config.hf
        original = hf.get("original_max_position_embeddings") or \
            scaling.get("original_max_position_embeddings") or hf["max_position_embeddings"]
        scaling["original_max_position_embeddings"] = original
        if scaling.get("factor") is None:
            scaling["factor"] = hf["max_position_embeddings"] / original
    return scaling


class Phi3ForCausalLM(LlamaForCausalLM):
    def make_rotary(self, config: ModelConfig) -> nn.Module:
        rope = config.rope_scaling or {}
        partial = config.hf.get("partial_rotary_factor") or rope.get("partial_rotary_factor") \
            or 1.0
        return RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                               config.rope_theta, phi3_rope_scaling(config),
                               rotary_dim=int(config.head_dim * partial))


ARCHITECTURES = {"Phi3ForCausalLM": Phi3ForCausalLM}
