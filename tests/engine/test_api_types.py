"""The typed boundary: requests in, outputs out, and the SGLang dicts they convert to."""

from __future__ import annotations

import asyncio

import pytest

from sglbatch import FinishReason, GenerateOutput, GenerateRequest, MetaInfo, SamplingParams
from sglbatch.engine.errors import ENGINE_ERROR_STATUS

GREEDY = SamplingParams(temperature=0, max_new_tokens=6)


@pytest.mark.parametrize("reason", [
    FinishReason.stop(2), FinishReason.stop("\n"), FinishReason.max_length(7),
    FinishReason.abort("gone"), FinishReason.abort("boom", ENGINE_ERROR_STATUS),
])
def test_finish_reasons_round_trip_through_sglang_json(reason):
    assert FinishReason.from_json(reason.to_json()) == reason


def test_only_engine_failures_are_engine_errors():
    assert FinishReason.abort("boom", ENGINE_ERROR_STATUS).engine_error == "boom"
    assert FinishReason.abort("aborted by the client").engine_error is None
    assert FinishReason.max_length(3).engine_error is None


def test_meta_info_keeps_logprobs_and_fields_of_other_servers():
    sent = {"id": "r1", "finish_reason": {"type": "length", "length": 3}, "prompt_tokens": 5,
            "completion_tokens": 3, "cached_tokens": 1, "e2e_latency": 0.5,
            "output_token_logprobs": [[-0.1, 7, None]], "weight_version": "default"}
    meta = MetaInfo.from_json(sent)
    assert meta.finish_reason == FinishReason.max_length(3)
    assert meta.logprobs == {"output_token_logprobs": [[-0.1, 7, None]]}
    assert meta.extra == {"weight_version": "default"}
    assert meta.to_json() == sent


def test_sampling_params_json_names_max_new_tokens_and_what_differs():
    assert SamplingParams().to_json() == {"max_new_tokens": 128}
    assert SamplingParams(temperature=0, stop="x").to_json() == {
        "max_new_tokens": 128, "stop": ["x"], "temperature": 0}


def test_run_gives_what_generate_gives_as_dicts(engine):
    prompts = ["The capital of France is", "1, 2, 3,"]
    typed = engine.run([GenerateRequest(prompt=p, sampling_params=GREEDY) for p in prompts])
    dicts = engine.generate(prompts, {"temperature": 0, "max_new_tokens": 6})
    assert all(isinstance(out, GenerateOutput) for out in typed)
    for out, as_dict in zip(typed, dicts):
        assert out.to_json()["text"] == as_dict["text"] == out.text
        assert out.output_ids == as_dict["output_ids"]
        assert out.meta_info.finish_reason == FinishReason.from_json(
            as_dict["meta_info"]["finish_reason"])


def test_the_engine_validates_a_copy_of_the_callers_sampling_params(engine):
    params = SamplingParams(temperature=0, max_new_tokens=1, logit_bias={"5": -1})
    engine.run([GenerateRequest(prompt="Hi", sampling_params=params)])
    assert params.logit_bias == {"5": -1}  # the engine's copy was normalized, not this one


def test_stream_validates_before_iteration_and_deltas_carry_their_index(engine):
    with pytest.raises(ValueError, match="top_p"):
        engine.stream([GenerateRequest(prompt="Hi", sampling_params=SamplingParams(top_p=2))])
    requests = [GenerateRequest(prompt=p, sampling_params=GREEDY) for p in ("Hello", "Hi")]
    deltas = list(engine.stream(requests))
    finished = [d.index for d in deltas if d.finished]
    assert sorted(finished) == [0, 1]
    texts = ["".join(d.text for d in deltas if d.index == i) for i in (0, 1)]
    assert texts == [out.text for out in engine.run(requests)]


def test_async_run_and_stream(engine):
    async def both():
        request = GenerateRequest(prompt="Hello", sampling_params=GREEDY)
        [out] = await engine.run_async([request])
        stream = await engine.stream_async([request])
        text = "".join([d.text async for d in stream])
        return out.text, text

    final, streamed = asyncio.run(both())
    assert final == streamed
