"""Mistral with a sliding window shorter than the prompts matches transformers on a tiny
random checkpoint, and only because the window is applied: with it ignored (each layer's
LayerAttention without `sliding_window`, as before windows existed) the tokens differ."""

from __future__ import annotations

import dataclasses

from sglbatch.engine.models.llama import LlamaForCausalLM
from tests.engine.models.tiny_check import MatchesTransformers, engine_greedy, tiny_fixture


def _mistral():
    import transformers as tf

    return tf.MistralForCausalLM(tf.MistralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=256,
        sliding_window=16))


tiny = tiny_fixture(_mistral)


class TestMistral(MatchesTransformers):
    pass


def test_without_the_window_tokens_differ_from_transformers(tiny, monkeypatch):
    windowed = LlamaForCausalLM.attention_layers

    def unwindowed(self):
        return [dataclasses.replace(a, sliding_window=None) for a in windowed(self)]

    monkeypatch.setattr(LlamaForCausalLM, "attention_layers", unwindowed)
    first, _ = engine_greedy(tiny)
    # With 32 new tokens every sequence outgrows the 16-token window.
    for prompt, out in zip(tiny.prompts, first):
        assert out != tiny.hf_greedy(prompt), f"prompt of {len(prompt)} tokens"
