"""An incremental JSON scanner for one tool call object (or one bare arguments object), fed
one character at a time: it validates as it goes and collects the function name and the
arguments normalized (`json.dumps` spacing; strings and numbers kept as written)."""

from __future__ import annotations

import json

JSON_WS = " \t\n\r"  # JSON whitespace


# Structural states.
_VALUE, _KEY_OR_END, _KEY, _COLON, _AFTER_VALUE, _VALUE_OR_END = range(6)
# Lexical states.
_STRING, _ESC, _UHEX, _LITERAL = range(10, 14)
_NUM_MINUS, _NUM_ZERO, _NUM_INT, _NUM_DOT, _NUM_FRAC, _NUM_E, _NUM_ESIGN, _NUM_EXP = range(20, 28)
_NUM_END_OK = (_NUM_ZERO, _NUM_INT, _NUM_FRAC, _NUM_EXP)

_NAME_KEYS = ("name",)
_ARGS_KEYS = ("parameters", "arguments")
_IGNORED_KEYS = ("type",)


class ScanError(Exception):
    pass


class CallScanner:
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
            raise ScanError("expected an object")
        if self.mode == "call" and depth == 1:
            key = self._cur_key
            if key in _NAME_KEYS:
                raise ScanError("name must be a string")
            if key in _ARGS_KEYS:
                if ch != "{":
                    raise ScanError("arguments must be an object")
                self._capture = True
        self._out(ch)
        self.stack.append(ch)
        self.state = _KEY_OR_END if ch == "{" else _VALUE_OR_END

    def _close(self, ch: str) -> None:
        if not self.stack or {"{": "}", "[": "]"}[self.stack[-1]] != ch:
            raise ScanError(f"unexpected {ch!r}")
        self._out(ch)
        self.stack.pop()
        depth = len(self.stack)
        if self.mode == "call":
            if depth == 1 and self._capture:  # closed the arguments object
                self._capture = False
                self.has_args = True
            elif depth == 0 and self.name is None:
                raise ScanError("missing name")
        elif depth == 0:
            self._capture = False
            self.has_args = True
        self._value_done()

    def _start_scalar(self, ch: str) -> None:
        """First char of a string/number/literal value."""
        depth = len(self.stack)
        if depth == 0:
            raise ScanError("expected an object")
        if self.mode == "call" and depth == 1:
            key = self._cur_key
            if key in _ARGS_KEYS:
                raise ScanError("arguments must be an object")
            if key in _NAME_KEYS:
                if ch != '"':
                    raise ScanError("name must be a string")
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
            raise ScanError(f"unexpected {ch!r}")

    def _end_string(self) -> None:
        is_key, self._str_is_key = self._str_is_key, False
        if self._collect is not None:
            raw = "".join(self._collect)
            self._collect = None
            try:
                text = json.loads('"' + raw + '"')
            except json.JSONDecodeError as e:  # pragma: no cover - the scanner validated it
                raise ScanError(str(e)) from None
            if is_key:  # a key of the call object
                slot = "args" if text in _ARGS_KEYS else "name" if text in _NAME_KEYS else text
                if text not in _ARGS_KEYS + _NAME_KEYS + _IGNORED_KEYS:
                    raise ScanError(f"unexpected key {text!r}")
                if slot in self._seen:
                    raise ScanError(f"duplicate key {text!r}")
                self._seen.add(slot)
                self._cur_key = text
            else:  # the function name
                if text not in self.valid_names:
                    raise ScanError(f"unknown function {text!r}")
                self.name = text
        if is_key:
            self.state = _COLON
        else:
            self._value_done()

    # -- main entry ------------------------------------------------------------------------

    def feed(self, ch: str) -> None:
        """Consume one character; raises ScanError when the text cannot be such an object."""
        if self.done:
            raise ScanError("trailing data")
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
                raise ScanError("control character in string")
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
                raise ScanError("bad escape")
            self._out(ch)
            if self._collect is not None:
                self._collect.append(ch)
            return
        if st == _UHEX:
            if ch not in "0123456789abcdefABCDEF":
                raise ScanError("bad \\u escape")
            self._out(ch)
            if self._collect is not None:
                self._collect.append(ch)
            self._uhex -= 1
            if self._uhex == 0:
                self.state = _STRING
            return
        if st == _LITERAL:
            if ch != self._lit[0]:
                raise ScanError("bad literal")
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
        if ch in JSON_WS:
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
                raise ScanError("expected a key")
        elif st == _COLON:
            if ch != ":":
                raise ScanError("expected ':'")
            self._out(": ")
            self.state = _VALUE
        elif st == _AFTER_VALUE:
            if ch == ",":
                self._out(", ")
                self.state = _KEY if self.stack[-1] == "{" else _VALUE
            elif ch in "}]":
                self._close(ch)
            else:
                raise ScanError("expected ',' or a closing bracket")
        else:  # pragma: no cover - unreachable
            raise ScanError("bad state")

    def _feed_number(self, st: int, ch: str) -> bool:
        """Advance a number; False when `ch` is not part of it (and the number may end)."""
        digit = "0" <= ch <= "9"
        nxt = None
        if st == _NUM_MINUS:
            nxt = (_NUM_ZERO if ch == "0" else _NUM_INT) if digit else None
        elif st == _NUM_ZERO:
            nxt = _NUM_DOT if ch == "." else _NUM_E if ch in "eE" else None
            if nxt is None and digit:
                raise ScanError("leading zero")
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
            raise ScanError("bad number")
        return False

    def arguments(self) -> str:
        return "".join(self.args) if self.has_args else "{}"
