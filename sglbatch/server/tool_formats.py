"""The tool-call output formats (`--tool-call-parser`), one class each behind one ABC.

A format says where a call may start in plain text (`scan_text`), what ends a call after its
JSON object, what may separate calls, and how calls, tool results and the tools themselves
are written into a prompt for chat templates that take no `tools=`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from sglbatch.server.tool_json_scanner import JSON_WS


@dataclass(frozen=True)
class TextScan:
    """What a format found in pending text: `text[:emit]` is plain text, safe to send. When
    `trigger_end` is set, a call candidate starts at `emit` and its trigger ends there (with
    `brace`, the trigger's last char "{" is the first of the call's JSON). Otherwise the
    rest stays pending, and `boundary` is whether the pending text starts a line."""

    emit: int
    trigger_end: int | None = None
    brace: bool = False
    boundary: bool = True


class ToolCallFormat(ABC):
    name: ClassVar[str]
    close_tag: ClassVar[str | None] = None  # ends a call after its JSON (None: the JSON does)
    separator: ClassVar[str | None] = None  # one character a call may be followed by
    calls_joiner: ClassVar[str]  # between calls written into a prompt

    @abstractmethod
    def scan_text(self, text: str, final: bool, boundary: bool) -> TextScan:
        """Plain text until the first possible call; a possible call's prefix is held."""

    @abstractmethod
    def may_contain_call(self, text: str) -> bool:
        """A cheap check (no validation)."""

    @abstractmethod
    def system_prompt(self, specs: list[dict[str, Any]]) -> str:
        """The tools described as the model's own template would (validated specs)."""

    @abstractmethod
    def call_text(self, name: str, args: Any) -> str:
        """One past call as the model writes it."""

    @abstractmethod
    def tool_result_text(self, content: str) -> str:
        """A tool's result, as user-message text."""


class Qwen25Format(ToolCallFormat):
    """`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks (Qwen2.5,
    Hermes), possibly several, possibly after normal text."""

    name = "qwen25"
    open_tag = "<tool_call>"
    close_tag = "</tool_call>"
    calls_joiner = "\n"

    def scan_text(self, text: str, final: bool, boundary: bool) -> TextScan:
        idx = text.find(self.open_tag)
        if idx >= 0:
            return TextScan(len(text[:idx].rstrip(JSON_WS)), idx + len(self.open_tag))
        if final:
            return TextScan(len(text), boundary=boundary)
        hold = len(text)
        for k in range(min(len(self.open_tag) - 1, len(text)), 0, -1):
            if self.open_tag.startswith(text[-k:]):  # maybe the tag's first characters
                hold = len(text) - k
                break
        return TextScan(len(text[:hold].rstrip(JSON_WS)), boundary=boundary)

    def may_contain_call(self, text: str) -> bool:
        return self.open_tag in text

    def system_prompt(self, specs: list[dict[str, Any]]) -> str:
        lines = "\n".join(json.dumps(_openai_tool_json(s), ensure_ascii=False) for s in specs)
        return (
            "# Tools\n\n"
            "You may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{lines}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments "
            "within <tool_call></tool_call> XML tags:\n"
            "<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n'
            "</tool_call>"
        )

    def call_text(self, name: str, args: Any) -> str:
        return ("<tool_call>\n" + json.dumps({"name": name, "arguments": args},
                                             ensure_ascii=False) + "\n</tool_call>")

    def tool_result_text(self, content: str) -> str:
        return f"<tool_response>\n{content}\n</tool_response>"


class Llama3Format(ToolCallFormat):
    """JSON objects `{"name": ..., "parameters": {...}}` ("arguments" also accepted) at the
    start of a line, optionally after `<|python_tag|>`, separated by `;` or newlines."""

    name = "llama3"
    python_tag = "<|python_tag|>"
    separator = ";"
    calls_joiner = ";"

    def scan_text(self, text: str, final: bool, boundary: bool) -> TextScan:
        ws_start = -1  # where the whitespace before the current char began
        boundary_before_ws = boundary
        for i, ch in enumerate(text):
            if ch in JSON_WS:
                if ws_start < 0:
                    ws_start, boundary_before_ws = i, boundary
                if ch == "\n":
                    boundary = True
                continue
            start = ws_start if ws_start >= 0 else i
            if ch == "<":
                if text.startswith(self.python_tag, i):
                    return TextScan(start, i + len(self.python_tag))
                if not final and self.python_tag.startswith(text[i:]):
                    return TextScan(start, boundary=boundary_before_ws if ws_start >= 0
                                    else boundary)
            elif ch == "{" and boundary:
                return TextScan(start, i + 1, brace=True)
            boundary = False
            ws_start = -1
        if ws_start >= 0 and not final:  # trailing whitespace may precede a call
            return TextScan(ws_start, boundary=boundary_before_ws)
        return TextScan(len(text), boundary=boundary)

    def may_contain_call(self, text: str) -> bool:
        return self.python_tag in text or "{" in text

    def system_prompt(self, specs: list[dict[str, Any]]) -> str:
        blocks = "\n\n".join(json.dumps(_openai_tool_json(s), indent=4, ensure_ascii=False)
                             for s in specs)
        return (
            "You have access to the following functions. To call a function, respond only "
            "with a JSON object for the function call, in the format "
            '{"name": function name, "parameters": dictionary of argument name and its '
            'value}. To call several functions, separate the JSON objects with ";". '
            "Do not use variables. If no function is needed, answer normally.\n\n"
            f"{blocks}"
        )

    def call_text(self, name: str, args: Any) -> str:
        return json.dumps({"name": name, "parameters": args}, ensure_ascii=False)

    def tool_result_text(self, content: str) -> str:
        return f"Function result: {content}"


TOOL_FORMATS: dict[str, ToolCallFormat] = {f.name: f for f in (Llama3Format(), Qwen25Format())}


def get_format(name: str) -> ToolCallFormat:
    """The format for `--tool-call-parser NAME`; ValueError listing the valid names."""
    try:
        return TOOL_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; valid names: "
                         + ", ".join(TOOL_FORMATS)) from None


def _openai_tool_json(spec: dict[str, Any]) -> dict[str, Any]:
    fn: dict[str, Any] = {"name": spec["name"]}
    if spec.get("description"):
        fn["description"] = spec["description"]
    fn["parameters"] = spec["parameters"]
    return {"type": "function", "function": fn}
