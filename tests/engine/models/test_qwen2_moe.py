"""Qwen2-MoE (top-2 of 8 experts, not renormalised, a gated shared expert, q/k/v bias; the
middle layer dense through `mlp_only_layers`; sliding windows from `layer_types`) matches
transformers on a tiny random checkpoint, also over two tensor-parallel ranks (the experts'
and the shared expert's columns split)."""

from __future__ import annotations

from tests.engine.models.tiny_check import MatchesOverTwoRanks, tiny_fixture


def _qwen2_moe():
    import transformers as tf

    return tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, mlp_only_layers=[1],
        use_sliding_window=True, sliding_window=16, max_window_layers=2,
        tie_word_embeddings=False))


tiny = tiny_fixture(_qwen2_moe)


def test_config_is_what_the_test_means(tiny):
    config = tiny.hf.config
    assert config.norm_topk_prob is False and config.qkv_bias is True
    assert config.layer_types == ["sliding_attention", "full_attention", "full_attention"]


class TestQwen2Moe(MatchesOverTwoRanks):
    pass
