"""Logprobs as SGLang returns them, checked against log_softmax of transformers' logits."""

from __future__ import annotations

import pytest
import torch

from tests.engine.conftest import PROMPTS, assert_pool_whole

TOL = 1e-3
PROMPT = PROMPTS[3]  # ~20 tokens
GREEDY = {"temperature": 0, "max_new_tokens": 8}


def reference_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row p is log P(next token | ids[:p + 1])."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def check_entries(entries, ids, ref_rows, ref) -> None:
    assert [e[1] for e in entries] == ids
    for (value, token, text), row in zip(entries, ref_rows):
        assert text is None
        if row is None:
            assert value is None
        else:
            assert value == pytest.approx(ref[row, token].item(), abs=TOL)


def test_input_and_output_logprobs_equal_transformers(engine, hf_model):
    prompt_ids = engine.tokenizer.encode(PROMPT)
    engine.flush_cache()
    out = engine.generate(PROMPT, GREEDY, return_logprob=True, logprob_start_len=0)
    meta = out["meta_info"]
    ids = prompt_ids + out["output_ids"]
    ref = reference_logprobs(hf_model, ids)
    n_in = len(prompt_ids)
    check_entries(meta["input_token_logprobs"], prompt_ids, [None, *range(n_in - 1)], ref)
    check_entries(meta["output_token_logprobs"], out["output_ids"],
                  range(n_in - 1, len(ids) - 1), ref)
    expected = ref[torch.arange(n_in - 1), torch.tensor(prompt_ids[1:])].mean().item()
    assert meta["normalized_prompt_logprob"] == pytest.approx(expected, abs=TOL)


def test_top_logprobs_token_ids_and_text(engine, hf_model):
    asked = [13, 260, 4093]
    out = engine.generate(PROMPT, GREEDY, return_logprob=True, logprob_start_len=3,
                          top_logprobs_num=4, token_ids_logprob=asked,
                          return_text_in_logprobs=True)
    meta = out["meta_info"]
    prompt_ids = engine.tokenizer.encode(PROMPT)
    ref = reference_logprobs(hf_model, prompt_ids + out["output_ids"])
    rows = [*range(2, len(prompt_ids) - 1), *range(len(prompt_ids) - 1, ref.shape[0] - 1)]
    tops = meta["input_top_logprobs"] + meta["output_top_logprobs"]
    picked = meta["input_token_ids_logprobs"] + meta["output_token_ids_logprobs"]
    assert len(tops) == len(picked) == len(rows)
    for row, top, pick in zip(rows, tops, picked):
        ref_vals, ref_ids = ref[row].topk(4)
        assert [t[1] for t in top] == ref_ids.tolist()
        assert [t[0] for t in top] == pytest.approx(ref_vals.tolist(), abs=TOL)
        assert [p[1] for p in pick] == asked
        assert [p[0] for p in pick] == pytest.approx(ref[row, asked].tolist(), abs=TOL)
    # Texts are each token's own decoding, special tokens included.
    for value, token, text in meta["input_token_logprobs"] + meta["output_token_logprobs"]:
        assert text == engine.tokenizer.decode([token], skip_special_tokens=False)


def test_input_logprobs_are_right_when_the_prefix_was_cached(engine, hf_model):
    prompt_ids = engine.tokenizer.encode(PROMPT)
    ref = reference_logprobs(hf_model, prompt_ids)
    engine.flush_cache()
    engine.generate(PROMPT, GREEDY)  # caches the whole prompt
    start = 10
    out = engine.generate(PROMPT, GREEDY, return_logprob=True, logprob_start_len=start)
    # The cache may serve every token before the first logprob's context ends.
    assert out["meta_info"]["cached_tokens"] == start - 1
    check_entries(out["meta_info"]["input_token_logprobs"], prompt_ids[start:],
                  range(start - 1, len(prompt_ids) - 1), ref)
    # Default (-1): output logprobs, plus the last prompt token as SGLang reports it.
    out = engine.generate(PROMPT, GREEDY, return_logprob=True)
    assert out["meta_info"]["cached_tokens"] == len(prompt_ids) - 2
    check_entries(out["meta_info"]["input_token_logprobs"], prompt_ids[-1:],
                  [len(prompt_ids) - 2], ref)
    assert len(out["meta_info"]["output_token_logprobs"]) == GREEDY["max_new_tokens"]
    assert "input_top_logprobs" not in out["meta_info"]
    assert_pool_whole(engine)


def test_sampled_logprobs_are_of_the_temperature_scaled_distribution(engine, hf_model):
    temperature = 0.7
    out = engine.generate(PROMPT, {"temperature": temperature, "max_new_tokens": 6,
                                   "sampling_seed": 11}, return_logprob=True)
    prompt_ids = engine.tokenizer.encode(PROMPT)
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt_ids + out["output_ids"]])).logits[0].float()
    ref = torch.log_softmax(logits / temperature, dim=-1)
    check_entries(out["meta_info"]["output_token_logprobs"], out["output_ids"],
                  range(len(prompt_ids) - 1, len(prompt_ids) + 5), ref)


def test_batch_mixes_logprob_and_plain_requests_and_streams_the_same(engine):
    plain, with_lp = engine.generate(
        [PROMPTS[1], PROMPT], [GREEDY, GREEDY],
        return_logprob=[False, True], logprob_start_len=[-1, 0])
    assert "output_token_logprobs" not in plain["meta_info"]
    alone = engine.generate(PROMPT, GREEDY, return_logprob=True, logprob_start_len=0)
    assert with_lp["output_ids"] == alone["output_ids"]
    for key in ("input_token_logprobs", "output_token_logprobs"):
        assert [e[1] for e in with_lp["meta_info"][key]] == [e[1] for e in alone["meta_info"][key]]
        assert [e[0] for e in with_lp["meta_info"][key][1:]] == pytest.approx(
            [e[0] for e in alone["meta_info"][key][1:]], abs=TOL)
    streamed = []
    for chunk in engine.generate(PROMPT, GREEDY, return_logprob=True, stream=True):
        streamed += chunk["meta_info"]["output_token_logprobs"]
    assert [e[1] for e in streamed] == alone["output_ids"]
    assert [e[0] for e in streamed] == pytest.approx(
        [e[0] for e in alone["meta_info"]["output_token_logprobs"]], abs=TOL)


def test_input_logprobs_across_prefill_chunks(smollm2_dir, hf_model):
    from sglbatch.engine.engine import Engine

    with Engine(model_path=str(smollm2_dir), dtype="float32", kv_cache_gb=0.2,
                chunked_prefill_size=7) as eng:
        prompt_ids = eng.tokenizer.encode(PROMPTS[4])
        out = eng.generate(PROMPTS[4], GREEDY, return_logprob=True, logprob_start_len=0)
        ref = reference_logprobs(hf_model, prompt_ids + out["output_ids"])
        check_entries(out["meta_info"]["input_token_logprobs"], prompt_ids,
                      [None, *range(len(prompt_ids) - 1)], ref)
        check_entries(out["meta_info"]["output_token_logprobs"], out["output_ids"],
                      range(len(prompt_ids) - 1, ref.shape[0] - 1), ref)
