"""Tool calling for the OpenAI chat API: output parsers, streaming deltas and `tool_choice`.

Pure Python, no engine or server. It follows SGLang's semantics:

* `--tool-call-parser llama3`: the model answers with JSON objects
  `{"name": ..., "parameters": {...}}` ("arguments" also accepted), optionally after
  `<|python_tag|>`, several separated by `;` or newlines.
* `--tool-call-parser qwen25`: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
  blocks (Qwen2.5 / Hermes), possibly several, possibly after normal text.
* `tool_choice="required"` or a named function: the output is constrained by a JSON schema
  (`tool_choice_constraint`) and then turned into calls (`calls_from_constrained_output`);
  "auto" and "none" leave the output free ("none": the caller does not parse calls).

Non-streaming and streaming share one scanner, so for any output the streamed text deltas
concatenate to the non-streaming `normal_text` and each call's streamed argument pieces
concatenate to its non-streaming `arguments`. (The one exception is inherent to streaming:
a call whose header was already sent and that then turns out malformed or truncated; the
non-streaming parse gives such text back as normal text.)

`arguments` is the model's JSON object with the whitespace between tokens normalized to
`json.dumps` style (`", "` and `": "`); strings and numbers are kept exactly as written.

A call counts only if it is well-formed JSON, names a function in `tools` and its arguments
are an object (absent arguments mean `{}`); anything else stays normal text. Whitespace
around a call (and a `;` separator after a llama3 call) is consumed by the call.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "TOOL_PARSER_NAMES",
    "ConstrainedToolCallStream",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallParser",
    "ToolCallStreamParser",
    "calls_from_constrained_output",
    "chat_template_supports_tools",
    "get_tool_parser",
    "new_call_id",
    "normalize_tool_choice",
    "prepare_messages",
    "tool_choice_constraint",
    "tools_system_prompt",
    "validate_tools",
]

_WS = " \t\n\r"  # JSON whitespace


def new_call_id() -> str:
    """An OpenAI-style tool call id: "call_" + 24 random hex digits."""
    return "call_" + uuid.uuid4().hex[:24]


# --------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------


@dataclass
class ToolCall:
    """One complete function call, as in a non-streaming chat completion message."""

    name: str
    arguments: str  # a JSON object, as a string (OpenAI's `function.arguments`)
    id: str = field(default_factory=new_call_id)
    type: str = "function"

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI `message.tool_calls[i]` object."""
        return {"id": self.id, "type": self.type,
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolCallDelta:
    """One piece of a streamed call, as in `choices[0].delta.tool_calls[i]`.

    The first delta of a call has `id`, `type` and `name` set (and possibly some
    `arguments`); later ones carry only `index` and more `arguments`.
    """

    index: int
    id: str | None = None
    type: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI streaming object; fields that are None are left out."""
        d: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            d["id"] = self.id
        if self.type is not None:
            d["type"] = self.type
        fn: dict[str, Any] = {}
        if self.name is not None:
            fn["name"] = self.name
        fn["arguments"] = self.arguments
        d["function"] = fn
        return d


# --------------------------------------------------------------------------------------
# Tools validation
# --------------------------------------------------------------------------------------

_EMPTY_PARAMS = {"type": "object", "properties": {}}


def validate_tools(tools: Any) -> list[dict[str, Any]]:
    """Check an OpenAI `tools` list; return it as `[{"name", "description", "parameters"}]`.

    None or [] gives []. A malformed entry raises ValueError naming `tools[i]` and what is
    wrong. Missing or empty `parameters` becomes `{"type": "object", "properties": {}}`.
    """
    if tools is None:
        return []
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"tools: expected a list of tools, got {type(tools).__name__}")  # noqa: TRY004
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise ValueError(  # noqa: TRY004
                f"{where}: expected an object "
                f'{{"type": "function", "function": {{...}}}}, got {type(tool).__name__}')
        if "type" not in tool:
            raise ValueError(f"{where}: missing 'type' (must be \"function\")")
        if tool["type"] != "function":
            raise ValueError(f"{where}.type: must be \"function\", got {tool['type']!r}")
        fn = tool.get("function")
        if fn is None:
            raise ValueError(f"{where}: missing 'function'")
        if not isinstance(fn, dict):
            raise ValueError(f"{where}.function: expected an object, got {type(fn).__name__}")  # noqa: TRY004
        name = fn.get("name")
        if name is None:
            raise ValueError(f"{where}.function: missing 'name'")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}.function.name: must be a non-empty string, got {name!r}")
        if name in seen:
            raise ValueError(f"{where}.function.name: duplicate function name {name!r}")
        seen.add(name)
        params = fn.get("parameters")
        if params is None or params == {}:
            params = dict(_EMPTY_PARAMS)
        elif not isinstance(params, dict):
            raise ValueError(f"{where}.function.parameters: must be a JSON schema object, "
                             f"got {type(params).__name__}")
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ValueError(f"{where}.function.description: must be a string")
        out.append({"name": name, "description": desc, "parameters": params})
    return out


def _tool_names(tools: Any) -> list[str]:
    return [t["name"] for t in validate_tools(tools)]


# --------------------------------------------------------------------------------------
# Incremental JSON scanner for one call object (or one bare arguments object)
# --------------------------------------------------------------------------------------

# Structural states.
_VALUE, _KEY_OR_END, _KEY, _COLON, _AFTER_VALUE, _VALUE_OR_END = range(6)
# Lexical states.
_STRING, _ESC, _UHEX, _LITERAL = range(10, 14)
_NUM_MINUS, _NUM_ZERO, _NUM_INT, _NUM_DOT, _NUM_FRAC, _NUM_E, _NUM_ESIGN, _NUM_EXP = range(20, 28)
_NUM_END_OK = (_NUM_ZERO, _NUM_INT, _NUM_FRAC, _NUM_EXP)

_NAME_KEYS = ("name",)
_ARGS_KEYS = ("parameters", "arguments")
_IGNORED_KEYS = ("type",)


class _ScanError(Exception):
    pass


class _CallScanner:
    """Validates, one character at a time, a JSON object that is either

    * mode "call": `{"name": str, "parameters"|"arguments": {...}, ["type": any]}` (in any key
      order; other keys are an error), or
    * mode "args": a bare arguments object `{...}`,

    collecting the function name and the arguments object normalized (whitespace between
    tokens dropped, "," -> ", ", ":" -> ": ", everything else verbatim) in `self.args`.
    """

    def __init__(self, mode: str, valid_names: set[str] | frozenset[str]):
        self.mode = mode
        self.valid_names = valid_names
        self.stack: list[str] = []
        self.state = _VALUE
        self.done = False
        self.name: str | None = None
        self.args: list[str] = []
        self.has_args = False
        self._capture = mode == "args"  # writing to self.args
        self._seen: set[str] = set()
        self._cur_key: str | None = None
        self._collect: list[str] | None = None  # raw chars of a call-object key / the name
        self._str_is_key = False
        self._lit = ""  # remaining letters of true/false/null
        self._uhex = 0

    # -- helpers -------------------------------------------------------------------------

    def _out(self, s: str) -> None:
        if self._capture:
            self.args.append(s)

    def _value_done(self) -> None:
        self.state = _AFTER_VALUE if self.stack else _VALUE
        if not self.stack:
            self.done = True

    def _open(self, ch: str) -> None:
        depth = len(self.stack)
        if depth == 0 and ch != "{":
            raise _ScanError("expected an object")
        if self.mode == "call" and depth == 1:
            key = self._cur_key
            if key in _NAME_KEYS:
                raise _ScanError("name must be a string")
            if key in _ARGS_KEYS:
                if ch != "{":
                    raise _ScanError("arguments must be an object")
                self._capture = True
        self._out(ch)
        self.stack.append(ch)
        self.state = _KEY_OR_END if ch == "{" else _VALUE_OR_END

    def _close(self, ch: str) -> None:
        if not self.stack or {"{": "}", "[": "]"}[self.stack[-1]] != ch:
            raise _ScanError(f"unexpected {ch!r}")
        self._out(ch)
        self.stack.pop()
        depth = len(self.stack)
        if self.mode == "call":
            if depth == 1 and self._capture:  # closed the arguments object
                self._capture = False
                self.has_args = True
            elif depth == 0 and self.name is None:
                raise _ScanError("missing name")
        elif depth == 0:
            self._capture = False
            self.has_args = True
        self._value_done()

    def _start_scalar(self, ch: str) -> None:
        """First char of a string/number/literal value."""
        depth = len(self.stack)
        if depth == 0:
            raise _ScanError("expected an object")
        if self.mode == "call" and depth == 1:
            key = self._cur_key
            if key in _ARGS_KEYS:
                raise _ScanError("arguments must be an object")
            if key in _NAME_KEYS:
                if ch != '"':
                    raise _ScanError("name must be a string")
                self._collect = []
        if ch == '"':
            self._out(ch)
            self.state = _STRING
        elif ch == "-" or ch.isdigit() and ch.isascii():
            self._out(ch)
            self.state = _NUM_MINUS if ch == "-" else (_NUM_ZERO if ch == "0" else _NUM_INT)
        elif ch in "tfn":
            self._out(ch)
            self._lit = {"t": "rue", "f": "alse", "n": "ull"}[ch]
            self.state = _LITERAL
        else:
            raise _ScanError(f"unexpected {ch!r}")

    def _end_string(self) -> None:
        is_key, self._str_is_key = self._str_is_key, False
        if self._collect is not None:
            raw = "".join(self._collect)
            self._collect = None
            try:
                text = json.loads('"' + raw + '"')
            except json.JSONDecodeError as e:  # pragma: no cover - the scanner validated it
                raise _ScanError(str(e)) from None
            if is_key:  # a key of the call object
                slot = "args" if text in _ARGS_KEYS else "name" if text in _NAME_KEYS else text
                if text not in _ARGS_KEYS + _NAME_KEYS + _IGNORED_KEYS:
                    raise _ScanError(f"unexpected key {text!r}")
                if slot in self._seen:
                    raise _ScanError(f"duplicate key {text!r}")
                self._seen.add(slot)
                self._cur_key = text
            else:  # the function name
                if text not in self.valid_names:
                    raise _ScanError(f"unknown function {text!r}")
                self.name = text
        if is_key:
            self.state = _COLON
        else:
            self._value_done()

    # -- main entry ------------------------------------------------------------------------

    def feed(self, ch: str) -> None:
        """Consume one character; raises _ScanError when the text cannot be such an object."""
        if self.done:
            raise _ScanError("trailing data")
        st = self.state
        if st == _STRING:
            if ch == '"':
                self._out(ch)
                self._end_string()
            elif ch == "\\":
                self._out(ch)
                if self._collect is not None:
                    self._collect.append(ch)
                self.state = _ESC
            elif ch < " ":
                raise _ScanError("control character in string")
            else:
                self._out(ch)
                if self._collect is not None:
                    self._collect.append(ch)
            return
        if st == _ESC:
            if ch == "u":
                self._uhex = 4
                self.state = _UHEX
            elif ch in '"\\/bfnrt':
                self.state = _STRING
            else:
                raise _ScanError("bad escape")
            self._out(ch)
            if self._collect is not None:
                self._collect.append(ch)
            return
        if st == _UHEX:
            if ch not in "0123456789abcdefABCDEF":
                raise _ScanError("bad \\u escape")
            self._out(ch)
            if self._collect is not None:
                self._collect.append(ch)
            self._uhex -= 1
            if self._uhex == 0:
                self.state = _STRING
            return
        if st == _LITERAL:
            if ch != self._lit[0]:
                raise _ScanError("bad literal")
            self._out(ch)
            self._lit = self._lit[1:]
            if not self._lit:
                self._value_done()
            return
        if st >= _NUM_MINUS:
            if self._feed_number(st, ch):
                return
            # the number ended before `ch`; `ch` is handled as structure below
            self._value_done()
            st = self.state
        # structural states: whitespace is skipped (and not written)
        if ch in _WS:
            return
        if st == _VALUE or st == _VALUE_OR_END:
            if st == _VALUE_OR_END and ch == "]":
                self._close(ch)
            elif ch in "{[":
                self._open(ch)
            else:
                self._start_scalar(ch)
        elif st == _KEY_OR_END or st == _KEY:
            if ch == "}" and st == _KEY_OR_END:
                self._close(ch)
            elif ch == '"':
                self._out(ch)
                if self.mode == "call" and len(self.stack) == 1:
                    self._collect = []
                self._str_is_key = True
                self.state = _STRING
            else:
                raise _ScanError("expected a key")
        elif st == _COLON:
            if ch != ":":
                raise _ScanError("expected ':'")
            self._out(": ")
            self.state = _VALUE
        elif st == _AFTER_VALUE:
            if ch == ",":
                self._out(", ")
                self.state = _KEY if self.stack[-1] == "{" else _VALUE
            elif ch in "}]":
                self._close(ch)
            else:
                raise _ScanError("expected ',' or a closing bracket")
        else:  # pragma: no cover - unreachable
            raise _ScanError("bad state")

    def _feed_number(self, st: int, ch: str) -> bool:
        """Advance a number; False when `ch` is not part of it (and the number may end)."""
        digit = "0" <= ch <= "9"
        nxt = None
        if st == _NUM_MINUS:
            nxt = (_NUM_ZERO if ch == "0" else _NUM_INT) if digit else None
        elif st == _NUM_ZERO:
            nxt = _NUM_DOT if ch == "." else _NUM_E if ch in "eE" else None
            if nxt is None and digit:
                raise _ScanError("leading zero")
        elif st == _NUM_INT:
            nxt = _NUM_INT if digit else _NUM_DOT if ch == "." else _NUM_E if ch in "eE" else None
        elif st == _NUM_DOT:
            nxt = _NUM_FRAC if digit else None
        elif st == _NUM_FRAC:
            nxt = _NUM_FRAC if digit else _NUM_E if ch in "eE" else None
        elif st == _NUM_E:
            nxt = _NUM_EXP if digit else _NUM_ESIGN if ch in "+-" else None
        elif st in (_NUM_ESIGN, _NUM_EXP):
            nxt = _NUM_EXP if digit else None
        if nxt is not None:
            self._out(ch)
            self.state = nxt
            return True
        if st not in _NUM_END_OK:
            raise _ScanError("bad number")
        return False

    def arguments(self) -> str:
        return "".join(self.args) if self.has_args else "{}"


# --------------------------------------------------------------------------------------
# Streaming machinery shared by the format parsers and the constrained-output stream
# --------------------------------------------------------------------------------------


class _CallEmitter:
    """Turns call events into ToolCallDeltas and completed ToolCalls."""

    def __init__(self, id_factory: Callable[[], str] | None = None):
        self._id_factory = id_factory or new_call_id
        self.calls: list[ToolCall] = []  # every call started so far (complete or not)
        self._deltas: list[ToolCallDelta] = []
        self._open: ToolCall | None = None
        self._open_index = -1

    def _start_call(self, name: str, args: str = "") -> None:
        call = ToolCall(name=name, arguments=args, id=self._id_factory())
        self.calls.append(call)
        self._open = call
        self._open_index = len(self.calls) - 1
        self._deltas.append(ToolCallDelta(index=self._open_index, id=call.id, type="function",
                                          name=name, arguments=args))

    def _add_args(self, args: str) -> None:
        if not args or self._open is None:
            return
        self._open.arguments += args
        last = self._deltas[-1] if self._deltas else None
        if last is not None and last.index == self._open_index:
            last.arguments += args
        else:
            self._deltas.append(ToolCallDelta(index=self._open_index, arguments=args))

    def _end_call(self) -> None:
        self._open = None

    def _take_deltas(self) -> list[ToolCallDelta]:
        d, self._deltas = self._deltas, []
        return d


# --------------------------------------------------------------------------------------
# Format parsers
# --------------------------------------------------------------------------------------

_TEXT, _CALL, _AFTER = range(3)
_PRE, _JSON, _POST = range(3)  # sub-states of _CALL

_PYTHON_TAG = "<|python_tag|>"
_QWEN_OPEN = "<tool_call>"
_QWEN_CLOSE = "</tool_call>"


class ToolCallStreamParser(_CallEmitter):
    """Stateful parser for one streamed completion.

    `feed(delta_text)` returns `(text_delta, tool_call_deltas)`; `finish()` flushes what
    was held back and returns the same. Text that may be the start of a call (a partial
    "<tool_call>" or "<|python_tag|>", a llama3 "{" at the start of a line, whitespace
    before either) is held back until it is clear. After `finish()`, `self.calls` holds
    the complete calls (ids equal to the streamed ones).
    """

    def __init__(self, fmt: str, tools: Any, id_factory: Callable[[], str] | None = None):
        super().__init__(id_factory)
        if fmt not in _FORMATS:
            raise ValueError(f"unknown tool call format {fmt!r}")
        self.fmt = fmt
        self._names = frozenset(_tool_names(tools))
        self._pending = ""  # text received and not yet consumed
        self._mode = _TEXT
        self._boundary = True  # llama3: a "{" here would start a line (or follow a call)
        self._semi = False  # llama3: the ';' after a call was seen
        # the call being scanned
        self._sub = _PRE
        self._raw: list[str] = []  # its text (whitespace before, trigger, ...), for reverting
        self._keep = 0  # how much of _raw becomes text if it turns out not to be a call
        self._scanner: _CallScanner | None = None
        self._close_i = 0  # qwen25: chars of "</tool_call>" matched
        self._committed = False  # its header was streamed
        self._args_sent = 0  # pieces of scanner.args already streamed
        self._finished = False

    # -- public --------------------------------------------------------------------------

    def feed(self, delta_text: str) -> tuple[str, list[ToolCallDelta]]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._pending += delta_text
        text = self._process(final=False)
        if self._mode == _CALL and self._scanner is not None:
            sc = self._scanner
            if not self._committed and sc.name is not None:
                self._committed = True
                self._start_call(sc.name, "".join(sc.args))
                self._args_sent = len(sc.args)
            elif self._committed:
                self._send_args()
        return text, self._take_deltas()

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        if self._finished:
            return "", []
        text = self._process(final=True)
        self._finished = True
        return text, self._take_deltas()

    @property
    def tool_calls(self) -> list[ToolCall]:
        return list(self.calls)

    # -- internals -----------------------------------------------------------------------

    def _send_args(self) -> None:
        sc = self._scanner
        assert sc is not None
        if self._args_sent < len(sc.args):
            self._add_args("".join(sc.args[self._args_sent:]))
            self._args_sent = len(sc.args)

    def _process(self, final: bool) -> str:
        out: list[str] = []
        while True:
            if self._mode == _TEXT:
                if not self._pending:
                    break
                if not self._step_text(final, out):
                    break
            elif self._mode == _AFTER:
                if not self._step_after():
                    break
            else:
                if not self._step_call(final, out):
                    break
        return "".join(out)

    # TEXT ---------------------------------------------------------------------------------

    def _step_text(self, final: bool, out: list[str]) -> bool:
        """Scan pending text; emit what is safe. True when a call candidate started."""
        s = self._pending
        if self.fmt == "qwen25":
            idx = s.find(_QWEN_OPEN)
            if idx >= 0:
                start = len(s[:idx].rstrip(_WS))
                self._begin_candidate(s, start, idx + len(_QWEN_OPEN), out)
                return True
            if final:
                out.append(s)
                self._pending = ""
                return False
            hold = len(s)
            for k in range(min(len(_QWEN_OPEN) - 1, len(s)), 0, -1):
                if _QWEN_OPEN.startswith(s[-k:]):
                    hold = len(s) - k
                    break
            hold = len(s[:hold].rstrip(_WS))
            out.append(s[:hold])
            self._pending = s[hold:]
            return False
        # llama3
        boundary = self._boundary
        ws_start = -1
        boundary_before_ws = boundary
        n = len(s)
        i = 0
        while i < n:
            ch = s[i]
            if ch in _WS:
                if ws_start < 0:
                    ws_start, boundary_before_ws = i, boundary
                if ch == "\n":
                    boundary = True
                i += 1
                continue
            start = ws_start if ws_start >= 0 else i
            if ch == "<":
                if s.startswith(_PYTHON_TAG, i):
                    self._begin_candidate(s, start, i + len(_PYTHON_TAG), out)
                    return True
                if not final and _PYTHON_TAG.startswith(s[i:]):
                    out.append(s[:start])
                    self._pending = s[start:]
                    self._boundary = boundary_before_ws if ws_start >= 0 else boundary
                    return False
            elif ch == "{" and boundary:
                self._begin_candidate(s, start, i + 1, out, brace=True)
                return True
            boundary = False
            ws_start = -1
            i += 1
        if ws_start >= 0 and not final:
            out.append(s[:ws_start])
            self._pending = s[ws_start:]
            self._boundary = boundary_before_ws
        else:
            out.append(s)
            self._pending = ""
            self._boundary = boundary
        return False

    def _begin_candidate(self, s: str, start: int, trig_end: int, out: list[str],
                         brace: bool = False) -> None:
        out.append(s[:start])
        self._mode = _CALL
        self._committed = False
        self._args_sent = 0
        self._close_i = 0
        self._scanner = None
        self._sub = _PRE
        self._keep = trig_end - start
        if brace:  # the "{" is the first char of the JSON: hand it to the scanner
            self._raw = [s[start:trig_end - 1]]
            self._pending = s[trig_end - 1:]
        else:
            self._raw = [s[start:trig_end]]
            self._pending = s[trig_end:]

    # CALL ---------------------------------------------------------------------------------

    def _step_call(self, final: bool, out: list[str]) -> bool:
        """Feed pending chars to the call; True when the mode changed (keep looping)."""
        s = self._pending
        i = 0
        n = len(s)
        try:
            while i < n:
                ch = s[i]
                if self._sub == _PRE:
                    if ch in _WS:
                        pass
                    elif ch == "{":
                        self._scanner = _CallScanner("call", self._names)
                        self._scanner.feed(ch)
                        self._sub = _JSON
                    else:
                        raise _ScanError("expected '{'")
                elif self._sub == _JSON:
                    sc = self._scanner
                    assert sc is not None
                    sc.feed(ch)
                    if sc.done:
                        if self.fmt == "llama3":
                            self._raw.append(ch)
                            self._pending = s[i + 1:]
                            self._complete_call()
                            return True
                        self._sub = _POST
                else:  # _POST (qwen25): whitespace, then "</tool_call>"
                    if self._close_i == 0 and ch in _WS:
                        pass
                    elif ch == _QWEN_CLOSE[self._close_i]:
                        self._close_i += 1
                        if self._close_i == len(_QWEN_CLOSE):
                            self._raw.append(ch)
                            self._pending = s[i + 1:]
                            self._complete_call()
                            return True
                    else:
                        raise _ScanError("expected </tool_call>")
                self._raw.append(ch)
                i += 1
        except _ScanError:
            self._fail(s, i, out)
            return True
        self._pending = ""
        if final:
            if self._sub == _POST:  # complete JSON, missing/partial closing tag at the end
                self._complete_call()
                return True
            self._fail("", 0, out)
            return True
        return False

    def _complete_call(self) -> None:
        sc = self._scanner
        assert sc is not None and sc.name is not None
        if not self._committed:
            self._start_call(sc.name, sc.arguments())
        else:
            self._send_args()
            if not sc.has_args:
                self._add_args("{}")
        self._end_call()
        self._scanner = None
        self._mode = _AFTER
        self._semi = False

    def _fail(self, s: str, i: int, out: list[str]) -> None:
        """The candidate is not a (complete) call."""
        if not self._committed:
            # give its trigger back as text; rescan the rest
            raw = "".join(self._raw)
            out.append(raw[:self._keep])
            self._pending = raw[self._keep:] + s[i:]
        else:
            # the header was streamed already: the call ends here, the rest is text
            self._end_call()
            self._pending = s[i:]
        self._scanner = None
        self._raw = []
        self._committed = False
        self._mode = _TEXT
        self._boundary = False

    # AFTER --------------------------------------------------------------------------------

    def _step_after(self) -> bool:
        s = self._pending
        i = 0
        n = len(s)
        while i < n:
            ch = s[i]
            if ch in _WS:
                i += 1
            elif ch == ";" and self.fmt == "llama3" and not self._semi:
                self._semi = True
                i += 1
            else:
                self._pending = s[i:]
                self._mode = _TEXT
                self._boundary = True
                return True
        self._pending = ""
        return False


_FORMATS = ("llama3", "qwen25")


class ToolCallParser:
    """A tool-call output format ("llama3" or "qwen25"); get one with `get_tool_parser`."""

    def __init__(self, name: str):
        if name not in _FORMATS:
            raise ValueError(f"unknown tool call parser {name!r}")
        self.name = name

    def parse(self, text: str, tools: Any) -> tuple[str, list[ToolCall]]:
        """Split a complete output into `(normal_text, calls)`."""
        p = ToolCallStreamParser(self.name, tools)
        p._pending = text
        normal = p._process(final=True)
        p._finished = True
        return normal, list(p.calls)

    def stream(self, tools: Any,
               id_factory: Callable[[], str] | None = None) -> ToolCallStreamParser:
        """A new stateful parser for one streamed output."""
        return ToolCallStreamParser(self.name, tools, id_factory)

    def has_tool_call(self, text: str) -> bool:
        """Cheap check whether `text` may contain a call (no validation)."""
        if self.name == "qwen25":
            return _QWEN_OPEN in text
        return _PYTHON_TAG in text or "{" in text

    def __repr__(self) -> str:
        return f"ToolCallParser({self.name!r})"


TOOL_PARSER_NAMES: tuple[str, ...] = _FORMATS


def get_tool_parser(name: str) -> ToolCallParser:
    """The parser for `--tool-call-parser NAME`; ValueError listing the valid names."""
    if name not in _FORMATS:
        raise ValueError(f"unknown tool call parser {name!r}; valid names: "
                         + ", ".join(_FORMATS))
    return ToolCallParser(name)


# --------------------------------------------------------------------------------------
# tool_choice
# --------------------------------------------------------------------------------------


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


class ConstrainedToolCallStream(_CallEmitter):
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
        self._names = frozenset(_tool_names(tools))
        self._named = choice[1] if isinstance(choice, tuple) else None
        # "required": "pre" -> "[" -> items ("item", "sep") -> "end"; named: "args" -> "end"
        self._state = "args" if self._named else "pre"
        self._scanner: _CallScanner | None = None
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
            except _ScanError as e:
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
                if ch in _WS:
                    return
                self._scanner = _CallScanner("args" if self._named else "call", self._names)
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
        if ch in _WS:
            return
        if st == "pre":
            if ch != "[":
                raise _ScanError("expected '['")
            self._state = "first"
        elif st == "first":
            if ch == "]":
                raise _ScanError("empty tool call list")
            self._state = "item"
            self._feed_char(ch)
        elif st == "sep":
            if ch == ",":
                self._state = "item"
            elif ch == "]":
                self._state = "end"
            else:
                raise _ScanError("expected ',' or ']'")
        else:  # "end"
            raise _ScanError("trailing data after the tool calls")


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


# --------------------------------------------------------------------------------------
# Prompt side
# --------------------------------------------------------------------------------------


def chat_template_supports_tools(chat_template: str | None) -> bool:
    """Whether a Jinja chat template renders a `tools=` argument (a textual check)."""
    if not chat_template:
        return False
    return "tools" in chat_template


def _openai_tool_json(spec: dict[str, Any]) -> dict[str, Any]:
    fn: dict[str, Any] = {"name": spec["name"]}
    if spec.get("description"):
        fn["description"] = spec["description"]
    fn["parameters"] = spec["parameters"]
    return {"type": "function", "function": fn}


def tools_system_prompt(tools: Any, parser_name: str) -> str:
    """System-prompt text describing `tools` in `parser_name`'s call format.

    For chat templates that take no `tools=`: prepend it to (or make it) the system
    message. It mirrors what the Qwen2.5 and Llama 3.1 templates themselves render.
    """
    if parser_name not in _FORMATS:
        raise ValueError(f"unknown tool call parser {parser_name!r}; valid names: "
                         + ", ".join(_FORMATS))
    specs = validate_tools(tools)
    if not specs:
        return ""
    if parser_name == "qwen25":
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
    blocks = "\n\n".join(json.dumps(_openai_tool_json(s), indent=4, ensure_ascii=False)
                         for s in specs)
    return (
        "You have access to the following functions. To call a function, respond only with "
        "a JSON object for the function call, in the format "
        '{"name": function name, "parameters": dictionary of argument name and its value}. '
        "To call several functions, separate the JSON objects with \";\". "
        "Do not use variables. If no function is needed, answer normally.\n\n"
        f"{blocks}"
    )


def _format_call_text(name: str, args: Any, parser_name: str) -> str:
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            pass
    if parser_name == "qwen25":
        return ("<tool_call>\n" + json.dumps({"name": name, "arguments": args},
                                             ensure_ascii=False) + "\n</tool_call>")
    return json.dumps({"name": name, "parameters": args}, ensure_ascii=False)


def prepare_messages(messages: list[dict[str, Any]], tools: Any, parser_name: str,
                     template_supports_tools: bool) -> list[dict[str, Any]]:
    """Messages ready for `tokenizer.apply_chat_template` in a tool-using conversation.

    * template_supports_tools: assistant `tool_calls[*].function.arguments` JSON strings
      become dicts (what the HF templates expect, as SGLang and vLLM do); pass
      `tools=tools` to the template yourself.
    * otherwise: `tools_system_prompt` is merged into the first system message (or a new
      one); assistant tool calls become text in the parser's format and `role: "tool"`
      messages become user messages, so any template can render them.
    The input is not modified.
    """
    out: list[dict[str, Any]] = []
    if template_supports_tools:
        for m in messages:
            m = dict(m)
            if m.get("role") == "assistant" and m.get("tool_calls"):
                calls = []
                for c in m["tool_calls"]:
                    c = dict(c)
                    fn = dict(c.get("function") or {})
                    a = fn.get("arguments")
                    if isinstance(a, str):
                        try:
                            fn["arguments"] = json.loads(a) if a.strip() else {}
                        except json.JSONDecodeError:
                            pass
                    c["function"] = fn
                    calls.append(c)
                m["tool_calls"] = calls
            out.append(m)
        return out

    prompt = tools_system_prompt(tools, parser_name) if tools else ""
    sys_done = not prompt
    for m in messages:
        m = dict(m)
        role = m.get("role")
        if role == "system" and not sys_done:
            content = m.get("content") or ""
            if isinstance(content, list):  # content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            m["content"] = f"{content}\n\n{prompt}" if content else prompt
            sys_done = True
        elif role == "assistant" and m.get("tool_calls"):
            parts = [_format_call_text((c.get("function") or {}).get("name", ""),
                                       (c.get("function") or {}).get("arguments", {}),
                                       parser_name) for c in m["tool_calls"]]
            sep = "\n" if parser_name == "qwen25" else ";"
            text = sep.join(parts)
            content = m.get("content")
            m = {"role": "assistant", "content": f"{content}\n{text}" if content else text}
        elif role == "tool":
            content = m.get("content") or ""
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if parser_name == "qwen25":
                text = f"<tool_response>\n{content}\n</tool_response>"
            else:
                text = f"Function result: {content}"
            # consecutive tool results go into one user message
            if out and out[-1].get("role") == "user" and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + text
                continue
            m = {"role": "user", "content": text, "_tool_results": True}
        out.append(m)
    for m in out:
        m.pop("_tool_results", None)
    if not sys_done:
        out.insert(0, {"role": "system", "content": prompt})
    return out
