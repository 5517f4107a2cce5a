"""`tool_choice`: validated against the tools; "required" or a named function constrain the
output with a JSON schema (`tool_choice_constraint`), whose calls are then read back, streamed
(`ConstrainedToolCallStream`) or whole (`calls_from_constrained_output`). "auto" and "none"
leave the output free ("none": the caller does not parse calls)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sglbatch.server.tool_calls import (
    CallEmitter,
    ToolCall,
    ToolCallDelta,
    tool_names,
    validate_tools,
)
from sglbatch.server.tool_json_scanner import JSON_WS, CallScanner, ScanError


def normalize_tool_choice(tools: Any, tool_choice: Any) -> str | tuple[str, str]:
    """Validate `tool_choice` against `tools`.

    Returns "none", "auto", "required", or ("function", name). Absent (None) means "auto"
    when there are tools and "none" otherwise, as in OpenAI's API.
    """
    specs = validate_tools(tools)
    names = [t["name"] for t in specs]
    if tool_choice is None:
        return "auto" if specs else "none"
    if isinstance(tool_choice, str):
        if tool_choice in ("none", "auto"):
            return tool_choice
        if tool_choice == "required":
            if not specs:
                raise ValueError('tool_choice: "required" needs a non-empty tools list')
            return "required"
        raise ValueError(f"tool_choice: expected \"none\", \"auto\", \"required\" or "
                         f'{{"type": "function", "function": {{"name": ...}}}}, got {tool_choice!r}')
    if isinstance(tool_choice, dict):
        if tool_choice.get("type") != "function":
            raise ValueError("tool_choice.type: must be \"function\", got "
                             f"{tool_choice.get('type')!r}")
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise ValueError("tool_choice.function: missing 'name'")
        if name not in names:
            avail = ", ".join(names) if names else "(no tools given)"
            raise ValueError(f"tool_choice: function {name!r} is not among the tools; "
                             f"available: {avail}")
        return ("function", name)
    raise ValueError(f"tool_choice: expected a string or an object, got "
                     f"{type(tool_choice).__name__}")


def _call_item_schema(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": {"type": "string", "enum": [spec["name"]]},
            "parameters": spec["parameters"],
        },
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }


def tool_choice_constraint(tools: Any, tool_choice: Any,
                           parallel_tool_calls: bool = True) -> str | None:
    """The JSON schema (as a string) that constrains the output for `tool_choice`, or None.

    * "required": an array of one or more `{"name": ..., "parameters": {...}}` objects,
      anyOf over the tools so that the parameters match the chosen name (exactly one
      object when `parallel_tool_calls` is False);
    * `{"type": "function", "function": {"name": f}}`: exactly f's arguments object;
    * "auto", "none" or absent: None (no constraint).
    """
    choice = normalize_tool_choice(tools, tool_choice)
    if choice in ("none", "auto"):
        return None
    specs = validate_tools(tools)
    if choice == "required":
        schema: dict[str, Any] = {
            "type": "array",
            "minItems": 1,
            "items": {"anyOf": [_call_item_schema(s) for s in specs]},
        }
        if not parallel_tool_calls:
            schema["maxItems"] = 1
    else:
        name = choice[1]
        params = next(s["parameters"] for s in specs if s["name"] == name)
        schema = dict(params)
        schema.setdefault("type", "object")
    return json.dumps(schema, ensure_ascii=False)


class ConstrainedToolCallStream(CallEmitter):
    """Streams the calls of an output generated under `tool_choice_constraint`.

    Same interface as ToolCallStreamParser: `feed` / `finish` return
    `(text_delta, tool_call_deltas)`; the text delta is always "" unless the output breaks
    the expected form, in which case the remainder is returned as text. The argument pieces
    concatenate to `calls_from_constrained_output`'s arguments for the same text.
    """

    def __init__(self, tools: Any, tool_choice: Any,
                 id_factory: Callable[[], str] | None = None):
        super().__init__(id_factory)
        choice = normalize_tool_choice(tools, tool_choice)
        if choice in ("none", "auto"):
            raise ValueError(f"tool_choice: {choice!r} has no constrained output")
        self._names = frozenset(tool_names(tools))
        self._named = choice[1] if isinstance(choice, tuple) else None
        # "required": "pre" -> "[" -> items ("item", "sep") -> "end"; named: "args" -> "end"
        self._state = "args" if self._named else "pre"
        self._scanner: CallScanner | None = None
        self._committed = False
        self._args_sent = 0
        self._broken = False
        self._seen_any = False
        self.error: str | None = None

    def feed(self, delta_text: str) -> tuple[str, list[ToolCallDelta]]:
        text = self._consume(delta_text)
        self._flush_open()
        return text, self._take_deltas()

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        if not self._broken and self._state != "end":
            self.error = "output ended before the tool calls were complete"
            self._broken = True
        self._flush_open()
        self._end_call()
        return "", self._take_deltas()

    @property
    def tool_calls(self) -> list[ToolCall]:
        return list(self.calls)

    def _flush_open(self) -> None:
        sc = self._scanner
        if sc is None:
            return
        if not self._committed:
            if self._named:
                self._committed = True
                self._start_call(self._named, "")
            elif sc.name is not None:
                self._committed = True
                self._start_call(sc.name, "")
            else:
                return
        if self._args_sent < len(sc.args):
            self._add_args("".join(sc.args[self._args_sent:]))
            self._args_sent = len(sc.args)

    def _consume(self, s: str) -> str:
        if self._broken:
            return s
        for i, ch in enumerate(s):
            try:
                self._feed_char(ch)
            except ScanError as e:
                self.error = str(e)
                self._broken = True
                self._flush_open()
                self._end_call()
                self._scanner = None
                return s[i:]
        return ""

    def _feed_char(self, ch: str) -> None:
        st = self._state
        if st in ("args", "item"):
            if self._scanner is None:
                if ch in JSON_WS:
                    return
                self._scanner = CallScanner("args" if self._named else "call", self._names)
                self._committed = False
                self._args_sent = 0
            sc = self._scanner
            sc.feed(ch)
            if sc.done:
                self._flush_open()
                if not sc.has_args:
                    self._add_args("{}")
                self._end_call()
                self._scanner = None
                self._seen_any = True
                self._state = "end" if self._named else "sep"
            return
        if ch in JSON_WS:
            return
        if st == "pre":
            if ch != "[":
                raise ScanError("expected '['")
            self._state = "first"
        elif st == "first":
            if ch == "]":
                raise ScanError("empty tool call list")
            self._state = "item"
            self._feed_char(ch)
        elif st == "sep":
            if ch == ",":
                self._state = "item"
            elif ch == "]":
                self._state = "end"
            else:
                raise ScanError("expected ',' or ']'")
        else:  # "end"
            raise ScanError("trailing data after the tool calls")


def calls_from_constrained_output(text: str, tools: Any, tool_choice: Any) -> list[ToolCall]:
    """The calls in an output generated under `tool_choice_constraint(tools, tool_choice)`.

    "required": the output is `[{"name": f, "parameters": {...}}, ...]`; a named function:
    the output is f's arguments object. ValueError if the output is not of that form (e.g.
    cut short by max_tokens) or tool_choice has no constraint ("auto"/"none").
    """
    p = ConstrainedToolCallStream(tools, tool_choice)
    rest, _ = p.feed(text)
    p.finish()
    if p.error is not None:
        raise ValueError(f"constrained tool call output is malformed ({p.error}): {text!r}")
    assert not rest
    return p.tool_calls
