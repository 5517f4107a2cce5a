"""Tensor parallelism on a tiny random Llama (gloo, fp32): greedy tokens and every token's
logprob at tp 2 (its 2 KV heads split evenly) and tp 4 (KV heads replicated) equal tp 1;
an unsplittable tp_size is refused before any process starts."""

from __future__ import annotations

import dataclasses
import multiprocessing
import shutil

import pytest
import torch

from sglbatch.engine.engine import Engine
from tests.engine.conftest import TINY_LLAMA, assert_pool_whole


def _ids(outputs):
    return [o["output_ids"] for o in outputs]


# The conftest's tiny GQA Llama (6 query heads over 2 KV heads), with a vocabulary and an
# MLP that split unevenly too (103 rows over 2 or 4 ranks: padding; 98 columns over 4), and
# a hidden size transformers accepts with 6 heads.
TINY = dataclasses.replace(TINY_LLAMA, vocab_size=103, intermediate_size=98, hidden_size=96)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, smollm2_dir):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=TINY.vocab_size, hidden_size=TINY.hidden_size,
        intermediate_size=TINY.intermediate_size, num_hidden_layers=TINY.num_hidden_layers,
        num_attention_heads=TINY.num_attention_heads,
        num_key_value_heads=TINY.num_key_value_heads, head_dim=TINY.head_dim,
        max_position_embeddings=TINY.max_position_embeddings, tie_word_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # ids < 103 decode as any
        shutil.copy(smollm2_dir / name, path / name)
    return path


def _tiny_greedy(model_dir, tp_size) -> tuple[list[list[int]], list[float]]:
    """Greedy ids, and the logprobs of every prompt and output token (random weights repeat
    tokens a lot: the logprobs are what would show a wrong head or column)."""
    gen = torch.Generator().manual_seed(2)
    shared = torch.randint(0, TINY.vocab_size, (20,), generator=gen).tolist()
    prompts = [torch.randint(0, TINY.vocab_size, (n,), generator=gen).tolist()
               for n in (3, 17, 30)]
    prompts += [shared + p[:5] for p in prompts]  # a cached prefix, rows rewritten
    params = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    extras = {"return_logprob": True, "logprob_start_len": 0}
    with Engine(model_path=str(model_dir), dtype="float32", tp_size=tp_size,
                max_total_tokens=1024, chunked_prefill_size=16) as eng:
        outputs = eng.generate(input_ids=prompts[:3], sampling_params=params, **extras)
        outputs += eng.generate(input_ids=prompts[3:], sampling_params=params, **extras)
        assert_pool_whole(eng)
    logprobs = [lp for o in outputs for key in ("input_token_logprobs", "output_token_logprobs")
                for lp, *_ in o["meta_info"][key] if lp is not None]
    return _ids(outputs), logprobs


@pytest.fixture(scope="module")
def tiny_tp1(tiny_llama_dir):
    return _tiny_greedy(tiny_llama_dir, 1)


@pytest.mark.parametrize("tp_size", [2, 4], ids=["tp2-even-kv", "tp4-replicated-kv"])
def test_tiny_llama_greedy_equals_tp1(tiny_llama_dir, tiny_tp1, tp_size):
    ids, logprobs = _tiny_greedy(tiny_llama_dir, tp_size)
    assert ids == tiny_tp1[0]
    assert logprobs == pytest.approx(tiny_tp1[1], abs=1e-4)


def test_unsplittable_tp_size_is_refused_before_any_process_starts(smollm2_dir):
    before = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match="tp_size=10 is more ranks than the model's 9"):
        Engine(model_path=str(smollm2_dir), tp_size=10)
    assert set(multiprocessing.active_children()) == before
