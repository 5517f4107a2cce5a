"""Engine API on the real model: output shape, stop conditions, streaming, chat, abort, errors."""

from __future__ import annotations

import asyncio

import pytest

from tests.engine.conftest import assert_pool_whole

GREEDY = {"temperature": 0, "max_new_tokens": 24}


def test_output_has_sglang_shape(engine):
    assert engine.flush_cache()  # the session engine: earlier tests may have cached the prompt
    out = engine.generate("The capital of France is", GREEDY)
    assert set(out) == {"text", "output_ids", "meta_info"}
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == len(engine.tokenizer.encode("The capital of France is"))
    assert meta["completion_tokens"] == len(out["output_ids"]) > 0
    assert meta["cached_tokens"] == 0
    assert meta["finish_reason"]["type"] in ("stop", "length")
    assert isinstance(meta["id"], str) and meta["id"]


def test_max_new_tokens_gives_length_finish(engine):
    out = engine.generate("1, 2, 3, 4,", {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True})
    assert len(out["output_ids"]) == 5
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 5}


def test_stop_string_is_trimmed_and_reported(engine):
    full = engine.generate("1, 2, 3, 4,", {"temperature": 0, "max_new_tokens": 20})["text"]
    assert " 7," in full, full  # the model counts on; the stop test depends on it
    out = engine.generate("1, 2, 3, 4,", {"temperature": 0, "max_new_tokens": 20, "stop": " 7"})
    assert out["text"] == full[:full.index(" 7")]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": " 7"}
    kept = engine.generate("1, 2, 3, 4,", {"temperature": 0, "max_new_tokens": 20,
                                            "stop": [" 7"], "no_stop_trim": True})
    assert kept["text"] == full[:full.index(" 7") + 2]


def test_stop_token_ids(engine):
    full = engine.generate("1, 2, 3, 4,", {**GREEDY, "ignore_eos": True})
    target = full["output_ids"][3]
    out = engine.generate("1, 2, 3, 4,", {**GREEDY, "stop_token_ids": [target]})
    assert out["output_ids"] == full["output_ids"][:full["output_ids"].index(target) + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": target}


def test_eos_stops_and_ignore_eos_continues(engine):
    msgs = [{"role": "user", "content": "Say hi."}]
    out = engine.generate(messages=msgs, sampling_params={"temperature": 0, "max_new_tokens": 64})
    eos = engine.model_runner.model_config.eos_token_ids
    assert out["meta_info"]["finish_reason"]["type"] == "stop"
    assert out["output_ids"][-1] in eos
    assert not any(t in out["text"] for t in ("<|im_end|>", "<|endoftext|>"))
    longer = engine.generate(messages=msgs, sampling_params={
        "temperature": 0, "max_new_tokens": len(out["output_ids"]) + 3, "ignore_eos": True})
    assert longer["output_ids"][:len(out["output_ids"])] == out["output_ids"]
    assert len(longer["output_ids"]) == len(out["output_ids"]) + 3


def test_chat_messages_use_the_chat_template(engine):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    templated = engine.tokenizer.hf.apply_chat_template(msgs, tokenize=False,
                                                        add_generation_prompt=True)
    assert "<|im_start|>assistant" in templated
    by_messages = engine.generate(messages=msgs, sampling_params=GREEDY)
    by_ids = engine.generate(input_ids=engine.tokenizer.hf.encode(
        templated, add_special_tokens=False), sampling_params=GREEDY)
    assert by_messages["output_ids"] == by_ids["output_ids"]


def test_batch_keeps_order_and_per_request_params(engine):
    prompts = ["Hello", "The capital of France is", "1, 2, 3,"]
    params = [{**GREEDY, "max_new_tokens": n, "ignore_eos": True} for n in (3, 5, 7)]
    outs = engine.generate(prompts, params)
    assert [len(o["output_ids"]) for o in outs] == [3, 5, 7]
    for prompt, out in zip(prompts, outs):
        assert out["meta_info"]["prompt_tokens"] == len(engine.tokenizer.encode(prompt))


def test_stream_deltas_add_up_to_the_full_output(engine):
    params = {"temperature": 0, "max_new_tokens": 40, "stop": " 12,"}
    full = engine.generate("1, 2, 3, 4,", params)
    assert full["meta_info"]["finish_reason"]["matched"] == " 12,"
    chunks = list(engine.generate("1, 2, 3, 4,", params, stream=True))
    assert len(chunks) > 3
    assert "".join(c["text"] for c in chunks) == full["text"]
    assert sum((c["output_ids"] for c in chunks), []) == full["output_ids"]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["meta_info"]["finish_reason"] == full["meta_info"]["finish_reason"]


def test_async_generate_and_async_stream(engine):
    async def run():
        whole = await engine.async_generate("Hello", GREEDY)
        stream = await engine.async_generate("Hello", GREEDY, stream=True)
        text = "".join([chunk["text"] async for chunk in stream])
        return whole, text

    whole, text = asyncio.run(run())
    assert text == whole["text"] and whole["output_ids"]


def test_closing_a_stream_early_aborts_and_frees_kv(engine):
    stream = engine.generate("Tell me a long story.", {"max_new_tokens": 500, "ignore_eos": True},
                             stream=True)
    next(stream)
    stream.close()
    out = engine.generate("Hello", GREEDY)  # the loop has processed the abort by now
    assert out["output_ids"]
    assert_pool_whole(engine)


def test_abort_by_rid(engine):
    async def run():
        stream = await engine.async_generate("Count to a thousand:", {
            "max_new_tokens": 1000, "ignore_eos": True}, rid="to-abort", stream=True)
        chunks = []
        async for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 2:
                engine.abort("to-abort")
        return chunks

    chunks = asyncio.run(run())
    reason = chunks[-1]["meta_info"]["finish_reason"]
    assert reason["type"] == "abort"
    assert chunks[-1]["meta_info"]["completion_tokens"] < 1000
    assert_pool_whole(engine)


def test_max_new_tokens_zero_prefills_and_caches_the_prompt(engine):
    prompt = "A prompt that is computed once and then served from the cache"
    engine.flush_cache()
    out = engine.generate(prompt, {"max_new_tokens": 0}, return_logprob=True,
                          logprob_start_len=0)
    assert out["output_ids"] == [] and out["text"] == ""
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    n = out["meta_info"]["prompt_tokens"]
    assert len(out["meta_info"]["input_token_logprobs"]) == n  # SGLang's `select` needs these
    again = engine.generate(prompt, {"max_new_tokens": 1})
    assert again["meta_info"]["cached_tokens"] == n - 1


@pytest.mark.parametrize("kwargs, field", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": ["ok", ""]}, "prompt[1]"),
    ({"input_ids": []}, "input_ids"),
    ({"prompt": "hello " * 9000}, "longer than the model's context"),
    ({"prompt": "hi", "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
    ({"prompt": "hi", "sampling_params": {"temprature": 0.5}}, "temprature"),
    ({"prompt": "hi", "sampling_params": {"top_p": 0}}, "top_p"),
    ({"prompt": "hi", "sampling_params": {"top_p": 1.5}}, "top_p"),
    ({"prompt": "hi", "sampling_params": {"top_k": 0}}, "top_k"),
    ({"prompt": "hi", "sampling_params": {"temperature": -1}}, "temperature"),
    ({"prompt": "hi", "sampling_params": {"min_p": 2}}, "min_p"),
    ({"prompt": "hi", "sampling_params": {"regex": "(a"}}, "sampling_params.regex: invalid"),
    ({"prompt": "hi", "sampling_params": {"json_schema": "{"}}, "json_schema: invalid"),
    ({"prompt": "hi", "sampling_params": {"ebnf": "root ::= "}}, "ebnf: invalid"),
    ({"prompt": "hi", "sampling_params": {"regex": "a", "ebnf": "root ::= \"a\""}},
     "regex and ebnf are both set"),
    ({"prompt": "hi", "sampling_params": {"frequency_penalty": 3}}, "frequency_penalty"),
    ({"prompt": "hi", "sampling_params": {"repetition_penalty": 0}}, "repetition_penalty"),
    ({"prompt": "hi", "sampling_params": {"min_new_tokens": 200, "max_new_tokens": 10}},
     "min_new_tokens"),
    ({"prompt": "hi", "sampling_params": {"n": 0}}, "sampling_params.n"),
    ({"prompt": "hi", "sampling_params": {"logit_bias": {"x": 1}}}, "logit_bias"),
    ({"prompt": "hi", "sampling_params": {"stop_regex": "a"}}, "stop_regex"),
    ({"prompt": "hi", "return_logprob": True, "logprob_start_len": 5}, "logprob_start_len"),
    ({"prompt": "hi", "return_logprob": True, "token_ids_logprob": [10**9]},
     "token_ids_logprob"),
    ({"prompt": "hi", "custom_logit_processor": "{}"}, "enable_custom_logit_processor"),
    ({"prompt": "hi", "return_logprobs": True}, "return_logprobs"),
    ({"input_ids": [1, 10**9]}, "outside the vocabulary"),
    ({"prompt": "hi", "input_ids": [1]}, "exactly one of"),
    ({"messages": [{"role": "user", "content": "hi"}],
      "sampling_params": [{}, {}]}, "sampling_params"),
])
def test_bad_input_raises_value_error_naming_the_field(engine, kwargs, field):
    with pytest.raises(ValueError, match=None) as info:
        engine.generate(**kwargs)
    assert field in str(info.value)
    assert engine.generate("Hello", {"max_new_tokens": 2})["output_ids"]  # still serving


def test_unknown_engine_argument_is_named(smollm2_dir):
    from sglbatch.engine.engine import Engine

    with pytest.raises(ValueError, match="chunked_prefil_size"):
        Engine(model_path=str(smollm2_dir), chunked_prefil_size=8)


def test_stop_token_text_follows_skip_special_tokens_and_no_stop_trim(engine):
    chat = [{"role": "user", "content": "Say OK."}]
    base = {"temperature": 0, "max_new_tokens": 40}
    eos_text = engine.tokenizer.decode([engine.tokenizer.eos_token_id], skip_special_tokens=False)
    default = engine.generate(messages=chat, sampling_params=base)
    assert default["meta_info"]["finish_reason"] == {
        "type": "stop", "matched": engine.tokenizer.eos_token_id}
    assert default["output_ids"][-1] == engine.tokenizer.eos_token_id  # kept in the ids
    shown = engine.generate(messages=chat, sampling_params={**base, "skip_special_tokens": False})
    assert shown["text"] == default["text"]  # the matched stop token is trimmed from text
    kept = engine.generate(messages=chat, sampling_params={
        **base, "skip_special_tokens": False, "no_stop_trim": True})
    assert kept["text"] == default["text"] + eos_text
    streamed = "".join(c["text"] for c in engine.generate(
        messages=chat, sampling_params={**base, "skip_special_tokens": False,
                                        "no_stop_trim": True}, stream=True))
    assert streamed == kept["text"]
