"""Greedy outputs equal transformers', and do not change with batching, chunking or retraction."""

from __future__ import annotations

import pytest
import torch

from tests.engine.conftest import PROMPTS, assert_pool_whole

NEW_TOKENS = 32
GREEDY = {"temperature": 0, "max_new_tokens": NEW_TOKENS}


@pytest.fixture(scope="module")
def hf_greedy(engine, hf_model) -> list[list[int]]:
    """transformers `generate`, one prompt at a time (no padding), greedy."""
    refs = []
    for prompt in PROMPTS:
        ids = torch.tensor([engine.tokenizer.encode(prompt)])
        with torch.no_grad():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=NEW_TOKENS)
        refs.append(out[0, ids.shape[1]:].tolist())
    return refs


def test_batched_greedy_equals_transformers_generate(engine, hf_greedy):
    outputs = engine.generate(PROMPTS, GREEDY)
    assert len({o["meta_info"]["prompt_tokens"] for o in outputs}) == len(PROMPTS)
    for prompt, out, ref in zip(PROMPTS, outputs, hf_greedy):
        # transformers stops at EOS; so does the engine, with the EOS token kept in output_ids.
        assert out["output_ids"] == ref, prompt
    assert_pool_whole(engine)


def _greedy_ids(engine, prompts) -> list[list[int]]:
    params = {**GREEDY, "ignore_eos": True}
    return [o["output_ids"] for o in engine.generate(prompts, params)]


@pytest.fixture(scope="module")
def together_ids(engine) -> list[list[int]]:
    return _greedy_ids(engine, PROMPTS)


def test_alone_equals_together(engine, together_ids):
    alone = [_greedy_ids(engine, [p])[0] for p in PROMPTS]
    assert alone == together_ids
    assert_pool_whole(engine)


@pytest.mark.parametrize("engine_args", [
    pytest.param({"chunked_prefill_size": 7}, id="tiny-chunked-prefill"),
    pytest.param({"max_total_tokens": 160, "chunked_prefill_size": 64}, id="retracting-pool"),
    pytest.param({"max_running_requests": 3}, id="few-running-slots"),
])
def test_scheduling_does_not_change_greedy_tokens(smollm2_dir, together_ids, engine_args):
    from sglbatch.engine.engine import Engine

    with Engine(model_path=str(smollm2_dir), dtype="float32", **engine_args) as eng:
        assert _greedy_ids(eng, PROMPTS) == together_ids
        if "max_total_tokens" in engine_args:
            assert eng.scheduler.num_retractions > 0, "the pool was meant to run dry"
        assert_pool_whole(eng)
