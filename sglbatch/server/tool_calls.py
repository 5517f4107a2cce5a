"""Tool calling for the OpenAI chat API: calls and their streamed deltas, tools validation,
and the parser that finds calls in a model's output (streaming or not).

Pure Python, no engine or server. It follows SGLang's semantics. The call formats
(`--tool-call-parser llama3 | qwen25`) are in tool_formats.py; `tool_choice` ("required",
a named function) constrains the output instead, see tool_choice.py; tool_prompts.py
writes tools and past calls into prompts.

Non-streaming and streaming share one scanner, so for any output the streamed text deltas
concatenate to the non-streaming `normal_text` and each call's streamed argument pieces
concatenate to its non-streaming `arguments`. (The one exception is inherent to streaming:
a call whose header was already sent and that then turns out malformed or truncated; the
non-streaming parse gives such text back as normal text.)

`arguments` is the model's JSON object with the whitespace between tokens normalized to
`json.dumps` style (`", "` and `": "`); strings and numbers are kept exactly as written.

A call counts only if it is well-formed JSON, names a function in `tools` and its arguments
are an object (absent arguments mean `{}`); anything else stays normal text. Whitespace
around a call (and a format's separator after it) is consumed by the call.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sglbatch.server.tool_formats import ToolCallFormat, get_format
from sglbatch.server.tool_json_scanner import JSON_WS, CallScanner, ScanError


def new_call_id() -> str:
    """An OpenAI-style tool call id: "call_" + 24 random hex digits."""
    return "call_" + uuid.uuid4().hex[:24]



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


def tool_names(tools: Any) -> list[str]:
    return [t["name"] for t in validate_tools(tools)]


class CallEmitter:
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


_TEXT, _CALL, _AFTER = range(3)
_PRE, _JSON, _POST = range(3)  # sub-states of _CALL

class ToolCallStreamParser(CallEmitter):
    """Stateful parser for one streamed completion.

    `feed(delta_text)` returns `(text_delta, tool_call_deltas)`; `finish()` flushes what
    was held back and returns the same. Text that may be the start of a call (a partial
    "<tool_call>" or "<|python_tag|>", a llama3 "{" at the start of a line, whitespace
    before either) is held back until it is clear. After `finish()`, `self.calls` holds
    the complete calls (ids equal to the streamed ones).
    """

    def __init__(self, fmt: ToolCallFormat, tools: Any,
                 id_factory: Callable[[], str] | None = None):
        super().__init__(id_factory)
        self.format = fmt
        self._names = frozenset(tool_names(tools))
        self._pending = ""  # text received and not yet consumed
        self._mode = _TEXT
        self._boundary = True  # llama3: a "{" here would start a line (or follow a call)
        self._semi = False  # llama3: the ';' after a call was seen
        # the call being scanned
        self._sub = _PRE
        self._raw: list[str] = []  # its text (whitespace before, trigger, ...), for reverting
        self._keep = 0  # how much of _raw becomes text if it turns out not to be a call
        self._scanner: CallScanner | None = None
        self._close_i = 0  # chars of the format's close tag matched
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

    def parse_complete(self, text: str) -> tuple[str, list[ToolCall]]:
        """A whole output at once: `(normal_text, calls)`. Unlike feed + finish, a call that
        turns out malformed gives all its text back (no header was streamed yet)."""
        self._pending = text
        normal = self._process(final=True)
        self._finished = True
        return normal, self.tool_calls

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
        scan = self.format.scan_text(s, final, self._boundary)
        if scan.trigger_end is not None:
            self._begin_candidate(s, scan.emit, scan.trigger_end, out, brace=scan.brace)
            return True
        out.append(s[:scan.emit])
        self._pending = s[scan.emit:]
        self._boundary = scan.boundary
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
                    if ch in JSON_WS:
                        pass
                    elif ch == "{":
                        self._scanner = CallScanner("call", self._names)
                        self._scanner.feed(ch)
                        self._sub = _JSON
                    else:
                        raise ScanError("expected '{'")
                elif self._sub == _JSON:
                    sc = self._scanner
                    assert sc is not None
                    sc.feed(ch)
                    if sc.done:
                        if self.format.close_tag is None:
                            self._raw.append(ch)
                            self._pending = s[i + 1:]
                            self._complete_call()
                            return True
                        self._sub = _POST
                else:  # _POST: whitespace, then the format's close tag
                    close = self.format.close_tag
                    if self._close_i == 0 and ch in JSON_WS:
                        pass
                    elif ch == close[self._close_i]:
                        self._close_i += 1
                        if self._close_i == len(close):
                            self._raw.append(ch)
                            self._pending = s[i + 1:]
                            self._complete_call()
                            return True
                    else:
                        raise ScanError(f"expected {close}")
                self._raw.append(ch)
                i += 1
        except ScanError:
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
            if ch in JSON_WS:
                i += 1
            elif ch == self.format.separator and not self._semi:
                self._semi = True
                i += 1
            else:
                self._pending = s[i:]
                self._mode = _TEXT
                self._boundary = True
                return True
        self._pending = ""
        return False


class ToolCallParser:
    """A tool-call output format's parser; get one with `get_tool_parser`."""

    def __init__(self, fmt: ToolCallFormat):
        self.format = fmt
        self.name = fmt.name

    def parse(self, text: str, tools: Any) -> tuple[str, list[ToolCall]]:
        """Split a complete output into `(normal_text, calls)`."""
        return ToolCallStreamParser(self.format, tools).parse_complete(text)

    def stream(self, tools: Any,
               id_factory: Callable[[], str] | None = None) -> ToolCallStreamParser:
        """A new stateful parser for one streamed output."""
        return ToolCallStreamParser(self.format, tools, id_factory)

    def has_tool_call(self, text: str) -> bool:
        """Cheap check whether `text` may contain a call (no validation)."""
        return self.format.may_contain_call(text)

    def __repr__(self) -> str:
        return f"ToolCallParser({self.name!r})"


def get_tool_parser(name: str) -> ToolCallParser:
    """The parser for `--tool-call-parser NAME`; ValueError listing the valid names."""
    return ToolCallParser(get_format(name))
