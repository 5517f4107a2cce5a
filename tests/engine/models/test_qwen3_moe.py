"""Qwen3-MoE (q/k norms per head; top-2 of 8 experts renormalised by `norm_topk_prob`; the
first layer dense through `decoder_sparse_step`) matches transformers on a tiny random
checkpoint."""

from __future__ import annotations

from tests.engine.models.tiny_check import MatchesTransformers, tiny_fixture


def _qwen3_moe():
    import transformers as tf

    return tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24,
        max_position_embeddings=256, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=2,
        tie_word_embeddings=False))


tiny = tiny_fixture(_qwen3_moe)


class TestQwen3Moe(MatchesTransformers):
    pass
