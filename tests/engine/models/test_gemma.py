"""Gemma 2 (attention and final logit soft-caps, every other layer sliding) and Gemma 3
(q/k norms, local and global rope, the global one scaled) match transformers on tiny random
checkpoints, also over two tensor-parallel ranks; Hub-style configs (no `layer_types`,
Gemma 3's old rope fields) are read as transformers reads them."""

from __future__ import annotations

import pytest

from tests.engine.models.tiny_check import MatchesOverTwoRanks, build_tiny

SIZES = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
             query_pre_attn_scalar=24, sliding_window=16)


def _gemma2():
    import transformers as tf

    # Soft-caps small enough to bite on these activations.
    return tf.Gemma2ForCausalLM(tf.Gemma2Config(
        **SIZES, num_hidden_layers=3, attn_logit_softcapping=2.0, final_logit_softcapping=5.0))


def _gemma3():
    import transformers as tf

    rope = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 50_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}
    return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
        **SIZES, num_hidden_layers=4, sliding_window_pattern=2, rope_parameters=rope))


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def tiny(request, tmp_path_factory, smollm2_dir):
    factory = {"gemma2": _gemma2, "gemma3": _gemma3}[request.param]
    return build_tiny(factory, tmp_path_factory.mktemp(f"tiny-{request.param}"), smollm2_dir)


class TestGemma(MatchesOverTwoRanks):
    pass


def _config(**hf):
    from sglbatch.engine.config import ModelConfig

    return ModelConfig("Gemma3ForCausalLM", 256, 64, 96, hf.pop("num_hidden_layers", 6), 4, 2,
                       16, 1e-6, 10000.0, None, 256, True, False, (1,), hf=hf)


def test_hub_configs_layer_types_and_rope():
    from sglbatch.engine.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM, _gemma3_rope

    assert Gemma2ForCausalLM._layer_types(_config(num_hidden_layers=3)) == \
        ["sliding_attention", "full_attention", "sliding_attention"]
    assert Gemma3ForCausalLM._layer_types(_config(sliding_window_pattern=3)) == \
        ["sliding_attention", "sliding_attention", "full_attention"] * 2
    hub = {"rope_theta": 1e6, "rope_local_base_freq": 1e4,
           "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    assert _gemma3_rope(hub, "sliding_attention") == (1e4, None)
    theta, scaling = _gemma3_rope(hub, "full_attention")
    assert theta == 1e6 and scaling["rope_type"] == "linear" and scaling["factor"] == 8.0
