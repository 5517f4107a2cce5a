"""SGLang's frontend programs on the in-process Engine backend (`import sglbatch as sgl`).

The programs themselves live in tests/lang/programs.py (shared with the HTTP backends'
tests); here they run against the session engine (SmolLM2-135M, fp32, greedy). A few
interpreter tests use a scripted fake backend so they need no model.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import traceback

import pytest

import sglbatch as sgl
from sglbatch.lang.backend.base_backend import BaseBackend
from sglbatch.lang.backend.engine import EngineBackend
from sglbatch.lang.chat_template import (
    get_chat_template,
    get_chat_template_by_model_path,
    get_chat_template_for_tokenizer,
)
from sglbatch.lang.choices import ChoicesDecision
from sglbatch.lang.interpreter import split_reasoning
from sglbatch.lang.ir import REGEX_INT, SglSamplingParams
from tests.lang import programs as P

ENGINE_CAPABILITIES = {"select", "regex", "completion", "fork"}


# --------------------------------------------------------------------------------------
# The documented programs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", P.cases_for(ENGINE_CAPABILITIES), ids=lambda c: c.name)
def test_documented_program(case, engine):
    # A bare sglbatch.Engine is a backend: it is wrapped in an EngineBackend.
    P.run_case(case, engine)


def test_multi_turn_text_is_chatml(engine_backend):
    state, _ = P.run_case(P.CASES_BY_NAME["multi_turn_question"], engine_backend)
    assert engine_backend.chat_template.name == "chatml"
    text = state.text()
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                           "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                           "<|im_start|>assistant\n")
    assert text.endswith(state["answer_2"] + "<|im_end|>\n")
    # The second turn reuses the first turn's KV (radix cache).
    meta = state.get_meta_info("answer_2")
    assert meta["cached_tokens"] > 0 and meta["prompt_tokens"] > meta["cached_tokens"]


def test_blocks_and_begin_end_give_the_same_prompt(engine_backend):
    a = P.multi_turn_question.run(**P.MULTI_TURN_ARGS, **P.GREEDY, backend=engine_backend)
    b = P.multi_turn_with_blocks.run(**P.MULTI_TURN_ARGS, **P.GREEDY, backend=engine_backend)
    assert a.text() == b.text()
    c = P.roles_begin_end.run(question="What is the capital of France?", **P.GREEDY,
                              backend=engine_backend)
    d = P.chat_qa.run(question="What is the capital of France?", **P.GREEDY,
                      backend=engine_backend)
    assert c.messages()[:2] == d.messages()[:2]
    assert c.text().startswith(d.text()[: d.text().index("<|im_start|>assistant")])


def test_set_default_backend_takes_a_bare_engine(engine):
    sgl.set_default_backend(engine)
    assert isinstance(sgl.global_config.default_backend, EngineBackend)
    assert sgl.global_config.default_backend is EngineBackend.for_engine(engine)
    state = P.text_qa("What is the capital of France?", temperature=0)  # __call__ == run
    assert "Paris" in state["answer"]
    # bind() fixes arguments.
    bound = P.text_qa.bind(question="What is the capital of France?")
    assert bound.run(temperature=0)["answer"] == state["answer"]
    info = sgl.get_server_info()
    assert info["model_path"] and "max_total_num_tokens" in info
    _flush(sgl.global_config.default_backend)


def _flush(backend, timeout: float = 120.0) -> None:
    """Empty the prefix cache (refused while requests of earlier tests still run)."""
    deadline = time.monotonic() + timeout
    while not sgl.flush_cache(backend):
        assert time.monotonic() < deadline, "the engine never became idle"
        time.sleep(0.2)


def test_engine_class_is_sglbatch_engine():
    from sglbatch.engine.engine import Engine

    assert sgl.Engine is Engine
    assert sgl.lang.Engine is Engine


def test_run_batch_text_qa_with_progress_bar(engine_backend, capfd):
    questions = P.TEXT_QA_QUESTIONS
    states = P.text_qa.run_batch([{"question": q} for q in questions], progress_bar=True,
                                 backend=engine_backend, **P.GREEDY)
    err = capfd.readouterr().err
    assert f"{len(questions)}/{len(questions)}" in err  # the progress bar reached the end
    assert len(states) == len(questions)
    for q, state in zip(questions, states):
        assert state.text().startswith("Q: " + q + "\nA:")
        P.check_text_qa(state)
    # Positional argument tuples work too, and give the same (greedy) answers.
    again = P.text_qa.run_batch([(q,) for q in questions[:3]], backend=engine_backend,
                                num_threads=2, **P.GREEDY)
    assert [s["answer"] for s in again] == [s["answer"] for s in states[:3]]
    # generator_style yields the states in order.
    gen = P.text_qa.run_batch([{"question": q} for q in questions[:3]], generator_style=True,
                              backend=engine_backend, **P.GREEDY)
    assert [s["answer"] for s in gen] == [s["answer"] for s in states[:3]]


def test_streaming_text_iter_and_text_async_iter(engine_backend, record_stream):
    question = "Write two sentences about the sea."
    plain = P.chat_qa.run(question=question, backend=engine_backend, **P.GREEDY)
    streamed = record_stream(engine_backend)

    state = P.chat_qa.run(question=question, stream=True, backend=engine_backend, **P.GREEDY)
    chunks = list(state.text_iter())
    assert "".join(chunks) == plain.text() == state.text()
    assert len(streamed) > 3 and "".join(streamed) == plain["answer"]

    state = P.chat_qa.run(question=question, stream=True, backend=engine_backend, **P.GREEDY)
    pieces = list(state.text_iter("answer"))
    assert "".join(pieces) == plain["answer"] == state["answer"]
    assert state.get_meta_info("answer")["finish_reason"] is not None

    async def collect():
        state = P.chat_qa.run(question=question, stream=True, backend=engine_backend,
                              **P.GREEDY)
        out = []
        async for piece, meta in state.text_async_iter("answer", return_meta_data=True):
            assert "prompt_tokens" in meta
            out.append(piece)
        return out

    assert "".join(asyncio.run(collect())) == plain["answer"]


@pytest.mark.parametrize("method", [sgl.token_length_normalized, sgl.greedy_token_selection,
                                    sgl.unconditional_likelihood_normalized],
                         ids=lambda m: type(m).__name__)
def test_choices_methods_on_the_engine(method, engine_backend):
    countries = {"France": " Paris", "Germany": " Berlin", "Italy": " Rome",
                 "Spain": " Madrid", "England": " London"}
    states = P.capital_select.run_batch(
        [{"country": c, "choices_method": method} for c in countries],
        backend=engine_backend)
    assert [s["city"] for s in states] == list(countries.values())
    meta = states[0].get_meta_info("city")
    n = len(P.CAPITALS)
    assert len(meta["normalized_prompt_logprobs"]) == n
    assert len(meta["input_token_logprobs"]) == n
    # The decision follows the method's own score.
    if method is sgl.token_length_normalized:
        scores = meta["normalized_prompt_logprobs"]
    elif method is sgl.greedy_token_selection:
        matrix = meta["greedy_logprob_matrix"]
        assert len(matrix) == n
        scores = [row[-1] for row in matrix]  # the prompt columns tie; the city decides
    else:
        scores = meta["normalized_unconditional_prompt_logprobs"]
        assert len(meta["unconditional_token_logprobs"]) == n
        assert meta["unconditional_token_logprobs"][0][0][0] is None  # no context
    assert P.CAPITALS[scores.index(max(scores))] == " Paris"


def test_select_matches_the_engine_logprobs(engine, engine_backend):
    state = P.capital_select.run(country="Italy", backend=engine_backend)
    meta = state.get_meta_info("city")
    prompt = "The capital of Italy is"
    for choice, entries in zip(P.CAPITALS, meta["input_token_logprobs"]):
        out = engine.generate(prompt + choice, {"max_new_tokens": 0}, return_logprob=True,
                              logprob_start_len=0)
        full = out["meta_info"]["input_token_logprobs"]
        assert [e[1] for e in full[-len(entries):]] == [e[1] for e in entries]
        assert [e[0] for e in full[-len(entries):]] == pytest.approx([e[0] for e in entries],
                                                                      abs=1e-4)


def test_image_with_a_text_only_model_is_a_clear_error(engine_backend):
    @sgl.function
    def image_qa(s, question):
        s += sgl.user(sgl.image("example_image.png") + question)
        s += sgl.assistant(sgl.gen("answer"))

    with pytest.raises(ValueError, match="text-only"):
        image_qa.run(question="What is this?", backend=engine_backend)

    @sgl.function
    def video_qa(s):
        s += sgl.user(sgl.video("clip.mp4", num_frames=4) + "Describe it.")

    with pytest.raises(ValueError, match="text-only"):
        video_qa.run(backend=engine_backend)


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


@sgl.function
def bad_schema_then_read(s):
    s += "Give me JSON: "
    s += sgl.gen("out", max_tokens=8, json_schema="{this is not json")
    s += "\nThe output was: " + s["out"]


@sgl.function
def bad_schema_last(s):
    s += "Give me JSON: "
    s += sgl.gen("out", max_tokens=8, json_schema="{this is not json")


def _formatted(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def test_engine_error_reaches_the_caller_with_the_program_line(engine_backend):
    with pytest.raises(ValueError) as info:
        bad_schema_then_read.run(backend=engine_backend)
    text = _formatted(info.value)
    assert "json_schema" in str(info.value)
    # The note names the program line that submitted the failing gen ...
    assert 'sgl.gen("out", max_tokens=8, json_schema="{this is not json")' in text
    assert "test_programs_engine.py" in text and "bad_schema_then_read" in text
    # ... and the traceback reaches into the backend call that failed.
    assert "engine.py" in text and "_execute_gen" in text

    # An error in the last expression (nothing reads it in the program) surfaces on access.
    state = bad_schema_last.run(backend=engine_backend)
    with pytest.raises(ValueError, match="json_schema"):
        state["out"]
    with pytest.raises(ValueError, match="json_schema"):
        state.text()
    assert isinstance(state.error(), ValueError)
    # run_batch re-raises it too (each program is synced).
    with pytest.raises(ValueError, match="json_schema"):
        bad_schema_last.run_batch([{}, {}], backend=engine_backend)


def test_an_exception_in_the_program_body_propagates(engine_backend):
    @sgl.function
    def broken(s, x):
        s += "Q: " + x
        s += sgl.gen("a", max_tokens=2)
        return 1 / 0

    with pytest.raises(ZeroDivisionError) as info:
        broken.run(x="hi", backend=engine_backend)
    assert "return 1 / 0" in _formatted(info.value)

    with pytest.raises(ZeroDivisionError):
        broken.run_batch([{"x": "a"}, {"x": "b"}], backend=engine_backend)


def test_no_backend_is_a_clear_error():
    sgl.global_config.default_backend = None
    with pytest.raises(ValueError, match="set_default_backend"):
        P.text_qa.run(question="hi")


# --------------------------------------------------------------------------------------
# run_batch with a shared ~1k-token prefix: prefilled once, same greedy results
# --------------------------------------------------------------------------------------


def test_run_batch_shares_the_prefix_and_matches_sequential_runs(engine, engine_backend):
    document = P.shared_prefix_document()
    prefix = ("Read the document, then answer the question in a few words.\n\n"
              "Document: " + document + "\n\n")
    prefix_tokens = len(engine.tokenizer.encode(prefix))
    assert 900 <= prefix_tokens <= 1400, prefix_tokens
    questions = P.shared_prefix_questions(64)
    args = [{"document": document, "question": q} for q in questions]

    _flush(engine_backend)
    t0 = time.perf_counter()
    states = P.shared_prefix_qa.run_batch(args, backend=engine_backend, **P.GREEDY)
    batch_s = time.perf_counter() - t0

    metas = [s.get_meta_info("answer") for s in states]
    computed = sum(m["prompt_tokens"] - m["cached_tokens"] for m in metas)
    reused = [m for m in metas if m["cached_tokens"] >= prefix_tokens - 4]
    # Every program but the first found the prefix in the cache: it was prefilled once.
    assert len(reused) >= len(metas) - 1, [m["cached_tokens"] for m in metas]
    suffixes = sum(m["prompt_tokens"] for m in metas) - len(metas) * prefix_tokens
    assert computed <= prefix_tokens + suffixes + 8 * len(metas), (computed, prefix_tokens)

    # Each program alone (every 4th, to keep the test short) gives the same greedy answer.
    sample = list(range(0, len(args), 4))
    t0 = time.perf_counter()
    alone = {}
    for i in sample:
        state = P.shared_prefix_qa.run(**args[i], backend=engine_backend, **P.GREEDY)
        state.sync()
        alone[i] = state
    sequential_s = (time.perf_counter() - t0) * len(args) / len(sample)
    assert [states[i]["answer"] for i in sample] == [alone[i]["answer"] for i in sample]
    assert all(s["answer"].strip() for s in states)
    print(f"\nrun_batch of 64 shared-prefix programs: {batch_s:.2f}s; one at a time "
          f"(extrapolated from {len(sample)}): {sequential_s:.2f}s; "
          f"speedup {sequential_s / batch_s:.2f}x (prefix {prefix_tokens} tokens, "
          f"{computed} prompt tokens computed in the batch)")
    assert batch_s < sequential_s


# --------------------------------------------------------------------------------------
# Without a model: imports, templates, sampling parameters, choices math, interpreter
# --------------------------------------------------------------------------------------


def test_import_sglbatch_as_sgl_is_light():
    code = ("import sys, sglbatch as sgl\n"
            "assert callable(sgl.function) and callable(sgl.gen) and callable(sgl.user)\n"
            "for n in ['select', 'gen_int', 'gen_string', 'image', 'video', 'system', "
            "'assistant', 'system_begin', 'system_end', 'user_begin', 'user_end', "
            "'assistant_begin', 'assistant_end', 'set_default_backend', 'flush_cache', "
            "'get_server_info', 'separate_reasoning', 'token_length_normalized', "
            "'greedy_token_selection', 'unconditional_likelihood_normalized', "
            "'global_config']:\n"
            "    getattr(sgl, n)\n"
            "@sgl.function\n"
            "def f(s, q):\n"
            "    s += q + sgl.gen('a')\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "assert sgl.BaseBackend.__name__ == 'BaseBackend'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_chat_template_detection(engine):
    cases = {
        "HuggingFaceTB/SmolLM2-135M-Instruct": "chatml",
        "/root/.cache/sglbatch/models/SmolLM2-135M-Instruct.Q4_1-1bf7a5a17386": "chatml",
        "Qwen/Qwen2.5-7B-Instruct": "qwen",
        "meta-llama/Meta-Llama-3-8B-Instruct": "llama-3-instruct",
        "meta-llama/Llama-2-7b-chat-hf": "llama-2-chat",
        "mistralai/Mistral-7B-Instruct-v0.3": "mistral",
        "google/gemma-2-2b-it": "gemma-it",
        "lmsys/vicuna-7b-v1.5": "vicuna_v1.1",
        "some/unknown-model": "default",
    }
    for path, name in cases.items():
        assert get_chat_template_by_model_path(path).name == name, path
    # Unknown name, but the tokenizer's Jinja template has ChatML markers.
    assert get_chat_template_for_tokenizer("x/unknown", engine.tokenizer.hf).name == "chatml"
    assert get_chat_template("claude").role_prefix_and_suffix["user"][0] == "\n\nHuman: "
    llama2 = get_chat_template("llama-2-chat").get_prompt([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ])
    assert llama2 == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]Hello </s><s>"
    assert EngineBackend.for_engine(engine).get_chat_template().name == "chatml"


def test_sampling_params_conversions():
    p = SglSamplingParams(max_new_tokens=7, stop=["\n"], temperature=0.5, top_k=3,
                          regex=None, json_schema='{"type": "string"}')
    srt = p.to_srt_kwargs()
    assert srt["max_new_tokens"] == 7 and srt["top_k"] == 3 and srt["json_schema"]
    assert set(srt) >= {"min_new_tokens", "n", "stop_token_ids", "stop_regex", "min_p",
                        "frequency_penalty", "presence_penalty", "ignore_eos", "regex"}
    oa = p.to_openai_kwargs()
    assert oa["max_tokens"] == 7 and oa["stop"] == ["\n"] and "top_k" not in oa
    assert p.to_anthropic_kwargs()["stop_sequences"] == ["\n"]
    assert p.to_litellm_kwargs()["max_tokens"] == 7
    assert p.to_vertexai_kwargs()["top_k"] == 3
    assert SglSamplingParams(stop="x").to_anthropic_kwargs()["stop_sequences"] == ["x"]
    q = p.clone()
    q.stop.append("y")
    assert p.stop == ["\n", "y"] or p.stop == ["\n"]  # a shallow copy, as SGLang's
    assert q.json_schema == p.json_schema
    with pytest.warns(UserWarning, match="Regular expression"):
        SglSamplingParams(regex="a+").to_openai_kwargs()


def test_choices_math_without_a_model():
    # Two choices: "ab" (2 tokens) and "c" (1 token).
    inputs = [[(-1.0, 1, "a"), (-0.2, 2, "b")], [(-0.5, 3, "c")]]
    normalized = [-0.6, -0.5]
    args = {"choices": ["ab", "c"], "normalized_prompt_logprobs": normalized,
            "input_token_logprobs": inputs, "output_token_logprobs": [[], []]}
    assert sgl.token_length_normalized(**args).decision == "c"
    # Greedy: position 0: -1.0 vs -0.5 -> "c".
    d = sgl.greedy_token_selection(**args)
    assert d.decision == "c"
    assert d.meta_info["greedy_logprob_matrix"] == [[-1.0, -0.2], [-0.5, -0.5]]
    # Unconditional: "ab" is much likelier given the prompt than without it.
    uncond = [[(None, 1, None), (-5.0, 2, None)], [(None, 3, None)]]
    d = sgl.unconditional_likelihood_normalized(**args, unconditional_token_logprobs=uncond)
    assert d.meta_info["normalized_unconditional_prompt_logprobs"] == pytest.approx([1.9, -0.5])
    assert d.decision == "ab"
    with pytest.raises(ValueError):
        sgl.unconditional_likelihood_normalized(**args)


class ScriptedBackend(BaseBackend):
    """Answers each gen with the next scripted text; streams it word by word."""

    def __init__(self, answers, fail_on=None):
        super().__init__()
        self.answers = list(answers)
        self.fail_on = fail_on
        self.prompts = []
        self.params = []

    def get_model_name(self):
        return "scripted"

    def generate(self, s, sampling_params):
        self.prompts.append(s.text_)
        self.params.append(sampling_params)
        if self.fail_on and self.fail_on in s.text_:
            raise RuntimeError("scripted failure")
        return self.answers.pop(0), {"prompt": s.text_}

    def generate_stream(self, s, sampling_params):
        text, meta = self.generate(s, sampling_params)
        for i, word in enumerate(text.split(" ")):
            yield (word if i == 0 else " " + word), meta

    def select(self, s, choices, temperature, choices_method=None):
        return ChoicesDecision(decision=choices[-1], meta_info={"scripted": True})


def test_interpreter_semantics_with_a_scripted_backend():
    @sgl.function
    def prog(s, topic):
        s += "Topic: " + topic + "\n"
        s += "Pick: " + sgl.select("pick", ["a", "b"]) + "\n"
        s += "Say:" + sgl.gen("say", max_tokens=5, temperature=0.3, stop=".")
        forks = s.fork(2)
        forks += lambda i: f" fork {i}:" + sgl.gen("f", max_tokens=3)
        forks.join()
        s += "\nint: " + sgl.gen_int("n")

    backend = ScriptedBackend([" hello", " x", " y", "42"])
    state = prog.run(topic="cats", max_new_tokens=99, stop=["END"], backend=backend)
    assert state["pick"] == "b" and state["say"] == " hello"
    assert sorted(state["f"]) == [" x", " y"]  # gathered from the forks
    assert state["n"] == "42"
    assert state.text() == "Topic: cats\nPick: b\nSay: hello\nint: 42"
    # gen arguments override run() defaults; run() defaults fill the rest; the default
    # template (no stop_str) adds no stop strings.
    say = backend.params[0]
    assert (say.max_new_tokens, say.temperature, say.stop) == (5, 0.3, ".")
    fork_params = backend.params[1]
    assert (fork_params.max_new_tokens, fork_params.stop) == (3, ["END"])
    assert backend.params[-1].dtype is int and backend.params[-1].max_new_tokens == 99


def test_chat_stop_strings_are_added():
    class ChatML(ScriptedBackend):
        def __init__(self, answers):
            super().__init__(answers)
            self.chat_template = get_chat_template("chatml")

    backend = ChatML(["hi there"])
    state = P.chat_qa.run(question="hello", backend=backend, stop="\n\n")
    assert state["answer"] == "hi there"
    assert backend.params[0].stop == ["\n\n", "<|im_end|>"]


def test_worker_error_stops_the_program_with_its_traceback():
    @sgl.function
    def prog(s):
        s += "ok " + sgl.gen("a")
        s += "BOOM " + sgl.gen("b")
        s += "after " + sgl.gen("c")
        s["a"], s["b"]

    backend = ScriptedBackend(["1", "2", "3"], fail_on="BOOM")
    with pytest.raises(RuntimeError, match="scripted failure") as info:
        prog.run(backend=backend)
    text = _formatted(info.value)
    assert 's += "BOOM " + sgl.gen("b")' in text
    assert len(backend.prompts) == 2  # nothing ran after the failure


def test_streaming_with_a_scripted_backend_and_separate_reasoning():
    backend = ScriptedBackend(["<think>The user greets.</think>Hello to you too"])
    state = P.chat_qa.run(question="hello", stream=True, backend=backend)
    assert "".join(state.text_iter("answer")) == \
        "<think>The user greets.</think>Hello to you too"

    @sgl.function
    def reasoning(s):
        s += sgl.user("hello")
        s += sgl.assistant(sgl.separate_reasoning(sgl.gen("answer"), model_type="qwen3"))

    backend = ScriptedBackend(["<think>The user greets.</think>Hello to you too"])
    state = reasoning.run(backend=backend)
    assert state["answer"] == "Hello to you too"
    assert state["answer_reasoning_content"] == "The user greets."
    assert state.text().endswith("ASSISTANT:Hello to you too\n")
    assert split_reasoning("no tags here", "qwen3") == ("", "no tags here")
    assert split_reasoning("forced</think>answer", "deepseek-r1") == ("forced", "answer")


def test_dtype_regexes_are_sglangs():
    from sglbatch.lang.ir import handle_dtype_to_regex

    p = SglSamplingParams(dtype=int)
    handle_dtype_to_regex(p)
    assert p.regex == REGEX_INT and p.stop == [" ", "\n"]
    p = SglSamplingParams(dtype="bool")
    handle_dtype_to_regex(p)
    assert p.regex == "(True|False)"
    with pytest.raises(RuntimeError):
        handle_dtype_to_regex(SglSamplingParams(dtype=list))
    # json_schema may be given as a dict to gen (sent as a JSON string).
    g = sgl.gen("x", json_schema={"type": "integer"})
    assert json.loads(g.sampling_params.json_schema) == {"type": "integer"}
