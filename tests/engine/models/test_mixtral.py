"""Mixtral (top-2 of 4 experts, renormalised; a sliding window on every layer) matches
transformers on a tiny random checkpoint, also over two tensor-parallel ranks."""

from __future__ import annotations

import pytest

from tests.engine.models.tiny_check import build_tiny, check_greedy, check_logits


def _mixtral():
    import transformers as tf

    return tf.MixtralForCausalLM(tf.MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        num_local_experts=4, num_experts_per_tok=2, sliding_window=32,
        tie_word_embeddings=False))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    return build_tiny(_mixtral, tmp_path_factory.mktemp("tiny-mixtral"), smollm2_dir)


def test_last_logits_match_transformers(tiny):
    check_logits(tiny)


def test_greedy_matches_transformers(tiny):
    check_greedy(tiny)


def test_greedy_with_chunked_prefill_matches_transformers(tiny):
    check_greedy(tiny, chunked_prefill_size=16)


def test_greedy_over_two_ranks_matches_transformers(tiny):
    check_greedy(tiny, tp_size=2)
