"""Mistral with a sliding window shorter than the prompts matches transformers on a tiny
random checkpoint, and only because the window is applied: with it ignored (each layer's
LayerAttention without `sliding_window`, as before windows existed) the tokens differ."""

from __future__ import annotations

import dataclasses

import pytest

from sglbatch.engine.models.llama import LlamaForCausalLM
from tests.engine.models.tiny_check import build_tiny, check_greedy, check_logits, engine_greedy


def _mistral():
    import transformers as tf

    return tf.MistralForCausalLM(tf.MistralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=256,
        sliding_window=16))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    return build_tiny(_mistral, tmp_path_factory.mktemp("tiny-mistral"), smollm2_dir)


def test_last_logits_match_transformers(tiny):
    check_logits(tiny)


def test_greedy_matches_transformers(tiny):
    check_greedy(tiny)


def test_greedy_with_chunked_prefill_matches_transformers(tiny):
    check_greedy(tiny, chunked_prefill_size=16)


def test_without_the_window_tokens_differ_from_transformers(tiny, monkeypatch):
    windowed = LlamaForCausalLM.attention_layers

    def unwindowed(self):
        return [dataclasses.replace(a, sliding_window=None) for a in windowed(self)]

    monkeypatch.setattr(LlamaForCausalLM, "attention_layers", unwindowed)
    first, _ = engine_greedy(tiny)
    # With 32 new tokens every sequence outgrows the 16-token window.
    for prompt, out in zip(tiny.prompts, first):
        assert out != tiny.hf_greedy(prompt), f"prompt of {len(prompt)} tokens"
