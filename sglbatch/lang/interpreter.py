"""The interpreter of the frontend language (SGLang-compatible).

Each running program has a ``StreamExecutor`` that runs the program's expressions in
order against a backend (with the handlers of ``expr_handlers``). ``s += gen(...)`` only
queues the expression and returns at once; the queue runs as a job of the shared worker
pool (``worker_pool``), so the program only waits where it reads a result
(``s["name"]``, ``s.text()``, a fork's join), and the engine sees the requests of every
running program together and batches them. A wait on a pool worker runs the queue itself
if no thread has taken it yet, so programs on the pool cannot starve it (see
``worker_pool``).

Errors: an expression that fails stops the program's executor; the error (with the
traceback of its execution, plus a note naming the program line that submitted the failing
expression) is re-raised in the program at its next ``s += ...`` or read, and in the
caller by ``state.text()``, ``state[name]``, ``state.sync()`` and ``run_batch``.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import linecache
import os
import sys
import threading
import uuid
from typing import Any

from sglbatch.lang.expr_handlers import ExpressionHandlers
from sglbatch.lang.ir import (
    SglCommitLazy,
    SglConstantText,
    SglExpr,
    SglExprList,
    SglGen,
    SglSelect,
    SglSeparateReasoning,
    SglVarScopeBegin,
    SglVideo,
)
from sglbatch.lang.media import encode_image_base64, find_media
from sglbatch.lang.reasoning import split_reasoning
from sglbatch.lang.worker_pool import Job, shared_pool

# Importable from here as before the helpers moved to modules of their own.
__all__ = [
    "StreamExecutor",
    "encode_image_base64",
    "merge_stream_meta_info",
    "resolve_backend",
    "split_reasoning",
]

_LANG_DIR = os.path.dirname(os.path.abspath(__file__))
_CONTEXTLIB_FILE = os.path.abspath(contextlib.__file__)


# --------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------


def _is_sglbatch_engine(obj: Any) -> bool:
    # An Engine or its data-parallel front: both are EngineClients.
    mod = sys.modules.get("sglbatch.engine.client")
    return mod is not None and isinstance(obj, mod.EngineClient)


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
# Where an expression came from (for error notes); streamed meta info
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


# Streamed meta info: per chunk, these keys hold the chunk's entries only.
_INCREMENTAL_STREAMING_META_INFO_KEYS = (
    "output_token_logprobs",
    "output_top_logprobs",
    "output_token_ids_logprobs",
)


def merge_stream_meta_info(pending: dict | None, meta_info: dict) -> dict:
    """A chunk's meta info with the entries of earlier chunks not yet handed out."""
    if pending is None:
        return meta_info
    merged = dict(meta_info)
    for key in _INCREMENTAL_STREAMING_META_INFO_KEYS:
        if key in meta_info or key in pending:
            merged[key] = list(pending.get(key) or []) + list(meta_info.get(key) or [])
    return merged


# --------------------------------------------------------------------------------------
# StreamExecutor
# --------------------------------------------------------------------------------------


class StreamExecutor(ExpressionHandlers):
    """Executes a program's expressions in order, as jobs of the shared worker pool (or,
    with ``use_thread=False``, at once in the submitting thread)."""

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

        # With use_thread (SGLang's name), submitted expressions wait in a queue that one
        # job of the shared pool at a time runs, in a copy of the creator's context.
        self.use_thread = use_thread
        self._queue: collections.deque[tuple[SglExpr, Any]] = collections.deque()
        self._queue_job: Job | None = None  # the job running the queue, while there is one
        self._queue_job_done = threading.Condition(self._lock)
        self._context = contextvars.copy_context()
        # The job running the program itself, when that runs on the pool (streamed runs).
        self.program_job: Job | None = None

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
            self._queue.append((expr, loc))
            if self._queue_job is None:
                self._queue_job = shared_pool().submit(self._context.copy().run, self._run_queue)
                if self.stream_text_event:
                    # A stream reader on a worker wakes up, to run the new job if need be.
                    self.stream_text_event.set()

    def _init_var_event(self, expr):
        if isinstance(expr, (SglGen, SglSelect, SglVarScopeBegin, SglSeparateReasoning)):
            self.variable_event[expr.name] = threading.Event()
            if self.stream:
                self.stream_var_event[expr.name] = threading.Event()
        elif isinstance(expr, SglExprList):
            for e in expr.expr_list:
                self._init_var_event(e)

    def sync(self):
        self._wait_queue()
        if self.error_ is not None:
            self._raise_error()

    def get_var(self, name):
        if name in self.variable_event:
            self._help_queue()
            self.variable_event[name].wait()
        if self.error_ is not None and name not in self.variables:
            self._raise_error()
        return self.variables[name]

    def set_var(self, name, value):
        self.variables[name] = value

    def get_meta_info(self, name, timeout=None):
        if name in self.variable_event:
            self._help_queue()
            if not self.variable_event[name].wait(timeout):
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
        self._wait_queue()
        return self.error_

    def end(self):
        with self._lock:
            if self._ended:
                return
            self._ended = True
            queue_running = self._queue_job is not None
        if not queue_running:
            self._finish()  # else the queue's job does, once it has run the queue
        try:
            self.backend.end_program(self)
        except Exception:  # noqa: S110, BLE001 - never fail a program at its end
            pass

    # ---- waiting ---------------------------------------------------------------------

    def help_pending(self):
        """On a pool worker: runs the program (a streamed run), then the queue, here if no
        thread has taken them yet, so that a worker never waits for queued work (see
        worker_pool). Elsewhere: nothing."""
        if self.program_job is not None:
            self.program_job.help()
        self._help_queue()

    def _help_queue(self):
        job = self._queue_job
        if job is not None:
            job.help()

    def _wait_queue(self):
        """Returns once every expression submitted so far has run (or the queue stopped at
        an error)."""
        while True:
            job = self._queue_job
            if job is None:
                return
            job.help()
            with self._lock:
                if self._queue_job is job:  # another thread runs it
                    self._queue_job_done.wait()

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
        """An exception of the program body in stream mode (the queue still runs what
        was submitted; readers get the error at the end)."""
        with self._lock:
            if self.error_ is None:
                self._set_error(error, note=False)
        if not self.use_thread:
            self.is_finished = True
            self._release_waiters()

    def _check_media(self, expr):
        media = find_media(expr)
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

    # ---- the queue's job -------------------------------------------------------------

    def _run_queue(self):
        """Runs the queued expressions in order, until none is left."""
        while True:
            with self._lock:
                if not self._queue:
                    self._queue_job = None
                    self._queue_job_done.notify_all()
                    ended = self._ended
                    break
                expr, loc = self._queue.popleft()
            try:
                self._execute(expr)
            except BaseException as e:  # noqa: BLE001 - handed to the program and caller
                with self._lock:
                    if self.error_ is None:
                        self._set_error(e, loc)
                    # Drop whatever else was queued: the program cannot continue.
                    self._queue.clear()
                    self._queue_job = None
                    self._queue_job_done.notify_all()
                self._release_waiters()
                self._finish()
                return
            if self.stream_text_event:
                self.stream_text_event.set()
        if ended:
            self._finish()

    def _finish(self):
        self.is_finished = True
        if self.stream_text_event:
            self.stream_text_event.set()

    def __del__(self):
        # No module globals here: they may be gone at interpreter shutdown.
        try:
            self.end()
        except Exception:  # noqa: S110, BLE001 - never raise from a finalizer
            pass
