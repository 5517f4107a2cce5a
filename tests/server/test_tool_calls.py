"""Tool-call parsing (llama3, qwen25), streaming deltas and tool_choice constraints."""

from __future__ import annotations

import json

import pytest

from sglbatch.server.tool_calls import ToolCall, ToolCallDelta, get_tool_parser, validate_tools
from sglbatch.server.tool_choice import (
    ConstrainedToolCallStream,
    calls_from_constrained_output,
    normalize_tool_choice,
    tool_choice_constraint,
)
from sglbatch.server.tool_prompts import (
    chat_template_supports_tools,
    prepare_messages,
    tools_system_prompt,
)

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather of a city.",
        "parameters": {"type": "object",
                       "properties": {"city": {"type": "string"},
                                      "unit": {"type": "string", "enum": ["c", "f"]}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add",
        "parameters": {"type": "object",
                       "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                       "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "ping"}},  # no parameters
]

NAMED = {"type": "function", "function": {"name": "add"}}


def qwen(*calls: str, pre: str = "", post: str = "") -> str:
    return pre + "".join(f"<tool_call>\n{c}\n</tool_call>\n" for c in calls) + post


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def stream(parser_name: str, text: str, chunk: int, tools=TOOLS):
    """Feed `text` in chunks; return (text, calls as (id, name, args), all deltas, parser)."""
    p = get_tool_parser(parser_name).stream(tools)
    texts: list[str] = []
    deltas: list[ToolCallDelta] = []
    for i in range(0, len(text), chunk):
        t, d = p.feed(text[i:i + chunk])
        texts.append(t)
        deltas += d
    t, d = p.finish()
    texts.append(t)
    deltas += d
    calls: dict[int, list] = {}
    for d in deltas:
        if d.id is not None:  # first delta of a call
            assert d.index not in calls, "two headers for one call"
            assert d.index == len(calls), "indexes go 0, 1, 2, ..."
            assert d.type == "function" and d.name
            assert d.id.startswith("call_")
            calls[d.index] = [d.id, d.name, d.arguments]
        else:
            assert d.index in calls, "arguments before the header"
            assert d.name is None and d.type is None
            calls[d.index][2] += d.arguments
    return "".join(texts), [tuple(calls[i]) for i in sorted(calls)], deltas, p


def check_stream_equivalence(parser_name: str, text: str, tools=TOOLS):
    normal, calls = get_tool_parser(parser_name).parse(text, tools)
    for chunk in (1, 3, 7, len(text) or 1):
        s_text, s_calls, _, p = stream(parser_name, text, chunk, tools)
        assert s_text == normal, f"chunk={chunk}"
        assert [(n, a) for _, n, a in s_calls] == [(c.name, c.arguments) for c in calls], \
            f"chunk={chunk}"
        # the parser's own record matches what was streamed, ids included
        assert [(c.id, c.name, c.arguments) for c in p.tool_calls] == s_calls
    return normal, calls


# --------------------------------------------------------------------------------------
# parser selection
# --------------------------------------------------------------------------------------


def test_get_tool_parser_names():
    assert get_tool_parser("llama3").name == "llama3"
    assert get_tool_parser("qwen25").name == "qwen25"
    with pytest.raises(ValueError, match=r"unknown tool call parser 'mistral'.*llama3, qwen25"):
        get_tool_parser("mistral")


# --------------------------------------------------------------------------------------
# qwen25, non-streaming
# --------------------------------------------------------------------------------------


def test_qwen_single_call():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    normal, calls = get_tool_parser("qwen25").parse(text, TOOLS)
    assert normal == ""
    assert len(calls) == 1
    assert calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    assert calls[0].arguments == '{"city": "Paris"}'
    assert calls[0].id.startswith("call_") and len(calls[0].id) > 10
    assert calls[0].to_dict() == {"id": calls[0].id, "type": "function",
                                  "function": {"name": "get_weather",
                                               "arguments": '{"city": "Paris"}'}}


def test_qwen_multiple_calls_with_text_before():
    text = qwen('{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}',
                '{"name":"add","arguments":{"a":1,"b":2.5e1}}',
                pre="Let me look that up.\n\n")
    normal, calls = get_tool_parser("qwen25").parse(text, TOOLS)
    assert normal == "Let me look that up."
    assert [c.name for c in calls] == ["get_weather", "add"]
    assert json.loads(calls[0].arguments) == {"city": "Paris", "unit": "c"}
    # whitespace normalized like json.dumps, numbers kept as written
    assert calls[1].arguments == '{"a": 1, "b": 2.5e1}'
    assert len({c.id for c in calls}) == 2


def test_qwen_parameters_key_and_missing_arguments():
    text = qwen('{"name": "add", "parameters": {"a": 1, "b": 2}}', '{"name": "ping"}')
    _, calls = get_tool_parser("qwen25").parse(text, TOOLS)
    assert [(c.name, c.arguments) for c in calls] == [("add", '{"a": 1, "b": 2}'),
                                                      ("ping", "{}")]


def test_qwen_missing_close_tag_at_end_is_still_a_call():
    text = '<tool_call>\n{"name": "ping", "arguments": {}}'
    normal, calls = get_tool_parser("qwen25").parse(text, TOOLS)
    assert normal == "" and [c.name for c in calls] == ["ping"]


def test_qwen_nested_and_escaped_arguments():
    args = {"city": "S\u00e3o Paulo \"quoted\" \\ <tool_call> }{", "unit": None,
            "extra": [1, -2.5, True, False, {"deep": [[], {}]}], "e": "\\u00e9 \u00e9"}
    text = qwen(json.dumps({"name": "get_weather", "arguments": args}, ensure_ascii=False))
    normal, calls = check_stream_equivalence("qwen25", text)
    assert normal == ""
    assert json.loads(calls[0].arguments) == args
    # escaped form survives too
    text = qwen(json.dumps({"name": "get_weather", "arguments": args}, ensure_ascii=True))
    _, calls = check_stream_equivalence("qwen25", text)
    assert json.loads(calls[0].arguments) == args


def test_qwen_invalid_json_stays_text():
    for bad in ('{"name": "add", "arguments": {"a": 1,}}',  # trailing comma
                '{"name": "add", "arguments": {"a": 01}}',  # leading zero
                '{"name": "add", "arguments": "a=1"}',  # arguments not an object
                '{"name": "add" "arguments": {}}',  # missing comma
                '{"name": "add", "arguments": {}} trailing',
                "not json at all",
                '{"arguments": {"a": 1}}'):  # no name
        text = qwen(bad, pre="Hi ")
        normal, calls = get_tool_parser("qwen25").parse(text, TOOLS)
        assert calls == [], bad
        assert normal == text, bad


def test_qwen_truncated_call_stays_text():
    text = 'Hmm <tool_call>\n{"name": "add", "arguments": {"a": 1'
    normal, calls = get_tool_parser("qwen25").parse(text, TOOLS)
    assert calls == [] and normal == text


def test_qwen_unknown_function_ignored():
    good = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
    bad = '{"name": "rm_rf", "arguments": {"path": "/"}}'
    text = qwen(bad, good)
    normal, calls = check_stream_equivalence("qwen25", text)
    assert [c.name for c in calls] == ["add"]
    assert normal == f"<tool_call>\n{bad}\n</tool_call>"


def test_qwen_no_tools_means_no_calls():
    text = qwen('{"name": "add", "arguments": {}}')
    for tools in (None, []):
        normal, calls = get_tool_parser("qwen25").parse(text, tools)
        assert calls == [] and normal == text


def test_plain_text_untouched():
    for name in ("qwen25", "llama3"):
        for text in ("", "Hello, world!", "a < b and c > d; x{y}z\n  \n", "<tool", "<|python",
                     "Use {braces} and <|tags|> freely.\nOK"):
            normal, calls = check_stream_equivalence(name, text)
            assert calls == [] and normal == text, (name, text)


# --------------------------------------------------------------------------------------
# llama3, non-streaming
# --------------------------------------------------------------------------------------


def test_llama3_single_call_plain_json():
    text = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    normal, calls = get_tool_parser("llama3").parse(text, TOOLS)
    assert normal == ""
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Paris"}')]


def test_llama3_python_tag_and_arguments_key():
    text = '<|python_tag|>{"name": "add", "arguments": {"a": 1, "b": 2}}'
    normal, calls = get_tool_parser("llama3").parse(text, TOOLS)
    assert normal == ""
    assert [(c.name, c.arguments) for c in calls] == [("add", '{"a": 1, "b": 2}')]


def test_llama3_multiple_calls_semicolon_and_newline():
    text = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
            '{"parameters": {"a": 1, "b": 2}, "name": "add"}\n'
            '{"type": "function", "name": "ping", "parameters": {}}')
    normal, calls = check_stream_equivalence("llama3", text)
    assert normal == ""
    assert [(c.name, c.arguments) for c in calls] == [
        ("get_weather", '{"city": "Paris"}'), ("add", '{"a": 1, "b": 2}'), ("ping", "{}")]


def test_llama3_text_before_call():
    text = 'Let me check.\n{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    normal, calls = check_stream_equivalence("llama3", text)
    assert normal == "Let me check."
    assert [c.name for c in calls] == ["get_weather"]
    text = 'Checking<|python_tag|>{"name": "ping", "parameters": {}}'
    normal, calls = check_stream_equivalence("llama3", text)
    assert normal == "Checking" and [c.name for c in calls] == ["ping"]


def test_llama3_brace_inside_a_line_is_text():
    text = 'The object {"name": "ping", "parameters": {}} is an example.'
    normal, calls = check_stream_equivalence("llama3", text)
    assert calls == [] and normal == text


def test_llama3_invalid_json_stays_text():
    for bad in ('{"name": "add", "parameters": {"a": 1,}}',
                '{"name": "add", "parameters": [1, 2]}',
                '{"name": "add", "parameters": {"a": tru}}',
                "{not json}",
                '{"answer": 42}',  # a JSON answer, not a call
                '<|python_tag|>print("hi")'):
        normal, calls = get_tool_parser("llama3").parse(bad, TOOLS)
        assert calls == [] and normal == bad, bad


def test_llama3_unknown_function_ignored():
    text = ('{"name": "unknown", "parameters": {"x": 1}}\n'
            '{"name": "add", "parameters": {"a": 1, "b": 2}}')
    normal, calls = check_stream_equivalence("llama3", text)
    assert normal == '{"name": "unknown", "parameters": {"x": 1}}'
    assert [c.name for c in calls] == ["add"]


def test_llama3_text_after_call():
    text = '{"name": "ping", "parameters": {}};  Done.'
    normal, calls = check_stream_equivalence("llama3", text)
    assert normal == "Done." and [c.name for c in calls] == ["ping"]


# --------------------------------------------------------------------------------------
# streaming
# --------------------------------------------------------------------------------------

STREAM_CASES = [
    ("qwen25", qwen('{"name": "get_weather", "arguments": {"city": "Paris"}}')),
    ("qwen25", qwen('{"name": "get_weather", "arguments": {"city": "Paris", "unit": "f"}}',
                    '{"name": "add", "arguments": {"a": 1.25, "b": -3e-2}}',
                    pre="Sure! I'll call two tools.\n")),
    ("qwen25", qwen('{"arguments": {"a": 1, "b": 2}, "name": "add"}', '{"name": "ping"}')),
    ("qwen25", qwen('  {\n  "name" : "add",\n  "arguments" : { "a" : 1 , "b" : [ 2 , 3 ] }\n}')),
    ("qwen25", qwen('{"name": "nope", "arguments": {}}', '{"name": "ping", "arguments": {}}',
                    pre="x <tool_ca", post="tail <tool")),
    ("qwen25", "Just text with a <tag> and <tool_cal> near misses.\n"),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}'),
    ("llama3", ('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}};'
                '{"name": "get_weather", "parameters": {"city": "Rome", "unit": "c"}}')),
    ("llama3", ('Intro line\n\n  {"name": "ping", "parameters": {}}\n'
                '{"name": "add", "arguments": {"a": 0.5, "b": 2}}  ')),
    ("llama3", '{"parameters": {"city": "Lima"}, "name": "get_weather"}; trailing words'),
    ("llama3", 'a <|python_ta b {"x": 1}\n{"name": "zzz", "parameters": {}}'),
]


@pytest.mark.parametrize("name,text", STREAM_CASES)
def test_streaming_equals_non_streaming(name, text):
    check_stream_equivalence(name, text)


def test_streaming_delta_shape():
    text = qwen('{"name": "add", "arguments": {"a": 1, "b": 2}}',
                '{"name": "ping", "arguments": {}}', pre="Hi")
    s_text, calls, deltas, _ = stream("qwen25", text, 3)
    assert s_text == "Hi"
    first = deltas[0].to_dict()
    assert set(first) == {"index", "id", "type", "function"}
    assert first["index"] == 0 and first["type"] == "function"
    assert first["function"]["name"] == "add"
    later = [d.to_dict() for d in deltas[1:] if d.index == 0]
    assert later and all(set(d) == {"index", "function"} for d in later)
    assert all(set(d["function"]) == {"arguments"} for d in later)
    # arguments really stream: several pieces for the first call
    assert len(later) > 2
    assert [c[1] for c in calls] == ["add", "ping"]
    assert calls[0][2] == '{"a": 1, "b": 2}' and calls[1][2] == "{}"


def test_streaming_holds_back_possible_call_start():
    p = get_tool_parser("qwen25").stream(TOOLS)
    assert p.feed("Hello <tool_") == ("Hello", [])
    assert p.feed("x") == (" <tool_x", [])
    p = get_tool_parser("llama3").stream(TOOLS)
    assert p.feed("Hi\n") == ("Hi", [])
    text, deltas = p.feed('{"name": "ping"')
    assert text == "" and deltas[0].name == "ping"  # header sent once the name is known
    text, deltas = p.feed(', "parameters": {"')
    assert text == "" and deltas == [ToolCallDelta(index=0, arguments='{"')]
    # inside a string a brace is just content
    assert p.feed("}") == ("", [ToolCallDelta(index=0, arguments="}")])
    text, deltas = p.finish()
    # truncated after the header: the stream already committed to the call
    assert text == "" and deltas == []


def test_streaming_truncated_text_only_flushes_on_finish():
    p = get_tool_parser("llama3").stream(TOOLS)
    assert p.feed('{"na') == ("", [])
    assert p.feed('me": "zz') == ("", [])
    assert p.feed('z", "parameters": {}}') == ('{"name": "zzz", "parameters": {}}', [])
    p = get_tool_parser("llama3").stream(TOOLS)
    assert p.feed('{"answer"') == ('{"answer"', [])  # only known keys: clear at once
    p = get_tool_parser("llama3").stream(TOOLS)
    assert p.feed("  <|python") == ("", [])
    assert p.finish() == ("  <|python", [])


def test_streaming_random_chunking_property():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    fragments = {
        "qwen25": ["Hello ", "\n", " ", "<", "tool", "<tool_call>", "</tool_call>", "{", "}", '"',
                   qwen('{"name": "add", "arguments": {"a": 1, "b": [2, {"c": "d"}]}}'),
                   qwen('{"name": "ping"}'),
                   qwen('{"name": "unknown", "arguments": {}}'),
                   qwen('{"bad": 1}')],
        "llama3": ["Hello ", "\n", " ", ";", "<|python_tag|>", "<|py", "{", "}", '"', "x",
                   '{"name": "add", "parameters": {"a": 1, "b": {"c": [true, null]}}}',
                   '<|python_tag|>{"name": "ping", "parameters": {}}',
                   '{"name": "unknown", "parameters": {}}',
                   '{"bad": 1}'],
    }

    @hypothesis.settings(max_examples=150, deadline=None, derandomize=True)
    @hypothesis.given(st.sampled_from(["qwen25", "llama3"]), st.data())
    def run(name, data):
        parts = data.draw(st.lists(st.sampled_from(fragments[name]), max_size=8))
        text = "".join(parts)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=10)))
        normal, calls = get_tool_parser(name).parse(text, TOOLS)
        p = get_tool_parser(name).stream(TOOLS)
        out, args, names = [], {}, {}
        prev = 0
        for c in cuts + [len(text)]:
            t, ds = p.feed(text[prev:c])
            prev = c
            out.append(t)
            for d in ds:
                if d.name is not None:
                    names[d.index] = d.name
                args[d.index] = args.get(d.index, "") + d.arguments
        t, ds = p.finish()
        out.append(t)
        for d in ds:
            args[d.index] = args.get(d.index, "") + d.arguments
        assert "".join(out) == normal
        assert [(names[i], args[i]) for i in sorted(names)] == \
               [(c.name, c.arguments) for c in calls]

    run()


# --------------------------------------------------------------------------------------
# tools validation and tool_choice
# --------------------------------------------------------------------------------------


def test_validate_tools_errors():
    with pytest.raises(ValueError, match=r"tools\[1\]: missing 'function'"):
        validate_tools([TOOLS[0], {"type": "function"}])
    with pytest.raises(ValueError, match=r"tools\[0\]\.function: missing 'name'"):
        validate_tools([{"type": "function", "function": {"parameters": {}}}])
    with pytest.raises(ValueError, match=r"tools\[0\]: missing 'type'"):
        validate_tools([{"function": {"name": "f"}}])
    with pytest.raises(ValueError, match=r"tools\[0\]\.type: must be \"function\""):
        validate_tools([{"type": "code", "function": {"name": "f"}}])
    with pytest.raises(ValueError, match=r"tools\[0\]: expected an object"):
        validate_tools(["f"])
    with pytest.raises(ValueError, match=r"tools\[2\]\.function\.parameters: must be a JSON schema"):
        validate_tools(TOOLS[:2] + [{"type": "function",
                                     "function": {"name": "g", "parameters": "x"}}])
    with pytest.raises(ValueError, match=r"tools\[1\]\.function\.name: duplicate"):
        validate_tools([TOOLS[0], TOOLS[0]])
    with pytest.raises(ValueError, match=r"tools: expected a list"):
        validate_tools({"type": "function"})
    # the parsers validate too
    with pytest.raises(ValueError, match=r"tools\[0\]"):
        get_tool_parser("qwen25").parse("x", [{"type": "function", "function": {}}])


def test_tool_choice_errors():
    with pytest.raises(ValueError, match=r"tool_choice.*'nope'.*available: get_weather, add, ping"):
        tool_choice_constraint(TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValueError, match=r"tool_choice"):
        tool_choice_constraint(TOOLS, "sometimes")
    with pytest.raises(ValueError, match=r"tool_choice\.function: missing 'name'"):
        tool_choice_constraint(TOOLS, {"type": "function", "function": {}})
    with pytest.raises(ValueError, match=r"tool_choice.*required.*tools"):
        tool_choice_constraint([], "required")
    with pytest.raises(ValueError, match=r"tools\[0\].*missing 'name'"):
        tool_choice_constraint([{"type": "function", "function": {}}], "required")


def test_tool_choice_no_constraint():
    for choice in (None, "auto", "none"):
        assert tool_choice_constraint(TOOLS, choice) is None
    assert tool_choice_constraint(None, None) is None
    assert normalize_tool_choice(TOOLS, None) == "auto"
    assert normalize_tool_choice(None, None) == "none"
    assert normalize_tool_choice(TOOLS, NAMED) == ("function", "add")


def test_required_schema_validates_sample_outputs():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(tool_choice_constraint(TOOLS, "required"))
    jsonschema.Draft202012Validator.check_schema(schema)
    good = [
        [{"name": "get_weather", "parameters": {"city": "Paris"}}],
        [{"name": "add", "parameters": {"a": 1, "b": 2}},
         {"name": "ping", "parameters": {}}],
    ]
    for out in good:
        jsonschema.validate(out, schema)
    bad = [
        [],  # at least one call
        {"name": "ping", "parameters": {}},  # not an array
        [{"name": "nope", "parameters": {}}],  # unknown name
        [{"name": "add", "parameters": {"city": "Paris"}}],  # add's parameters required
        [{"name": "get_weather", "parameters": {"a": 1, "b": 2}}],  # city missing
        [{"name": "get_weather"}],  # no parameters
        [{"name": "get_weather", "parameters": {"city": "X", "unit": "k"}}],  # bad enum
    ]
    for out in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(out, schema)
    single = json.loads(tool_choice_constraint(TOOLS, "required", parallel_tool_calls=False))
    jsonschema.validate(good[0], single)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(good[1], single)
    calls = calls_from_constrained_output(json.dumps(good[1]), TOOLS, "required")
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("add", {"a": 1, "b": 2}), ("ping", {})]


def test_named_schema_validates_sample_outputs():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(tool_choice_constraint(TOOLS, NAMED))
    assert schema == TOOLS[1]["function"]["parameters"]
    jsonschema.validate({"a": 1, "b": 2}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"a": 1}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "add", "parameters": {"a": 1, "b": 2}}], schema)
    calls = calls_from_constrained_output('{"a":1, "b" :2}', TOOLS, NAMED)
    assert [(c.name, c.arguments) for c in calls] == [("add", '{"a": 1, "b": 2}')]
    # a function without parameters: any object
    schema = json.loads(tool_choice_constraint(
        TOOLS, {"type": "function", "function": {"name": "ping"}}))
    jsonschema.validate({}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate("x", schema)


def test_constraints_compile_with_xgrammar():
    xgr = pytest.importorskip("xgrammar")
    for choice in ("required", NAMED, {"type": "function", "function": {"name": "ping"}}):
        xgr.Grammar.from_json_schema(tool_choice_constraint(TOOLS, choice))


def test_calls_from_constrained_output_errors():
    with pytest.raises(ValueError, match="malformed"):
        calls_from_constrained_output('[{"name": "add", "parameters": {"a": 1', TOOLS, "required")
    with pytest.raises(ValueError, match="malformed"):
        calls_from_constrained_output("[]", TOOLS, "required")
    with pytest.raises(ValueError, match="malformed"):
        calls_from_constrained_output('[{"name": "nope", "parameters": {}}]', TOOLS, "required")
    with pytest.raises(ValueError, match="malformed"):
        calls_from_constrained_output('{"a": 1} {"b": 2}', TOOLS, NAMED)
    with pytest.raises(ValueError, match="no constrained output"):
        calls_from_constrained_output("{}", TOOLS, "auto")


@pytest.mark.parametrize("choice,text", [
    ("required", (' [ {"name": "add", "parameters": {"a": 1, "b": 2}} ,\n'
                  '{"parameters": {}, "name": "ping"}] ')),
    (NAMED, '{"a": 1.5, "b": [1, {"x": "y"}]}'),
])
def test_constrained_streaming_equivalence(choice, text):
    calls = calls_from_constrained_output(text, TOOLS, choice)
    for chunk in (1, 3, 7):
        p = ConstrainedToolCallStream(TOOLS, choice)
        got: dict[int, list] = {}
        for i in range(0, len(text) + 1, chunk):
            t, ds = p.feed(text[i:i + chunk])
            assert t == ""
            for d in ds:
                if d.id is not None:
                    got[d.index] = [d.name, d.arguments]
                else:
                    got[d.index][1] += d.arguments
        t, ds = p.finish()
        assert t == "" and p.error is None
        for d in ds:
            got[d.index][1] += d.arguments
        assert [tuple(got[i]) for i in sorted(got)] == [(c.name, c.arguments) for c in calls]


# --------------------------------------------------------------------------------------
# prompt side
# --------------------------------------------------------------------------------------


def test_tools_system_prompt():
    q = tools_system_prompt(TOOLS, "qwen25")
    assert "<tools>" in q and "<tool_call>" in q and '"name": "get_weather"' in q
    l3 = tools_system_prompt(TOOLS, "llama3")
    assert '"parameters"' in l3 and '"add"' in l3
    assert tools_system_prompt([], "qwen25") == ""
    with pytest.raises(ValueError, match="valid names: llama3, qwen25"):
        tools_system_prompt(TOOLS, "foo")


def test_prepare_messages():
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    ]
    with_tools = prepare_messages(msgs, TOOLS, "qwen25", template_supports_tools=True)
    assert with_tools[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert msgs[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # untouched
    plain = prepare_messages(msgs, TOOLS, "qwen25", template_supports_tools=False)
    assert [m["role"] for m in plain] == ["system", "user", "assistant", "user"]
    assert plain[0]["content"].startswith("Be brief.\n\n# Tools")
    # the assistant turn is rendered in the parser's own format, so it parses back
    normal, calls = get_tool_parser("qwen25").parse(plain[2]["content"], TOOLS)
    assert normal == "" and [(c.name, c.arguments) for c in calls] == [
        ("get_weather", '{"city": "Paris"}')]
    assert "18C" in plain[3]["content"]
    plain = prepare_messages(msgs[1:], TOOLS, "llama3", template_supports_tools=False)
    assert plain[0]["role"] == "system" and '"parameters"' in plain[0]["content"]
    _, calls = get_tool_parser("llama3").parse(plain[2]["content"], TOOLS)
    assert [c.name for c in calls] == ["get_weather"]
    assert chat_template_supports_tools("{% if tools %}...{% endif %}")
    assert not chat_template_supports_tools(None)


def test_toolcall_dataclasses():
    c = ToolCall(name="f", arguments="{}")
    assert c.type == "function" and c.id.startswith("call_")
    d = ToolCallDelta(index=1, arguments='{"a"')
    assert d.to_dict() == {"index": 1, "function": {"arguments": '{"a"'}}
