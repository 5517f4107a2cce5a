"""SGLang's documented frontend programs, written once for every backend.

Each ``Case`` holds a program (``@sgl.function``), its arguments, greedy run
settings, and ``check(state)``: the assertions a test makes on the finished
state (it returns a dict of what it looked at, handy in failure messages).
``run_case(case, backend)`` runs one; backends that lack a capability skip the
cases whose ``requires`` names it:

- ``"select"``: logprob-based ``sgl.select`` (in-process engine, RuntimeEndpoint)
- ``"regex"``: regex / dtype / json_schema constraints
- ``"completion"``: a raw-text (non-chat) program
- ``"fork"``: ``s.fork``

The answers checked are those of the default model (SmolLM2-135M-Instruct) at
temperature 0; checks stay loose where a different backend might tokenize the
same prompt differently.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sglbatch as sgl

GREEDY = {"temperature": 0}

# --------------------------------------------------------------------------------------
# Programs (SGLang's docs and test programs)
# --------------------------------------------------------------------------------------


@sgl.function
def multi_turn_question(s, question_1, question_2):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(question_1)
    s += sgl.assistant(sgl.gen("answer_1", max_tokens=48))
    s += sgl.user(question_2)
    s += sgl.assistant(sgl.gen("answer_2", max_tokens=48))


@sgl.function
def multi_turn_with_blocks(s, question_1, question_2):
    """The same conversation with ``with s.user():`` blocks."""
    with s.system():
        s += "You are a helpful assistant."
    with s.user():
        s += question_1
    with s.assistant():
        s += sgl.gen("answer_1", max_tokens=48)
    with s.user():
        s += question_2
    with s.assistant():
        s += sgl.gen("answer_2", max_tokens=48)


@sgl.function
def roles_begin_end(s, question):
    s += sgl.system_begin() + "You are a helpful assistant." + sgl.system_end()
    s += sgl.user_begin() + question + sgl.user_end()
    s += sgl.assistant_begin() + sgl.gen("answer", max_tokens=32) + sgl.assistant_end()


@sgl.function
def tool_use(s, question):
    s += "To answer this question: " + question + ". "
    s += "I need to use a " + sgl.gen("tool", choices=["calculator", "search engine"]) + ". "
    if s["tool"] == "calculator":
        s += "The math expression is" + sgl.gen("expression", max_tokens=16, stop="\n")
    elif s["tool"] == "search engine":
        s += "The key word to search is" + sgl.gen("word", max_tokens=16, stop="\n")


CAPITALS = [" Paris", " Berlin", " Rome", " Madrid", " London"]


@sgl.function
def capital_select(s, country, choices_method=sgl.token_length_normalized):
    s += "The capital of " + country + " is"
    s += sgl.select("city", choices=CAPITALS, choices_method=choices_method)
    s += "."


@sgl.function
def tip_suggestion(s):
    s += (
        "Here are two tips for staying healthy: "
        "1. Balanced Diet. 2. Regular Exercise.\n\n"
    )
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f"Now, expand tip {i + 1} into a paragraph:\n"
        f += sgl.gen("detailed_tip", max_tokens=32, stop="\n\n")
    s += "Tip 1:" + forks[0]["detailed_tip"] + "\n"
    s += "Tip 2:" + forks[1]["detailed_tip"] + "\n"
    s += "In summary," + sgl.gen("summary", max_tokens=24)
    forks.join()


IP_REGEX = r"((25[0-5]|2[0-4]\d|[01]?\d\d?)\.){3}(25[0-5]|2[0-4]\d|[01]?\d\d?)"


@sgl.function
def regex_ip(s):
    s += "Q: What is the IP address of the Google DNS servers?\n"
    s += "A: " + sgl.gen("answer", temperature=0, regex=IP_REGEX, max_tokens=24)


# SGLang's documented character regex, with fewer fields (a shorter output).
CHARACTER_REGEX = (
    r"""\{\n"""
    + r"""    "name": "[\w\d\s]{1,16}",\n"""
    + r"""    "house": "(Gryffindor|Slytherin|Ravenclaw|Hufflepuff)",\n"""
    + r"""    "blood status": "(Pure-blood|Half-blood|Muggle-born)",\n"""
    + r"""    "wand": \{\n"""
    + r"""        "length": [0-9]{1,2}\.[0-9]{0,2}\n"""
    + r"""    \},\n"""
    + r"""    "alive": "(Alive|Deceased)"\n"""
    + r"""\}"""
)


@sgl.function
def character_gen(s, name):
    s += name + " is a character in Harry Potter. Please fill in the following information about this character.\n"
    s += sgl.gen("json_output", max_tokens=128, regex=CHARACTER_REGEX)


CITY_SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "population": {"type": "integer", "minimum": 0},
        },
        "required": ["name", "population"],
        "additionalProperties": False,
    }
)


@sgl.function
def city_json_schema(s, city):
    s += sgl.user("Give the name and population of " + city + " as JSON.")
    s += sgl.assistant(sgl.gen("json_output", max_tokens=64, json_schema=CITY_SCHEMA))


@sgl.function
def dtype_gen(s):
    s += "Q: How many hours are in a day?\n"
    s += "A: " + sgl.gen_int("int_res") + "\n"
    s += "Q: What is the value of pi?\n"
    s += "A: " + sgl.gen("float_res", dtype=float) + "\n"
    s += "Q: Is the sky blue?\n"
    s += "A: " + sgl.gen("bool_res", dtype=bool) + "\n"


@sgl.function
def text_qa(s, question):
    s += "Q: " + question + "\n"
    s += "A:" + sgl.gen("answer", stop="\n", max_tokens=24)


@sgl.function
def chat_qa(s, question):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=32))


@sgl.function
def expert_answer(s, question):
    s += "Question: " + question + "\n"
    s += "A good person to answer this question is" + sgl.gen(
        "expert", stop=[".", "\n"], max_tokens=16) + ".\n"
    s += "For example," + s["expert"] + " would answer that " + sgl.gen(
        "answer", stop=".", max_tokens=24) + "."


@sgl.function
def var_scope_tool(s, lhs, rhs):
    s += "Please perform computations using a calculator. "
    s += "You can use calculate(expression) to get the results.\n"
    s += "For example,\ncalculate(1+2)=3\ncalculate(3*4)=12\n"
    s += "Question: What is the product of " + str(lhs) + " and " + str(rhs) + "?\n"
    s += "Answer: The answer is calculate(" + sgl.gen("expression", stop=")", max_tokens=16) + ") = "
    with s.var_scope("answer"):
        s += str(lhs * rhs)


# --------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    program: Any
    kwargs: dict[str, Any]
    check: Callable[[Any], dict[str, Any]]
    requires: frozenset[str] = frozenset()
    run_kwargs: dict[str, Any] = field(default_factory=lambda: dict(GREEDY))


def run_case(case: Case, backend: Any, **overrides):
    """Run ``case`` on ``backend`` and apply its check; returns (state, checked)."""
    state = case.program.run(**case.kwargs, **{**case.run_kwargs, **overrides},
                             backend=backend)
    state.sync()
    return state, case.check(state)


def _roles(state) -> list[str]:
    return [m["role"] for m in state.messages()]


def check_multi_turn(state) -> dict[str, Any]:
    a1, a2 = state["answer_1"], state["answer_2"]
    assert _roles(state) == ["system", "user", "assistant", "user", "assistant"], state.messages()
    assert a1.strip() and a2.strip(), (a1, a2)
    assert state.messages()[2]["content"] == a1.strip()
    assert state.messages()[4]["content"] == a2.strip()
    assert "paris" in a1.lower(), a1
    assert "berlin" in a2.lower(), a2
    # The generated text is part of the prompt of the next turn.
    text = state.text()
    assert text.index(a1) < text.index("And of Germany?") < text.index(a2)
    return {"answer_1": a1, "answer_2": a2}


MULTI_TURN_ARGS = {"question_1": "What is the capital of France?",
                   "question_2": "And of Germany?"}


def check_roles_begin_end(state) -> dict[str, Any]:
    assert _roles(state) == ["system", "user", "assistant"], state.messages()
    assert "paris" in state["answer"].lower(), state["answer"]
    return {"answer": state["answer"]}


def check_tool_use(state) -> dict[str, Any]:
    assert state["tool"] == "calculator", state.text()
    assert "expression" in state and "word" not in state
    meta = state.get_meta_info("tool")
    assert len(meta["normalized_prompt_logprobs"]) == 2
    return {"tool": state["tool"], "expression": state["expression"]}


def check_capital_select(state) -> dict[str, Any]:
    assert state["city"] == " Rome", state.text()
    assert state.text().endswith("is Rome.")
    return {"city": state["city"]}


def check_tip_suggestion(state) -> dict[str, Any]:
    tips = state["detailed_tip"]  # gathered back from the forks by join()
    assert isinstance(tips, list) and len(tips) == 2, tips
    assert all(t.strip() for t in tips), tips
    text = state.text()
    assert "Tip 1:" + tips[0] in text and "Tip 2:" + tips[1] in text
    assert "Now, expand tip" not in text  # the forks' own text stays in the forks
    assert state["summary"].strip()
    return {"tips": tips, "summary": state["summary"]}


def check_regex_ip(state) -> dict[str, Any]:
    answer = state["answer"]
    assert re.fullmatch(IP_REGEX, answer), answer
    return {"answer": answer}


def check_character(state) -> dict[str, Any]:
    out = state["json_output"]
    assert re.fullmatch(CHARACTER_REGEX, out), out
    obj = json.loads(out)
    assert obj["house"] in ("Gryffindor", "Slytherin", "Ravenclaw", "Hufflepuff")
    assert isinstance(obj["wand"]["length"], float)
    return {"json": obj}


def check_city_json(state) -> dict[str, Any]:
    obj = json.loads(state["json_output"])
    assert set(obj) == {"name", "population"}, obj
    assert isinstance(obj["name"], str) and isinstance(obj["population"], int)
    return {"json": obj}


def check_dtype(state) -> dict[str, Any]:
    int(state["int_res"])
    float(state["float_res"])
    assert state["bool_res"] in ("True", "False"), state["bool_res"]
    return {k: state[k] for k in ("int_res", "float_res", "bool_res")}


def check_text_qa(state) -> dict[str, Any]:
    assert "\n" not in state["answer"]
    assert state["answer"].strip()
    return {"answer": state["answer"]}


def check_expert(state) -> dict[str, Any]:
    text = state.text()
    assert "For example," + state["expert"] + " would answer that " in text
    assert state["answer"].strip()
    return {"expert": state["expert"], "answer": state["answer"]}


def check_var_scope(state) -> dict[str, Any]:
    assert state["answer"] == str(257 * 983)
    assert state["expression"].strip()
    return {"expression": state["expression"]}


CASES: list[Case] = [
    Case("multi_turn_question", multi_turn_question, MULTI_TURN_ARGS, check_multi_turn),
    Case("multi_turn_with_blocks", multi_turn_with_blocks, MULTI_TURN_ARGS, check_multi_turn),
    Case("roles_begin_end", roles_begin_end, {"question": "What is the capital of France?"},
         check_roles_begin_end),
    Case("tool_use_select", tool_use, {"question": "What is 37 * 91?"}, check_tool_use,
         frozenset({"select", "completion"})),
    Case("capital_select", capital_select, {"country": "Italy"}, check_capital_select,
         frozenset({"select", "completion"})),
    Case("tip_suggestion_fork", tip_suggestion, {}, check_tip_suggestion,
         frozenset({"fork", "completion"})),
    Case("regex_ip", regex_ip, {}, check_regex_ip, frozenset({"regex", "completion"})),
    Case("json_regex", character_gen, {"name": "Hermione Granger"}, check_character,
         frozenset({"regex", "completion"})),
    Case("json_schema", city_json_schema, {"city": "Paris"}, check_city_json,
         frozenset({"regex"})),
    Case("dtype_gen", dtype_gen, {}, check_dtype, frozenset({"regex", "completion"})),
    Case("text_qa", text_qa, {"question": "What is the capital of France?"}, check_text_qa,
         frozenset({"completion"})),
    Case("expert_answer", expert_answer, {"question": "What is the capital of France?"},
         check_expert, frozenset({"completion"})),
    Case("var_scope", var_scope_tool, {"lhs": 257, "rhs": 983}, check_var_scope,
         frozenset({"completion"})),
]

CASES_BY_NAME = {c.name: c for c in CASES}

TEXT_QA_QUESTIONS = [
    "What is the capital of France?",
    "What is the capital of Japan?",
    "How many legs does a spider have?",
    "What color is the sky?",
    "Who wrote Romeo and Juliet?",
    "What is 2 + 2?",
]


def cases_for(capabilities: frozenset[str] | set) -> list[Case]:
    """The cases a backend with ``capabilities`` can run."""
    return [c for c in CASES if c.requires <= set(capabilities)]


# --------------------------------------------------------------------------------------
# The shared-prefix batch
# --------------------------------------------------------------------------------------


def shared_prefix_document(approx_words: int = 700) -> str:
    """A deterministic ~1k-token document (SmolLM2 tokenizer)."""
    facts = [
        "The river Aldenbrook flows north through the valley of Merrow.",
        "Its water powers three mills built by the Carrow family in 1821.",
        "The eastern bank holds orchards of apples, pears and quince.",
        "Every spring the town of Lisk holds a market on the old stone bridge.",
        "The lighthouse at Penhallow was automated in 1967.",
        "Fishermen there still mend their nets by hand each winter.",
        "A narrow railway once carried slate from the quarries to the port.",
        "The quarries closed when the price of slate fell after the war.",
    ]
    words: list[str] = []
    i = 0
    while len(words) < approx_words:
        words.extend(f"({i}) {facts[i % len(facts)]}".split())
        i += 1
    return " ".join(words)


@sgl.function
def shared_prefix_qa(s, document, question):
    s += "Read the document, then answer the question in a few words.\n\n"
    s += "Document: " + document + "\n\n"
    s += "Question: " + question + "\nAnswer:"
    s += sgl.gen("answer", max_tokens=8, stop="\n")


def shared_prefix_questions(n: int = 64) -> list[str]:
    topics = ["river", "mills", "orchards", "market", "lighthouse", "nets", "railway",
              "quarries"]
    return [f"What does the document say about the {topics[i % len(topics)]}? (#{i})"
            for i in range(n)]
