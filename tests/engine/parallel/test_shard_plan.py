"""Tensor-parallel shard planning: heads in whole GQA groups as evenly as they go, KV heads
replicated when ranks outnumber them, and a clear refusal only where nothing can be split."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sglbatch.engine.parallel.shard import even_split, plan_shards
from tests.engine.conftest import TINY_LLAMA

# SmolLM2-135M's attention: 9 query heads over 3 KV heads.
SMOLLM2 = dataclasses.replace(TINY_LLAMA, num_attention_heads=9, num_key_value_heads=3,
                              head_dim=64, hidden_size=576, intermediate_size=1536,
                              vocab_size=49152)


def _heads(config, size):
    return [(list(s.q_heads), list(s.kv_heads)) for s in plan_shards(config, size)]


def test_uneven_gqa_split_gives_whole_groups():
    assert _heads(SMOLLM2, 2) == [([0, 1, 2, 3, 4, 5], [0, 1]), ([6, 7, 8], [2])]
    assert _heads(SMOLLM2, 3) == [([0, 1, 2], [0]), ([3, 4, 5], [1]), ([6, 7, 8], [2])]


def test_more_ranks_than_kv_heads_replicate_them():
    # 4 ranks over 3 KV heads: KV head 0 on two ranks, which share its 3 query heads.
    assert _heads(SMOLLM2, 4) == [([0, 1], [0]), ([2], [0]), ([3, 4, 5], [1]),
                                  ([6, 7, 8], [2])]
    assert _heads(TINY_LLAMA, 4) == [([0, 1], [0]), ([2], [0]), ([3, 4], [1]), ([5], [1])]
    assert _heads(SMOLLM2, 9) == [([q], [q // 3]) for q in range(9)]


def test_every_head_column_and_token_is_held_exactly_once():
    config = dataclasses.replace(TINY_LLAMA, vocab_size=103, intermediate_size=98)
    for size in (1, 2, 3, 4, 5, 6):
        shards = plan_shards(config, size)
        assert sorted(q for s in shards for q in s.q_heads) == list(range(6))
        assert sorted(c for s in shards for c in s.intermediate) == list(range(98))
        assert [t for s in shards for t in s.vocab] == list(range(103))
        assert all(s.vocab_chunk * size >= 103 for s in shards)


def test_checkpoint_slices_reassemble_the_tensor():
    config = dataclasses.replace(TINY_LLAMA, vocab_size=103)
    shards = plan_shards(config, 4)
    k = torch.randn(2 * 32, 64)
    parts = [s.slice_checkpoint("model.layers.0.self_attn.k_proj.weight", k) for s in shards]
    assert torch.equal(parts[0], parts[1]) and torch.equal(parts[0], k[:32])  # replicated
    o = torch.randn(64, 6 * 32)
    parts = [s.slice_checkpoint("model.layers.1.self_attn.o_proj.weight", o) for s in shards]
    assert torch.equal(torch.cat(parts, dim=1), o)
    emb = torch.randn(103, 64)
    parts = [s.slice_checkpoint("model.embed_tokens.weight", emb) for s in shards]
    assert all(p.shape == (26, 64) for p in parts)  # 103 rows padded to 4 * 26
    assert torch.equal(torch.cat(parts)[:103], emb) and not torch.cat(parts)[103:].any()
    norm = torch.randn(64)
    assert shards[2].slice_checkpoint("model.norm.weight", norm) is norm


def test_what_cannot_be_split_is_refused_naming_the_numbers():
    with pytest.raises(ValueError, match="tp_size=10 is more ranks than the model's 9 "
                                         "attention heads"):
        plan_shards(SMOLLM2, 10)
    with pytest.raises(ValueError, match="tp_size=4 is more ranks than the MLP's 3 columns"):
        plan_shards(dataclasses.replace(TINY_LLAMA, intermediate_size=3), 4)


def test_even_split():
    assert even_split(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
