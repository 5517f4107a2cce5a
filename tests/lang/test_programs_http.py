"""The frontend language's HTTP backends on a real `sglbatch serve` (loopback).

(a) ``sgl.RuntimeEndpoint`` (SGLang's native API): the shared programs of
    ``tests/lang/programs.py`` pass their checks, and at temperature 0 every variable
    and the whole text equal what the in-process engine backend (the session ``engine``
    fixture, fp32 like the server) produces -- select (three choices methods), fork,
    regex, json_schema, run_batch, streaming.
(b) ``sgl.Runtime``: starts a server in a child process, serves a program as the default
    backend, and ``shutdown()`` leaves no process behind; a failed start says why.
(c) ``sgl.OpenAI`` on the server's ``/v1``:
    - as a chat model (SGLang's default): role-based programs give the same messages as
      the native backend; ``gen`` must come right after ``sgl.assistant`` (as SGLang);
      ``select`` works by generating and matching the choices (SGLang's OpenAI backend
      refuses select on chat models); json_schema goes as ``response_format``; regex
      is warned about and ignored (not part of the OpenAI API);
    - as a completion model (``is_chat_model=False``): text programs equal the native
      backend, including select (scored with echoed prompt logprobs, the same token
      healing and choices methods) and, with ``sglang_extras=True``, regex constraints.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import pytest

import sglbatch as sgl
from tests.lang.programs import (
    CASES_BY_NAME,
    TEXT_QA_QUESTIONS,
    capital_select,
    chat_qa,
    run_case,
    text_qa,
)

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lang_server(server):
    """The session's `sglbatch serve` (tests/conftest.py): the default model in fp32, as
    the `engine` fixture, with an API key."""
    assert server.api_key
    return server


@pytest.fixture(scope="module")
def endpoint(lang_server):
    ep = sgl.RuntimeEndpoint(lang_server.url, api_key=lang_server.api_key)
    yield ep
    ep.close()


@pytest.fixture(scope="module")
def engine_results(engine):
    """Each case's state on the in-process engine, run once and shared."""
    cache = {}

    def get(name, **overrides):
        key = (name, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in cache:
            cache[key] = run_case(CASES_BY_NAME[name], engine, **overrides)[0]
        return cache[key]

    return get


@pytest.fixture(scope="module")
def model_name(endpoint):
    return endpoint.get_model_name()


@pytest.fixture(scope="module")
def openai_chat(lang_server, model_name):
    pytest.importorskip("openai")
    return sgl.OpenAI(model_name, base_url=lang_server.v1, api_key=lang_server.api_key,
                      max_retries=0)


@pytest.fixture(scope="module")
def openai_completion(lang_server, model_name):
    pytest.importorskip("openai")
    return sgl.OpenAI(model_name, is_chat_model=False, base_url=lang_server.v1,
                      api_key=lang_server.api_key, max_retries=0, sglang_extras=True)


def _variables(state) -> dict:
    return dict(state.stream_executor.variables)


def assert_same_state(state, reference) -> None:
    assert state.text() == reference.text()
    assert state.messages() == reference.messages()
    assert _variables(state) == _variables(reference)


# --------------------------------------------------------------------------------------
# (a) RuntimeEndpoint == the in-process engine
# --------------------------------------------------------------------------------------

ENDPOINT_CASES = ["multi_turn_question", "roles_begin_end", "tool_use_select",
                  "capital_select", "tip_suggestion_fork", "regex_ip", "json_schema",
                  "text_qa"]


@pytest.mark.parametrize("name", ENDPOINT_CASES)
def test_endpoint_program_equals_engine(endpoint, engine_results, name):
    state, _ = run_case(CASES_BY_NAME[name], endpoint)
    assert_same_state(state, engine_results(name))


@pytest.mark.parametrize("method", ["token_length_normalized", "greedy_token_selection",
                                    "unconditional_likelihood_normalized"])
def test_endpoint_choices_methods_equal_engine(endpoint, engine, method):
    choices_method = getattr(sgl, method)
    ours = capital_select.run(country="Italy", choices_method=choices_method,
                              backend=endpoint, temperature=0)
    ref = capital_select.run(country="Italy", choices_method=choices_method,
                             backend=engine, temperature=0)
    assert ours["city"] == ref["city"] == " Rome", ours.text()
    meta, ref_meta = ours.get_meta_info("city"), ref.get_meta_info("city")
    assert meta["normalized_prompt_logprobs"] == pytest.approx(
        ref_meta["normalized_prompt_logprobs"], abs=1e-4)
    # Same tokens scored (ids and texts), after the same token healing.
    strip = lambda lps: [[(e[1], e[2]) for e in choice] for choice in lps]
    assert strip(meta["input_token_logprobs"]) == strip(ref_meta["input_token_logprobs"])
    if method == "unconditional_likelihood_normalized":
        assert meta["normalized_unconditional_prompt_logprobs"] == pytest.approx(
            ref_meta["normalized_unconditional_prompt_logprobs"], abs=1e-4)


def test_endpoint_run_batch_equals_engine(endpoint, engine):
    args = [{"question": q} for q in TEXT_QA_QUESTIONS]
    ours = text_qa.run_batch(args, backend=endpoint, temperature=0, num_threads=4)
    ref = text_qa.run_batch(args, backend=engine, temperature=0, num_threads=4)
    assert [s["answer"] for s in ours] == [s["answer"] for s in ref]
    assert all(s["answer"].strip() and "\n" not in s["answer"] for s in ours)


def test_endpoint_streaming_text_iter(endpoint, engine_results, record_stream):
    ref = engine_results("multi_turn_question")
    case = CASES_BY_NAME["multi_turn_question"]
    streamed = record_stream(endpoint)
    state = case.program.run(**case.kwargs, backend=endpoint, temperature=0, stream=True)
    pieces = list(state.text_iter(var_name="answer_1"))
    assert "".join(pieces) == ref["answer_1"]
    assert len(streamed) > 2  # both answers arrived in several deltas
    state.sync()
    assert state.text() == ref.text()

    state = text_qa.run(question="What is the capital of France?", backend=endpoint,
                        temperature=0, stream=True)
    assert "".join(state.text_iter()) == state.text()
    assert state["answer"] == engine_results("text_qa")["answer"]


def test_endpoint_server_calls(endpoint, lang_server, model_name):
    assert endpoint.get_chat_template().name == "chatml"  # from the model path (SmolLM2)
    info = sgl.get_server_info(endpoint)
    assert info["max_total_num_tokens"] > 0
    sgl.flush_cache(endpoint)
    endpoint.cache_prefix("A prefix worth caching. " * 8)
    # API keys are sent; a wrong one is refused at construction.
    with pytest.raises(RuntimeError):
        sgl.RuntimeEndpoint(lang_server.url, api_key="wrong")
    # Server-side errors surface from the program.
    @sgl.function
    def bad(s):
        s += "Hi" + sgl.gen("x", max_tokens=-5)

    with pytest.raises(RuntimeError, match="max_new_tokens"):
        bad.run(backend=endpoint).sync()


# --------------------------------------------------------------------------------------
# (b) Runtime
# --------------------------------------------------------------------------------------


def _gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)  # the server leads its own process group
    except ProcessLookupError:
        return True
    return False


def test_runtime_lifecycle(smollm2_dir, endpoint):
    previous = sgl.global_config.default_backend
    runtime = sgl.Runtime(model_path=str(smollm2_dir), dtype="float32", kv_cache_gb=0.5)
    pid = runtime.pid
    try:
        assert runtime.url.startswith("http://127.0.0.1:")
        assert isinstance(runtime.endpoint, sgl.RuntimeEndpoint)
        sgl.set_default_backend(runtime)
        state = text_qa.run(question="What is the capital of France?", temperature=0)
        ref = text_qa.run(question="What is the capital of France?", temperature=0,
                          backend=endpoint)
        assert state["answer"] == ref["answer"]
        sel = capital_select.run(country="Italy", temperature=0)
        assert sel["city"] == " Rome"
        # SGLang's direct helpers.
        out = json.loads(runtime.generate("The capital of France is",
                                          {"max_new_tokens": 4, "temperature": 0}))
        assert out["meta_info"]["completion_tokens"] == 4
        assert runtime.get_tokenizer().encode("Paris")
        assert not _gone(pid)
    finally:
        sgl.set_default_backend(previous)
        runtime.shutdown()
    assert _gone(pid)
    runtime.shutdown()  # idempotent


def test_runtime_failed_start_says_why():
    with (pytest.warns(UserWarning, match="mem_fraction_static"),
          pytest.raises(RuntimeError, match="exited with") as info):
        sgl.Runtime(model_path="/nonexistent/model", mem_fraction_static=0.8,
                    launch_timeout=120)
    assert "nonexistent" in str(info.value)


# --------------------------------------------------------------------------------------
# (c) OpenAI on /v1
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["multi_turn_question", "roles_begin_end"])
def test_openai_chat_programs(openai_chat, endpoint, name):
    case = CASES_BY_NAME[name]
    state, _ = run_case(case, openai_chat)
    # The server renders the same conversation with the model's own chat template, which
    # for these programs (system prompt given) is the text the native backend sends.
    ref, _ = run_case(case, endpoint)
    assert state.messages() == ref.messages()


def test_openai_chat_stream_and_usage(openai_chat, record_stream):
    before = openai_chat.token_usage.completion_tokens
    streamed = record_stream(openai_chat)
    state = chat_qa.run(question="What is the capital of France?", backend=openai_chat,
                        temperature=0, stream=True)
    pieces = list(state.text_iter(var_name="answer"))
    state.sync()
    assert len(streamed) > 1 and "".join(streamed) == "".join(pieces)
    plain = chat_qa.run(question="What is the capital of France?", backend=openai_chat,
                        temperature=0)
    assert "".join(pieces) == plain["answer"]
    assert "paris" in plain["answer"].lower()
    assert openai_chat.token_usage.completion_tokens > before


@sgl.function
def chat_select(s, question):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.select("city", choices=["London", "Paris", "Berlin"]))


def test_openai_chat_select_by_generation(openai_chat, engine):
    state = chat_select.run(question="What is the capital of France?", backend=openai_chat)
    assert state["city"] == "Paris"
    meta = state.get_meta_info("city")
    assert meta["select_method"].startswith("generation:")
    assert state.messages()[-1] == {"role": "assistant", "content": "Paris"}
    ref = chat_select.run(question="What is the capital of France?", backend=engine)
    assert ref["city"] == "Paris"


@sgl.function
def chat_city_schema(s, city):
    s += sgl.system("You are a helpful assistant. Answer in JSON.")
    s += sgl.user("Give the name of the city " + city + " as JSON with the key name.")
    s += sgl.assistant(sgl.gen("json_output", max_tokens=48, json_schema=json.dumps({
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 16}},
        "required": ["name"], "additionalProperties": False})))


def test_openai_chat_json_schema_and_regex(openai_chat):
    state = chat_city_schema.run(city="Paris", backend=openai_chat, temperature=0)
    obj = json.loads(state["json_output"])
    assert set(obj) == {"name"} and isinstance(obj["name"], str)
    # regex is not part of the OpenAI API: warned about, and the text is unconstrained.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        @sgl.function
        def chat_regex(s):
            s += sgl.user("What is 2 + 2?")
            s += sgl.assistant(sgl.gen("answer", max_tokens=8, regex=r"[0-9]+"))

        out = chat_regex.run(backend=openai_chat, temperature=0)
        out.sync()
    assert any("Regular expression is not supported" in str(w.message) for w in caught)
    assert out["answer"]


@sgl.function
def gen_mid_assistant(s):
    s += sgl.user("Say hello.")
    s += sgl.assistant("Sure: " + sgl.gen("x", max_tokens=4))


def test_openai_chat_gen_must_follow_assistant(openai_chat):
    with pytest.raises(RuntimeError, match="right after sgl.assistant"):
        gen_mid_assistant.run(backend=openai_chat).sync()


@sgl.function(num_api_spec_tokens=32)
def spec_chat(s):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user("What is the capital of France? Start your answer with 'The capital'.")
    s += sgl.assistant("The capital" + sgl.gen("rest", stop="."))


@pytest.mark.filterwarnings("ignore:The parameter max_tokens will be overwritten")
def test_openai_chat_api_speculative_execution(openai_chat):
    # One chat call fills the assistant turn; the gen gets the text up to its stop.
    state = spec_chat.run(backend=openai_chat, temperature=0)
    assert "paris" in state["rest"].lower(), state.messages()
    assert state.messages()[-1]["content"] == ("The capital" + state["rest"]).strip()


@pytest.mark.parametrize("name", ["tool_use_select", "regex_ip", "text_qa"])
def test_openai_completion_model_equals_engine(openai_completion, engine_results, name):
    state, _ = run_case(CASES_BY_NAME[name], openai_completion)
    ref = engine_results(name)
    assert state.text() == ref.text()
    assert _variables(state) == _variables(ref)


@pytest.mark.parametrize("method", ["greedy_token_selection",
                                    "unconditional_likelihood_normalized"])
def test_openai_completion_choices_methods(openai_completion, endpoint, method):
    choices_method = getattr(sgl, method)
    ours = capital_select.run(country="Italy", choices_method=choices_method,
                              backend=openai_completion, temperature=0)
    ref = capital_select.run(country="Italy", choices_method=choices_method,
                             backend=endpoint, temperature=0)
    assert ours["city"] == ref["city"] == " Rome"
    meta, ref_meta = ours.get_meta_info("city"), ref.get_meta_info("city")
    assert meta["select_method"] == "logprobs"
    assert meta["normalized_prompt_logprobs"] == pytest.approx(
        ref_meta["normalized_prompt_logprobs"], abs=1e-4)


def test_openai_completion_regex_needs_extras(lang_server, model_name):
    plain = sgl.OpenAI(model_name, is_chat_model=False, base_url=lang_server.v1,
                       api_key=lang_server.api_key, max_retries=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = CASES_BY_NAME["regex_ip"].program.run(backend=plain, temperature=0)
        state.sync()
    assert any("Regular expression is not supported" in str(w.message) for w in caught)


# --------------------------------------------------------------------------------------
# Without a server
# --------------------------------------------------------------------------------------


def test_openai_missing_sdk_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)
    with pytest.raises(ImportError, match="pip install openai"):
        sgl.OpenAI("gpt-4o-mini")


def test_select_matching_rules():
    from sglbatch.lang.backend.openai_select import _closest_choice, _match_choice, _with_options

    choices = ["yes", "no", "not sure"]
    assert _match_choice("no, it is not", choices) == ("no", "prefix")
    assert _match_choice("Not sure at all", choices) == ("not sure", "prefix_nocase")
    assert _match_choice("I think the answer is yes.", choices) == ("yes", "mention")
    assert _match_choice("I know nothing", choices) == (None, None)  # no whole word
    assert _match_choice(" calculator.", [" calculator", " search engine"])[0] == " calculator"
    assert _closest_choice("nope", ["yes", "nope!"]) == "nope!"
    msgs = _with_options([{"role": "user", "content": "Q?"}], ["a", "b"])
    assert msgs[-1]["content"].startswith("Q?\n\nAnswer with exactly one of")
