"""`sglbatch bench one-batch --correct`: a static batch driven through the model runner by hand
(a first prefill of --cut-len tokens, the rest extended on top, then decode) gives
transformers' greedy tokens. Here, beside the other greedy tests, to share their HF model."""

from __future__ import annotations

import pytest
import torch

from sglbatch.bench.one_batch import StaticBatch, correctness_test, load_model
from tests.engine.conftest import PROMPTS

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def runner_and_tokenizer(smollm2_dir):
    return load_model({"model_path": str(smollm2_dir), "dtype": "float32", "kv_cache_gb": 0.1})


@pytest.fixture(scope="module")
def hf_greedy(runner_and_tokenizer, hf_model) -> list[list[int]]:
    _, tokenizer = runner_and_tokenizer
    refs = []
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=NEW_TOKENS)
        refs.append(out[0, ids.shape[1]:].tolist())
    return refs


def _assert_matches(ours: list[int], ref: list[int], eos_ids, prompt: str) -> None:
    # transformers stops at EOS; the static batch runs on (ignore_eos), so compare up to it.
    assert ours[:len(ref)] == ref, prompt
    assert len(ref) == NEW_TOKENS or ref[-1] in eos_ids, prompt


def test_correct_mode_equals_transformers_greedy(runner_and_tokenizer, hf_greedy):
    runner, tokenizer = runner_and_tokenizer
    # Prompts of 1 token upward: those of up to 4 tokens are cut shorter (all but one token).
    results = correctness_test(runner, tokenizer, PROMPTS, NEW_TOKENS, cut_len=4)
    eos = runner.model_config.eos_token_ids
    for prompt, result, ref in zip(PROMPTS, results, hf_greedy):
        assert result.input_ids == tokenizer.encode(prompt)
        assert len(result.output_ids) == NEW_TOKENS
        assert result.prefill_top_ids[0] == result.output_ids[0]  # greedy = the top logit
        assert result.prefill_top_logits == sorted(result.prefill_top_logits, reverse=True)
        _assert_matches(result.output_ids, ref, eos, prompt)
    assert runner.kv_pool.num_free == runner.kv_pool.num_slots  # everything given back


def test_benchmarked_path_samples_the_same_tokens(runner_and_tokenizer, hf_greedy):
    """The latency run's path (one prefill, the engine's sampler) generates the same tokens."""
    runner, tokenizer = runner_and_tokenizer
    static = StaticBatch(runner, [tokenizer.encode(p) for p in PROMPTS], NEW_TOKENS)
    try:
        static.extend()
        for _ in range(NEW_TOKENS - 1):
            static.decode()
        outputs = [r.output_ids for r in static.reqs]
    finally:
        static.free()
    for prompt, ours, ref in zip(PROMPTS, outputs, hf_greedy):
        _assert_matches(ours, ref, runner.model_config.eos_token_ids, prompt)
    assert runner.kv_pool.num_free == runner.kv_pool.num_slots
    assert runner.req_to_token_pool.num_free == runner.req_to_token_pool.num_rows
