"""Mixtral (top-2 of 4 experts, renormalised; a sliding window on every layer) matches
transformers on a tiny random checkpoint, also over two tensor-parallel ranks."""

from __future__ import annotations

from tests.engine.models.tiny_check import MatchesOverTwoRanks, tiny_fixture


def _mixtral():
    import transformers as tf

    return tf.MixtralForCausalLM(tf.MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        num_local_experts=4, num_experts_per_tok=2, sliding_window=32,
        tie_word_embeddings=False))


tiny = tiny_fixture(_mixtral)


class TestMixtral(MatchesOverTwoRanks):
    pass
