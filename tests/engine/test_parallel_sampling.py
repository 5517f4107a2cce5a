"""n > 1: one prompt, n independent samples; the prompt is computed once and shared."""

from __future__ import annotations

from tests.engine.conftest import PROMPTS, assert_pool_whole

PROMPT = PROMPTS[4]
PARAMS = {"n": 4, "temperature": 1.0, "sampling_seed": 5, "max_new_tokens": 16,
          "ignore_eos": True}


def test_n_samples_are_independent_and_reproducible(engine):
    first = engine.generate(PROMPT, PARAMS)
    assert isinstance(first, list) and len(first) == 4
    texts = [o["text"] for o in first]
    assert len(set(texts)) == 4, texts
    again = engine.generate(PROMPT, PARAMS)
    assert [o["output_ids"] for o in again] == [o["output_ids"] for o in first]
    other_seed = engine.generate(PROMPT, {**PARAMS, "sampling_seed": 6})
    assert [o["output_ids"] for o in other_seed] != [o["output_ids"] for o in first]


def test_prompt_is_prefilled_once(engine):
    engine.flush_cache()
    outs = engine.generate(PROMPT, PARAMS)
    prompt_len = outs[0]["meta_info"]["prompt_tokens"]
    # The first sample computes the prompt; the others find all of it (but the last token,
    # whose logits they need) in the prefix cache.
    assert [o["meta_info"]["cached_tokens"] for o in outs] == [0] + [prompt_len - 1] * 3
    assert_pool_whole(engine)


def test_batch_outputs_are_grouped_by_prompt(engine):
    prompts = [PROMPTS[1], PROMPTS[2]]
    outs = engine.generate(prompts, {**PARAMS, "n": 2})
    lengths = [len(engine.tokenizer.encode(p)) for p in prompts]
    assert [o["meta_info"]["prompt_tokens"] for o in outs] == [lengths[0]] * 2 + [lengths[1]] * 2


def test_streamed_samples_match(engine):
    finals: dict[int, list[int]] = {}
    for chunk in engine.generate(PROMPT, PARAMS, stream=True):
        finals.setdefault(chunk["index"], []).extend(chunk["output_ids"])
    plain = engine.generate(PROMPT, PARAMS)
    assert [finals[i] for i in range(4)] == [o["output_ids"] for o in plain]
