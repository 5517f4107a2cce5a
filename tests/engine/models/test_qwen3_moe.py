"""Qwen3-MoE (q/k norms per head; top-2 of 8 experts renormalised by `norm_topk_prob`; the
first layer dense through `decoder_sparse_step`) matches transformers on a tiny random
checkpoint."""

from __future__ import annotations

import pytest

from tests.engine.models.tiny_check import build_tiny, check_greedy, check_logits


def _qwen3_moe():
    import transformers as tf

    return tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24,
        max_position_embeddings=256, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=2,
        tie_word_embeddings=False))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    return build_tiny(_qwen3_moe, tmp_path_factory.mktemp("tiny-qwen3-moe"), smollm2_dir)


def test_last_logits_match_transformers(tiny):
    check_logits(tiny)


def test_greedy_matches_transformers(tiny):
    check_greedy(tiny)


def test_greedy_with_chunked_prefill_matches_transformers(tiny):
    check_greedy(tiny, chunked_prefill_size=16)
