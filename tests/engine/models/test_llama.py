"""The Llama module's own architectures (Llama with llama3 rope scaling, Qwen2 with its q/k/v
bias) under the same checks as every other family: logits, greedy tokens with the prefix
cache and with chunked prefill, and Qwen2 over two tensor-parallel ranks."""

from __future__ import annotations

import pytest

from tests.engine.models.tiny_check import check_matches_transformers

SIZES = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def _llama3():
    import transformers as tf

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
            "rope_theta": 500000.0}
    return tf.LlamaForCausalLM(tf.LlamaConfig(**SIZES, rope_parameters=rope,
                                              tie_word_embeddings=True))


def _qwen2():
    import transformers as tf

    return tf.Qwen2ForCausalLM(tf.Qwen2Config(**SIZES, tie_word_embeddings=False))


@pytest.mark.parametrize("factory, tp_size", [(_llama3, 1), (_qwen2, 2)],
                         ids=["llama3-rope", "qwen2-tp2"])
def test_matches_transformers(factory, tp_size, tmp_path, smollm2_dir):
    check_matches_transformers(factory, tmp_path, smollm2_dir, tp_size=tp_size)
