"""`ProgramState`: the `s` of a program (`s += ...`, `s["name"]`, roles, fork, streaming
reads) and what `run` returns; `ProgramStateGroup`: the states of a fork."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import TYPE_CHECKING

from sglbatch.lang.interpreter import merge_stream_meta_info
from sglbatch.lang.ir import (
    SglConcateAndAppend,
    SglExpr,
    SglExprList,
    SglRoleBegin,
    SglRoleEnd,
    SglVarScopeBegin,
    SglVarScopeEnd,
)

if TYPE_CHECKING:
    from sglbatch.lang.interpreter import StreamExecutor


class ProgramState:
    """The ``s`` of a program, and what ``run`` returns."""

    def __init__(self, stream_executor: StreamExecutor):
        self.stream_executor = stream_executor
        self.ret_value = None

    def _role_common(self, name: str, expr: SglExpr | None = None):
        if expr is not None:
            role_expr = SglExprList([SglRoleBegin(name), expr, SglRoleEnd(name)])
            self.stream_executor.submit(role_expr)
            return role_expr

        @contextmanager
        def role_scope():
            self.stream_executor.submit(SglRoleBegin(name))
            yield
            self.stream_executor.submit(SglRoleEnd(name))

        return role_scope()

    def system(self, expr: SglExpr | None = None):
        return self._role_common("system", expr)

    def user(self, expr: SglExpr | None = None):
        return self._role_common("user", expr)

    def assistant(self, expr: SglExpr | None = None):
        return self._role_common("assistant", expr)

    @contextmanager
    def var_scope(self, name: str):
        self.stream_executor.submit(SglVarScopeBegin(name))
        yield
        self.stream_executor.submit(SglVarScopeEnd(name))

    def fork(self, size: int = 1, position_ids_offset: list[int] | None = None):
        executors = self.stream_executor.fork(size, position_ids_offset)
        return ProgramStateGroup([ProgramState(x) for x in executors], self)

    @contextmanager
    def copy(self, position_ids_offset: list[int] | None = None):
        group = self.fork(1, position_ids_offset)
        try:
            yield group[0]
        finally:
            group.join()

    def text(self):
        return self.stream_executor.text()

    def messages(self):
        return self.stream_executor.messages()

    def sync(self):
        return self.stream_executor.sync()

    def error(self):
        return self.stream_executor.error()

    def _wait_var_stream_event(self, var_name):
        exe = self.stream_executor
        while True:
            event = exe.stream_var_event.get(var_name)
            if event is not None:
                return event
            if exe.is_finished:
                return None
            exe.help_pending()
            time.sleep(0.002)

    def text_iter(self, var_name: str | None = None):
        exe = self.stream_executor
        if not exe.stream:
            yield self.text() if var_name is None else self.get_var(var_name)
            return
        prev = 0
        if var_name is None:
            event = exe.stream_text_event
            while True:
                exe.help_pending()  # a pool worker must not wait for work still queued
                event.wait()
                event.clear()
                out = str(exe.text_[prev:])
                prev += len(out)
                if out:
                    yield out
                if exe.is_finished:
                    break
            if exe.error_ is not None:
                exe._raise_error()
            return
        event = self._wait_var_stream_event(var_name)
        if event is None:
            if exe.error_ is not None:
                exe._raise_error()
            yield ""
            return
        while True:
            exe.help_pending()
            event.wait()
            event.clear()
            out = str(exe.variables.get(var_name, "")[prev:])
            prev += len(out)
            if out:
                yield out
            if exe.variable_event[var_name].is_set():
                break
        if exe.error_ is not None and var_name not in exe.variables:
            exe._raise_error()

    async def text_async_iter(self, var_name: str | None = None, return_meta_data: bool = False):
        loop = asyncio.get_running_loop()
        exe = self.stream_executor
        if not exe.stream:
            if var_name is None:
                yield await loop.run_in_executor(None, self.text)
            else:
                yield await loop.run_in_executor(None, self.get_var, var_name)
            return
        prev = 0
        if var_name is None:
            event = exe.stream_text_event
            while True:
                await loop.run_in_executor(None, event.wait)
                event.clear()
                out = str(exe.text_[prev:])
                prev += len(out)
                if out:
                    yield out
                if exe.is_finished:
                    break
            if exe.error_ is not None:
                exe._raise_error()
            return
        event = await loop.run_in_executor(None, self._wait_var_stream_event, var_name)
        if event is None:
            if exe.error_ is not None:
                exe._raise_error()
            yield ""
            return
        pending = None
        while True:
            await loop.run_in_executor(None, event.wait)
            event.clear()
            out = str(exe.variables.get(var_name, "")[prev:])
            meta_info = exe.meta_info.get(var_name)
            prev += len(out)
            if out:
                if return_meta_data:
                    yield out, merge_stream_meta_info(pending, meta_info or {})
                    pending = None
                else:
                    yield out
            elif return_meta_data and meta_info is not None:
                pending = merge_stream_meta_info(pending, meta_info)
            if exe.variable_event[var_name].is_set():
                break
        if exe.error_ is not None and var_name not in exe.variables:
            exe._raise_error()

    def get_var(self, name):
        return self.stream_executor.get_var(name)

    def set_var(self, name, value):
        return self.stream_executor.set_var(name, value)

    def get_meta_info(self, name):
        return self.stream_executor.get_meta_info(name)

    def __iadd__(self, other):
        if other is None:
            raise ValueError("Tried to append None to state.")
        self.stream_executor.submit(other)
        return self

    def __getitem__(self, name):
        return self.get_var(name)

    def __setitem__(self, name, value):
        self.set_var(name, value)

    def __contains__(self, name):
        return name in self.stream_executor.variables

    def __del__(self):
        try:
            self.stream_executor.end()
        except Exception:  # noqa: S110, BLE001 - never raise from a finalizer
            pass

    def __repr__(self) -> str:
        try:
            return f"ProgramState({self.text()})"
        except Exception as e:  # noqa: BLE001
            return f"ProgramState(<error: {e!r}>)"


class ProgramStateGroup:
    """The states returned by ``s.fork(n)``."""

    def __init__(self, states: list[ProgramState], src_state: ProgramState | None = None):
        self.states = states
        self.src_state = src_state

    def join(self, mode: str = "gather_variable"):
        if mode == "gather_variable":
            # New variables of the forks come back to the parent as lists.
            src_vars = self.src_state.stream_executor.variables
            src_keys = set(src_vars)
            for child in self.states:
                child.stream_executor.sync()
                child_vars = child.stream_executor.variables
                for k in set(child_vars) - src_keys:
                    src_vars.setdefault(k, []).append(child_vars[k])
        elif mode == "concate_and_append":
            self.src_state += SglConcateAndAppend(self.states)
            self.src_state.stream_executor.sync()
        else:
            raise ValueError(f"Invalid join mode: {mode}")
        for s in self.states:
            s.stream_executor.end()

    def __getitem__(self, i: int):
        return self.states[i]

    def __setitem__(self, i: int, value):
        assert self.states[i] == value

    def __len__(self):
        return len(self.states)

    def __iter__(self):
        return iter(self.states)

    def __iadd__(self, other):
        if isinstance(other, (SglExpr, str)):
            for state in self.states:
                state += other
        elif isinstance(other, Callable):
            for i, state in enumerate(self.states):
                state += other(i)
        elif isinstance(other, (list, tuple)):
            for state, item in zip(self.states, other):
                state += item
        else:
            raise ValueError(f"Invalid value: {other}")  # noqa: TRY004 - as SGLang
        return self
