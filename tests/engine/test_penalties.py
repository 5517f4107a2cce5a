"""Penalties and length controls: the distribution the engine samples from (seen through
its logprobs) equals the penalty applied directly to transformers' logits."""

from __future__ import annotations

import pytest
import torch

TOL = 1e-3
PROMPT = "Repeat after me: red blue red blue red blue red blue red blue"
STEPS = 10
TOP = 8


def run(engine, params: dict, **extra) -> dict:
    return engine.generate(PROMPT, {"temperature": 0, "max_new_tokens": STEPS, **params},
                           return_logprob=True, top_logprobs_num=TOP, **extra)


def raw_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


def frequency(logits, prompt, output, value):
    counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=logits.shape[0])
    return logits - value * counts.float()


def presence(logits, prompt, output, value):
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[output] = True
    return logits - value * seen.float()


def repetition(logits, prompt, output, value):
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[prompt + output] = True
    penalized = torch.where(logits > 0, logits / value, logits * value)
    return torch.where(seen, penalized, logits)


@pytest.mark.parametrize("name, value, direct", [
    ("frequency_penalty", 1.5, frequency),
    ("presence_penalty", 1.2, presence),
    ("repetition_penalty", 1.8, repetition),
])
def test_penalty_equals_direct_computation(engine, hf_model, name, value, direct):
    out = run(engine, {name: value})
    prompt = engine.tokenizer.encode(PROMPT)
    output = out["output_ids"]
    logits = raw_logits(hf_model, prompt + output)
    changed = 0
    for t, top in enumerate(out["meta_info"]["output_top_logprobs"]):
        row = logits[len(prompt) - 1 + t]
        expected = torch.log_softmax(direct(row, prompt, output[:t], value), dim=-1)
        ref_vals, ref_ids = expected.topk(TOP)
        assert [e[1] for e in top] == ref_ids.tolist(), f"step {t}"
        assert [e[0] for e in top] == pytest.approx(ref_vals.tolist(), abs=TOL)
        chosen = out["meta_info"]["output_token_logprobs"][t]
        assert chosen[0] == pytest.approx(expected[chosen[1]].item(), abs=TOL)
        unpenalized = torch.log_softmax(row, dim=-1)[chosen[1]].item()
        changed += abs(unpenalized - chosen[0]) > 0.05
    assert changed, "the penalty never changed the distribution; the test proves nothing"


def test_penalized_and_plain_requests_share_a_batch(engine):
    plain_alone = engine.generate(PROMPT, {"temperature": 0, "max_new_tokens": STEPS})
    penalized, plain = engine.generate(
        [PROMPT, PROMPT], [{"temperature": 0, "max_new_tokens": STEPS, "frequency_penalty": 2},
                           {"temperature": 0, "max_new_tokens": STEPS}])
    assert plain["output_ids"] == plain_alone["output_ids"]
    assert penalized["output_ids"] != plain["output_ids"]


def test_logit_bias_is_added_to_the_named_tokens(engine, hf_model):
    token = engine.tokenizer.encode(" green")[0]
    out = run(engine, {"logit_bias": {str(token): 4.0}}, token_ids_logprob=[token])
    prompt = engine.tokenizer.encode(PROMPT)
    logits = raw_logits(hf_model, prompt + out["output_ids"])
    for t, picked in enumerate(out["meta_info"]["output_token_ids_logprobs"]):
        row = logits[len(prompt) - 1 + t].clone()
        row[token] += 4.0
        assert picked[0][0] == pytest.approx(torch.log_softmax(row, -1)[token].item(), abs=TOL)


def test_min_new_tokens_masks_eos_until_reached(engine):
    chat = [{"role": "user", "content": "Say OK."}]
    eos = engine.tokenizer.eos_token_id
    short = engine.generate(messages=chat, sampling_params={"temperature": 0,
                                                            "max_new_tokens": 40})
    assert short["meta_info"]["finish_reason"]["type"] == "stop"
    n_short = short["meta_info"]["completion_tokens"]
    target = n_short + 6
    out = engine.generate(messages=chat, sampling_params={
        "temperature": 0, "max_new_tokens": 40, "min_new_tokens": target},
        return_logprob=True, token_ids_logprob=[eos])
    assert out["meta_info"]["completion_tokens"] >= target
    assert eos not in out["output_ids"][:target]
    eos_logprobs = [p[0][0] for p in out["meta_info"]["output_token_ids_logprobs"]]
    floor = torch.finfo(torch.float32).min
    assert all(v == floor for v in eos_logprobs[:target])
    assert all(v > floor for v in eos_logprobs[target:])
