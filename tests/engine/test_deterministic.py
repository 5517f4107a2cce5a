"""enable_deterministic_inference: greedy outputs in bf16 do not depend on which requests
share the batch, on their order, on chunked prefill or on a warm prefix cache; and its
batch-invariant attention is still right (tiny random Gemma 2 with a sliding window and
soft-caps matches transformers)."""

from __future__ import annotations

import random

import pytest

from tests.engine.models.test_gemma import _gemma2
from tests.engine.models.tiny_check import build_tiny, check_greedy, check_logits

PARAMS = {"temperature": 0, "max_new_tokens": 16}
SYSTEM = "You are a careful assistant. Answer in one short sentence, with one fact. "
PROMPTS = [SYSTEM + f"Question {i}: what is the capital of country number {i}, and why is "
           f"{i * 7} interesting?" for i in range(32)]


def _ids(outputs):
    return [o["output_ids"] for o in outputs]


def test_greedy_tokens_do_not_depend_on_the_batch(smollm2_dir):
    from sglbatch.engine.engine import Engine

    args = dict(model_path=str(smollm2_dir), dtype="bfloat16", kv_cache_gb=0.25,
                enable_deterministic_inference=True)
    with Engine(**args) as engine:
        together = _ids(engine.generate(PROMPTS, PARAMS))
        alone = [engine.generate(p, PARAMS)["output_ids"] for p in PROMPTS[:8]]
        order = list(range(len(PROMPTS)))
        random.Random(0).shuffle(order)
        shuffled = _ids(engine.generate([PROMPTS[i] for i in order], PARAMS))
        warm = _ids(engine.generate(PROMPTS, PARAMS))  # every prefix now in the radix cache
    with Engine(**args, chunked_prefill_size=16, disable_radix_cache=True) as engine:
        chunked = _ids(engine.generate(PROMPTS, PARAMS))
    assert alone == together[:8]
    assert [shuffled[order.index(i)] for i in range(len(PROMPTS))] == together
    assert warm == together
    assert chunked == together


@pytest.fixture(scope="module")
def tiny_gemma2(tmp_path_factory, smollm2_dir):
    return build_tiny(_gemma2, tmp_path_factory.mktemp("tiny-gemma2"), smollm2_dir)


def test_batch_invariant_attention_matches_transformers(tiny_gemma2):
    args = dict(attention_backend="auto", enable_deterministic_inference=True)
    check_logits(tiny_gemma2, **args)
    check_greedy(tiny_gemma2, **args)
    check_greedy(tiny_gemma2, chunked_prefill_size=16, **args)


def test_the_flag_keeps_its_own_attention():
    from sglbatch.engine.config import EngineConfig

    with pytest.raises(ValueError, match="leave attention_backend at auto"):
        EngineConfig(enable_deterministic_inference=True, attention_backend="cpu")
