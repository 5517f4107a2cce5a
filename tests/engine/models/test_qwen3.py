"""Qwen3 (q/k norms per head; with its optional sliding window on the upper layer, and
without it over two tensor-parallel ranks) matches transformers on tiny random checkpoints."""

from __future__ import annotations

from tests.engine.models.tiny_check import (
    MatchesTransformers,
    check_matches_transformers,
    tiny_fixture,
)


def _qwen3(windowed: bool = True):
    import transformers as tf

    return tf.Qwen3ForCausalLM(tf.Qwen3Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=256,
        use_sliding_window=windowed, sliding_window=16, max_window_layers=1,
        tie_word_embeddings=False))


tiny = tiny_fixture(_qwen3)


class TestQwen3(MatchesTransformers):
    pass


def test_without_window_over_two_ranks_matches_transformers(tmp_path, smollm2_dir):
    check_matches_transformers(lambda: _qwen3(windowed=False), tmp_path, smollm2_dir, tp_size=2)
