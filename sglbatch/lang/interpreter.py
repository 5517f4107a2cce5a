"""The interpreter of the frontend language (SGLang-compatible).

Each running program has a ``StreamExecutor``: a worker thread that takes the
program's expressions from a queue and executes them in order against a backend,
so ``s += gen(...)`` returns at once and the program only waits where it reads a
result (``s["name"]``, ``s.text()``, a fork). ``run_batch`` runs many programs at
once, each on a pool thread, so the engine sees all their requests together and
batches them.

Errors: an expression that fails in the worker stops the program's executor; the
error (with the worker's traceback, plus a note naming the program line that
submitted the failing expression) is re-raised in the program at its next
``s += ...`` or read, and in the caller by ``state.text()``, ``state[name]``,
``state.sync()`` and ``run_batch``.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import copy
import linecache
import os
import queue
import sys
import threading
import uuid
from collections.abc import Callable
from typing import Any

from sglbatch.lang.global_config import global_config
from sglbatch.lang.ir import (
    SglCommitLazy,
    SglConcateAndAppend,
    SglConstantText,
    SglExpr,
    SglExprList,
    SglGen,
    SglImage,
    SglRoleBegin,
    SglRoleEnd,
    SglSelect,
    SglSeparateReasoning,
    SglVariable,
    SglVarScopeBegin,
    SglVarScopeEnd,
    SglVideo,
)

_LANG_DIR = os.path.dirname(os.path.abspath(__file__))
_CONTEXTLIB_FILE = os.path.abspath(contextlib.__file__)


# --------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------


def _is_sglbatch_engine(obj: Any) -> bool:
    mod = sys.modules.get("sglbatch.engine.engine")
    return mod is not None and isinstance(obj, mod.Engine)


def resolve_backend(backend: Any):
    """The backend object the interpreter talks to: a ``Runtime`` gives its
    ``endpoint``; a bare ``sglbatch.Engine`` is wrapped in an ``EngineBackend``
    (one per engine, reused)."""
    if backend is None:
        raise ValueError(
            "no backend: pass backend=... or call sgl.set_default_backend(...) first "
            "(an sglbatch.Engine, sgl.RuntimeEndpoint(url), sgl.OpenAI(model), ...)"
        )
    if _is_sglbatch_engine(backend):
        from sglbatch.lang.backend.engine import EngineBackend

        return EngineBackend.for_engine(backend)
    from sglbatch.lang.backend.base_backend import BaseBackend

    if not isinstance(backend, BaseBackend) and hasattr(backend, "endpoint"):
        backend = backend.endpoint  # a Runtime
    return backend


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


_INTERNAL_FILES: dict[str, bool] = {}


def _is_internal(filename: str) -> bool:
    internal = _INTERNAL_FILES.get(filename)
    if internal is None:
        path = os.path.abspath(filename)
        internal = path.startswith(_LANG_DIR + os.sep) or path == _CONTEXTLIB_FILE
        _INTERNAL_FILES[filename] = internal
    return internal


def _user_location() -> tuple[str, int, str] | None:
    """(file, line, function) of the innermost frame outside this package: the
    program line that submitted an expression."""
    f = sys._getframe(1)
    while f is not None:
        if not _is_internal(f.f_code.co_filename):
            return f.f_code.co_filename, f.f_lineno, f.f_code.co_name
        f = f.f_back
    return None


def _describe_location(loc: tuple[str, int, str] | None) -> str:
    if loc is None:
        return "in the program"
    filename, lineno, func = loc
    line = linecache.getline(filename, lineno).strip()
    where = f'File "{filename}", line {lineno}, in {func}'
    return f"{where}\n    {line}" if line else where


def _has_media(expr) -> SglExpr | None:
    if isinstance(expr, (SglImage, SglVideo)):
        return expr
    if isinstance(expr, SglExprList):
        for x in expr.expr_list:
            found = _has_media(x)
            if found is not None:
                return found
    return None


def encode_image_base64(image) -> str:
    """Base64 of an image given as a path, bytes, a data URL or a base64 string."""
    if isinstance(image, bytes):
        return base64.b64encode(image).decode()
    if not isinstance(image, str):
        # A PIL image.
        import io

        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()
    if image.startswith("data:"):
        return image.split(",", 1)[1]
    if image.startswith(("http://", "https://")):
        import urllib.request

        with urllib.request.urlopen(image, timeout=30) as resp:
            return base64.b64encode(resp.read()).decode()
    if os.path.exists(image):
        with open(image, "rb") as fh:
            return base64.b64encode(fh.read()).decode()
    # Assume it already is base64.
    return image


_INCREMENTAL_STREAMING_META_INFO_KEYS = (
    "output_token_logprobs",
    "output_top_logprobs",
    "output_token_ids_logprobs",
)


def merge_stream_meta_info(pending: dict | None, meta_info: dict) -> dict:
    if pending is None:
        return meta_info
    merged = dict(meta_info)
    for key in _INCREMENTAL_STREAMING_META_INFO_KEYS:
        if key in meta_info or key in pending:
            merged[key] = list(pending.get(key) or []) + list(meta_info.get(key) or [])
    return merged


# --------------------------------------------------------------------------------------
# Reasoning separation (sgl.separate_reasoning)
# --------------------------------------------------------------------------------------

# model_type -> (start tag, end tag, whether the output starts inside the reasoning)
_REASONING_FORMATS = {
    None: ("<think>", "</think>", False),
    "deepseek-r1": ("<think>", "</think>", True),
    "deepseek-v3": ("<think>", "</think>", False),
    "qwen3": ("<think>", "</think>", False),
    "qwen3-thinking": ("<think>", "</think>", True),
    "glm45": ("<think>", "</think>", False),
    "kimi": ("\u25c1think\u25b7", "\u25c1/think\u25b7", False),
    "step3": ("<think>", "</think>", True),
    "minimax": ("<think>", "</think>", True),
}


def split_reasoning(text: str, model_type: str | None) -> tuple[str, str]:
    """(reasoning, answer) of a generated text."""
    start, end, forced = _REASONING_FORMATS.get(model_type, _REASONING_FORMATS[None])
    body = text
    stripped = body.lstrip()
    in_reasoning = forced
    if stripped.startswith(start):
        body = stripped[len(start) :]
        in_reasoning = True
    if not in_reasoning:
        return "", text
    if end not in body:
        return body.strip(), ""
    reasoning, answer = body.split(end, 1)
    return reasoning.strip(), answer.lstrip()


# --------------------------------------------------------------------------------------
# StreamExecutor
# --------------------------------------------------------------------------------------


class StreamExecutor:
    """Executes a program's expressions in order on a worker thread."""

    def __init__(
        self,
        backend,
        arguments,
        default_sampling_para,
        chat_template,
        stream,
        num_api_spec_tokens=None,
        use_thread=True,
    ):
        self.sid = uuid.uuid4().hex
        self.backend = backend
        self.arguments: dict[str, Any] = arguments
        self.default_sampling_para = default_sampling_para
        self.stream = stream

        self.variables: dict[str, Any] = {}
        self.variable_event: dict[str, threading.Event] = {}
        self.meta_info: dict[str, Any] = {}
        self.is_finished = False
        self.error_: BaseException | None = None
        self._error_tb = None
        self._worker_failed = False
        self._ended = False
        self._lock = threading.Lock()

        # Completion models: the whole text.
        self.text_ = ""
        # Chat models: OpenAI-format messages.
        self.messages_: list[dict] = []
        self.chat_template = chat_template or self.backend.get_chat_template()
        self.cur_role: str | None = None
        self.cur_role_begin_pos: int | None = None

        # Vision.
        self.images_: list[tuple[str, str]] = []
        self.cur_images: list[tuple[str, str]] = []

        # fork/join.
        self.fork_start_text_pos: int | None = None

        # API speculative execution.
        self.num_api_spec_tokens = num_api_spec_tokens
        self.speculated_text = ""

        # Streaming.
        if stream:
            self.stream_text_event: threading.Event | None = threading.Event()
            self.stream_var_event: dict[str, threading.Event] | None = {}
        else:
            self.stream_text_event = None
            self.stream_var_event = None

        self.use_thread = use_thread
        if use_thread:
            self.queue: queue.Queue = queue.Queue()
            self.worker = threading.Thread(
                target=contextvars.copy_context().run,
                args=(self._thread_worker_func,),
                name=f"sgl-exec-{self.sid[:8]}",
                daemon=True,
            )
            self.worker.start()

    # ---- submission and results ------------------------------------------------------

    def submit(self, expr: SglExpr):
        if isinstance(expr, str):
            expr = SglConstantText(expr)
        if not isinstance(expr, SglExpr):
            raise TypeError(
                f"cannot append a {type(expr).__name__} to a program state; "
                "append a str or an sgl expression (gen, select, image, a role, ...)"
            )
        self._check_media(expr)
        self._init_var_event(expr)
        if not self.use_thread:
            self._execute(expr)
            return
        loc = _user_location()
        with self._lock:
            if self.error_ is not None:
                self._raise_error()
            if self._ended:
                raise RuntimeError("this program state has ended; it takes no more expressions")
            self.queue.put((expr, loc))

    def sync(self):
        if self.use_thread:
            self.queue.join()
        if self.error_ is not None:
            self._raise_error()

    def _wait_quietly(self):
        if self.use_thread:
            self.queue.join()

    def get_var(self, name):
        if name in self.variable_event:
            self.variable_event[name].wait()
        if self.error_ is not None and name not in self.variables:
            self._raise_error()
        return self.variables[name]

    def set_var(self, name, value):
        self.variables[name] = value

    def get_meta_info(self, name, timeout=None):
        if name in self.variable_event and not self.variable_event[name].wait(timeout):
            raise TimeoutError(f"Timeout while waiting for event '{name}'")
        if self.error_ is not None and name not in self.meta_info:
            self._raise_error()
        return self.meta_info.get(name, None)

    def fork(self, size: int = 1, position_ids_offset: list[int] | None = None):
        if size > 1 and str(self.text_):
            self.submit(SglCommitLazy())
        self.sync()
        size = int(size)
        exes = [
            StreamExecutor(
                self.backend,
                self.arguments,
                self.default_sampling_para,
                self.chat_template,
                self.stream,
            )
            for _ in range(size)
        ]
        for exe in exes:
            exe.variables = dict(self.variables)
            exe.text_ = str(self.text_)
            exe.messages_ = list(self.messages_)
            exe.cur_role = self.cur_role
            exe.cur_role_begin_pos = self.cur_role_begin_pos
            exe.fork_start_text_pos = len(self.text_)
            exe.images_ = list(self.images_)
        return exes

    def text(self):
        self.sync()
        return self.text_

    def messages(self):
        self.sync()
        return self.messages_

    def error(self):
        self._wait_quietly()
        return self.error_

    def end(self):
        with self._lock:
            if self._ended:
                return
            self._ended = True
            if self.use_thread and not self._worker_failed:
                self.queue.put(None)
        if not self.use_thread:
            self.is_finished = True
        try:
            self.backend.end_program(self)
        except Exception:  # noqa: S110, BLE001 - never fail a program at its end
            pass

    # ---- errors ----------------------------------------------------------------------

    def _raise_error(self):
        raise self.error_.with_traceback(self._error_tb)

    def _set_error(self, error: BaseException, loc=None, note: bool = True):
        if note and hasattr(error, "add_note") and not getattr(error, "_sgl_noted", False):
            with contextlib.suppress(Exception):
                error.add_note(
                    "sglbatch.lang: raised while running this program line:\n  "
                    + _describe_location(loc).replace("\n", "\n  ")
                )
                error._sgl_noted = True
        self.error_ = error
        self._error_tb = error.__traceback__

    def _release_waiters(self):
        for event in list(self.variable_event.values()):
            event.set()
        if self.stream_var_event:
            for event in list(self.stream_var_event.values()):
                event.set()
        if self.stream_text_event:
            self.stream_text_event.set()

    def _record_external_error(self, error: BaseException):
        """An exception of the program body in stream mode (the worker still
        finishes what was queued; readers get the error at the end)."""
        with self._lock:
            if self.error_ is None:
                self._set_error(error, note=False)
        if not self.use_thread:
            self.is_finished = True
            self._release_waiters()

    def _check_media(self, expr):
        media = _has_media(expr)
        if media is None:
            return
        if not getattr(self.backend, "supports_images", True):
            kind = "video" if isinstance(media, SglVideo) else "image"
            try:
                model = self.backend.get_model_name()
            except Exception:  # noqa: BLE001
                model = type(self.backend).__name__
            raise ValueError(
                f"sgl.{kind}(): the backend's model ({model}) is text-only; "
                f"{kind} inputs need a vision-language model"
            )

    # ---- the worker ------------------------------------------------------------------

    def _thread_worker_func(self):
        while True:
            item = self.queue.get()
            if item is None:
                self.queue.task_done()
                break
            expr, loc = item
            try:
                self._execute(expr)
            except BaseException as e:  # noqa: BLE001 - handed to the program and caller
                with self._lock:
                    self._worker_failed = True
                    if self.error_ is None:
                        self._set_error(e, loc)
                    self.queue.task_done()
                    # Drop whatever else was queued: the program cannot continue.
                    while True:
                        try:
                            self.queue.get_nowait()
                        except queue.Empty:
                            break
                        self.queue.task_done()
                self._release_waiters()
                break
            self.queue.task_done()
            if self.stream_text_event:
                self.stream_text_event.set()

        self.is_finished = True
        if self.stream_text_event:
            self.stream_text_event.set()

    def _execute(self, other):
        if isinstance(other, str):
            other = SglConstantText(other)
        assert isinstance(other, SglExpr), f"{other}"
        # The handler of the expression's class, or of the nearest base class that has one.
        handler = next((_EXPR_HANDLERS[cls] for cls in type(other).__mro__
                        if cls in _EXPR_HANDLERS), None)
        if handler is None:
            raise ValueError(f"Unknown type: {type(other)}")  # noqa: TRY004 - as SGLang
        handler(self, other)

    def _execute_constant_text(self, expr: SglConstantText) -> None:
        self._execute_fill(expr.value)

    def _execute_expr_list(self, expr: SglExprList) -> None:
        for x in expr.expr_list:
            self._execute(x)

    def _execute_concate_and_append(self, expr: SglConcateAndAppend) -> None:
        if global_config.enable_parallel_encoding and self.backend.support_concate_and_append:
            self._execute_concatenate_and_append_kv_cache(expr)
        else:
            self._execute_concatenate_and_append_text(expr)

    def _execute_fill(self, value: str, prefix=False):
        value = str(value)
        if (
            self.cur_role == "assistant"
            and self.num_api_spec_tokens is not None
            and getattr(self.backend, "is_chat_model", False)
            and not prefix
        ):
            self.backend.spec_fill(value)
            return
        if self.speculated_text.startswith(value):
            self.speculated_text = self.speculated_text[len(value) :]
        else:
            self.speculated_text = ""
        self.text_ += value

    def _execute_image(self, expr: SglImage):
        data = encode_image_base64(expr.path)
        path = expr.path if isinstance(expr.path, str) else "<image>"
        self.images_.append((path, data))
        self.cur_images.append((path, data))
        self.text_ += self.chat_template.image_token

    def _execute_video(self, expr: SglVideo):
        encode = getattr(self.backend, "encode_video_base64", None)
        if encode is None:
            raise NotImplementedError(
                "sgl.video(): this backend does not take video input "
                "(sglbatch.lang has no frame extractor)"
            )
        data = encode(expr.path, expr.num_frames)
        self.images_.append((expr.path, data))
        self.cur_images.append((expr.path, data))
        self.text_ += self.chat_template.image_token

    def _spec_gen(self, sampling_params):
        stop = sampling_params.stop
        max_new_tokens = sampling_params.max_new_tokens
        meta_info = {}

        def regen():
            nonlocal meta_info
            sampling_params.max_new_tokens = max(
                sampling_params.max_new_tokens, self.num_api_spec_tokens
            )
            sampling_params.stop = None
            self.speculated_text, meta_info = self.backend.generate(
                self, sampling_params=sampling_params
            )

        def find_stop():
            stops = [stop] if isinstance(stop, str) else list(stop)
            positions = [p for p in (self.speculated_text.find(x) for x in stops) if p != -1]
            return min(positions) if positions else -1

        if stop is None:
            if len(self.speculated_text) < max_new_tokens:
                regen()
            comp = self.speculated_text[:max_new_tokens]
            self.speculated_text = self.speculated_text[max_new_tokens:]
        elif isinstance(stop, (str, list, tuple)):
            if self.speculated_text == "":
                regen()
            stop_pos = find_stop()
            if stop_pos == -1:
                stop_pos = min(sampling_params.max_new_tokens, len(self.speculated_text))
            comp = self.speculated_text[:stop_pos]
            self.speculated_text = self.speculated_text[stop_pos:]
        else:
            raise ValueError("Wrong type of stop in sampling parameters.")
        return comp, meta_info

    def _execute_gen(self, expr: SglGen):
        sampling_params = self._resolve_sampling_params(expr.sampling_params)
        name = expr.name
        if not self.stream:
            if self.num_api_spec_tokens is None:
                comp, meta_info = self.backend.generate(self, sampling_params=sampling_params)
            elif getattr(self.backend, "is_chat_model", False):
                # Chat-only API: the calls are stored and run at the role's end.
                self.backend.generate(
                    self, sampling_params=sampling_params, spec_var_name=name
                )
                return
            else:
                comp, meta_info = self._spec_gen(sampling_params)

            if isinstance(comp, list):
                self.text_ += comp[0]
            else:
                assert isinstance(comp, str), f"backend returned {type(comp).__name__}"
                self.text_ += comp
            self.variables[name] = comp
            self.meta_info[name] = meta_info
            self.variable_event[name].set()
        else:
            if self.num_api_spec_tokens is not None:
                raise ValueError("stream is not supported with API speculative execution")
            generator = self.backend.generate_stream(self, sampling_params=sampling_params)
            self.variables[name] = ""
            self.stream_var_event[name].set()
            for comp, meta_info in generator:
                self.text_ += comp
                self.variables[name] += comp
                self.meta_info[name] = meta_info
                self.stream_var_event[name].set()
                self.stream_text_event.set()
            self.variable_event[name].set()
            self.stream_var_event[name].set()

    def _execute_select(self, expr: SglSelect):
        decision = self.backend.select(self, expr.choices, expr.temperature, expr.choices_method)
        if expr.name is not None:
            name = expr.name
            self.variables[name] = decision.decision
            self.meta_info[name] = decision.meta_info
            self.variable_event[name].set()
            if self.stream_var_event:
                self.stream_var_event[name].set()
        self.text_ += decision.decision

    def _execute_variable(self, expr: SglVariable):
        src_executor = expr.source_stream_executor
        self._execute_fill(src_executor.get_var(expr.name))

    def _execute_role_begin(self, expr: SglRoleBegin):
        if self.cur_role is not None:
            raise AssertionError(
                f"Nested roles are not allowed (role {expr.role!r} inside {self.cur_role!r})."
            )
        if len(self.messages_) == 0 and expr.role != "system":
            default_system = self.chat_template.default_system_prompt
            if default_system:
                self._execute_role_begin(SglRoleBegin("system"))
                self._execute_fill(default_system)
                self._execute_role_end(SglRoleEnd("system"))

        self.cur_role = expr.role
        prefix, _ = self.chat_template.get_prefix_and_suffix(expr.role, self.messages_)
        self._execute_fill(prefix, prefix=True)
        self.cur_role_begin_pos = len(self.text_)

    def _execute_role_end(self, expr: SglRoleEnd):
        if (
            self.cur_role == "assistant"
            and self.num_api_spec_tokens is not None
            and getattr(self.backend, "is_chat_model", False)
        ):
            self.backend.role_end_generate(self)
        self.cur_role = None

        new_text = self.text_[self.cur_role_begin_pos :].lstrip()
        _, suffix = self.chat_template.get_prefix_and_suffix(expr.role, self.messages_)
        self._execute_fill(suffix)

        if self.cur_images:
            content = [{"type": "text", "text": new_text}]
            for _, data in self.cur_images:
                content.append(
                    {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{data}"}}
                )
            self.messages_.append({"role": expr.role, "content": content})
            self.cur_images = []
        else:
            self.messages_.append({"role": expr.role, "content": new_text})

    def _execute_var_scope_begin(self, expr: SglVarScopeBegin):
        self.variables[expr.name] = len(self.text_)

    def _execute_var_scope_end(self, expr: SglVarScopeEnd):
        self.variables[expr.name] = self.text_[self.variables[expr.name] :]
        self.variable_event[expr.name].set()

    def _execute_commit_lazy_operations(self, expr: SglCommitLazy):
        self.backend.commit_lazy_operations(self)

    def _execute_concatenate_and_append_text(self, expr: SglConcateAndAppend):
        new_text = ""
        for s in expr.states:
            exe = s.stream_executor
            exe.sync()
            new_text += exe.text_[exe.fork_start_text_pos :]
        self._execute_fill(new_text)

    def _execute_concatenate_and_append_kv_cache(self, expr: SglConcateAndAppend):
        self_len = len(self.text_)
        for s in expr.states:
            s.stream_executor.submit(SglCommitLazy())
        for s in expr.states:
            exe = s.stream_executor
            exe.sync()
            assert exe.fork_start_text_pos == self_len
            self.text_ += exe.text_[exe.fork_start_text_pos :]
        src_rids = [state.stream_executor.sid for state in expr.states]
        self.backend.concatenate_and_append(src_rids, self.sid)

    def _execute_separate_reasoning(self, expr: SglSeparateReasoning):
        if self.stream:
            return  # as SGLang: not supported while streaming
        if (
            self.cur_role == "assistant"
            and self.num_api_spec_tokens is not None
            and getattr(self.backend, "is_chat_model", False)
        ):
            self.backend.role_end_generate(self)
        other = expr.expr
        if not other:
            return
        if isinstance(other, (SglGen, SglSelect)):
            cur_text = self.get_var(other.name)
            reasoning, normal_text = split_reasoning(cur_text, expr.model_type)
            reasoning_name = expr.process_name_for_reasoning(other.name)
            self.set_var(other.name, normal_text)
            self.set_var(reasoning_name, reasoning)
            self.variable_event.setdefault(reasoning_name, threading.Event()).set()
            if self.cur_role_begin_pos is not None:
                self.text_ = self.text_[: self.cur_role_begin_pos] + normal_text
        elif isinstance(other, SglExprList):
            for x in other.expr_list:
                self._execute_separate_reasoning(SglSeparateReasoning(expr.model_type, x))

    def _init_var_event(self, expr):
        if isinstance(expr, (SglGen, SglSelect, SglVarScopeBegin, SglSeparateReasoning)):
            self.variable_event[expr.name] = threading.Event()
            if self.stream:
                self.stream_var_event[expr.name] = threading.Event()
        elif isinstance(expr, SglExprList):
            for e in expr.expr_list:
                self._init_var_event(e)

    def _resolve_sampling_params(self, sampling_params):
        """The program's defaults (run(...) arguments) overridden by the gen's
        own non-None values, with the chat template's stop strings added."""
        clone = copy.deepcopy(self.default_sampling_para)
        for item in (
            "max_new_tokens",
            "min_new_tokens",
            "n",
            "stop",
            "stop_token_ids",
            "stop_regex",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "frequency_penalty",
            "presence_penalty",
            "ignore_eos",
            "return_logprob",
            "logprob_start_len",
            "top_logprobs_num",
            "return_text_in_logprobs",
            "dtype",
            "regex",
            "json_schema",
        ):
            value = getattr(sampling_params, item, None)
            if value is not None:
                setattr(clone, item, copy.copy(value))

        if self.chat_template.stop_str:
            stop = clone.stop
            stop = [] if not stop else ([stop] if isinstance(stop, str) else list(stop))
            stop += [x for x in self.chat_template.stop_str if x not in stop]
            clone.stop = stop
        clone.skip_special_tokens = global_config.skip_special_tokens_in_output
        clone.spaces_between_special_tokens = global_config.spaces_between_special_tokens_in_out
        return clone

    def __del__(self):
        # No module globals here: they may be gone at interpreter shutdown.
        try:
            self.end()
        except Exception:  # noqa: S110, BLE001 - never raise from a finalizer
            pass


# What StreamExecutor does with each kind of expression (see `_execute`).
_EXPR_HANDLERS: dict[type, Callable[[StreamExecutor, Any], None]] = {
    SglConstantText: StreamExecutor._execute_constant_text,
    SglGen: StreamExecutor._execute_gen,
    SglSelect: StreamExecutor._execute_select,
    SglExprList: StreamExecutor._execute_expr_list,
    SglRoleBegin: StreamExecutor._execute_role_begin,
    SglRoleEnd: StreamExecutor._execute_role_end,
    SglImage: StreamExecutor._execute_image,
    SglVideo: StreamExecutor._execute_video,
    SglVariable: StreamExecutor._execute_variable,
    SglVarScopeBegin: StreamExecutor._execute_var_scope_begin,
    SglVarScopeEnd: StreamExecutor._execute_var_scope_end,
    SglCommitLazy: StreamExecutor._execute_commit_lazy_operations,
    SglConcateAndAppend: StreamExecutor._execute_concate_and_append,
    SglSeparateReasoning: StreamExecutor._execute_separate_reasoning,
}
