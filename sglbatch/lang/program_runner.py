"""Running programs: `run_program` (one program: synchronously in the caller's thread, or
streaming as a job of the shared worker pool) and `run_program_batch` (many at once, at most
`num_threads` in flight, on that same pool, so the engine sees all their requests together),
each over a StreamExecutor and returning ProgramStates."""

from __future__ import annotations

import contextvars
import threading

from sglbatch.lang.global_config import global_config
from sglbatch.lang.interpreter import StreamExecutor, resolve_backend
from sglbatch.lang.program_state import ProgramState
from sglbatch.lang.worker_pool import MAX_WORKERS, shared_pool


def run_internal(state, program, func_args, func_kwargs, sync):
    try:
        state.ret_value = program.func(state, *func_args, **func_kwargs)
    finally:
        state.stream_executor.end()

    if sync:
        state.stream_executor.sync()

    if global_config.verbosity >= 2:
        print(state.text())


def _run_streaming(state, program, func_args, func_kwargs):
    """The program's job in stream mode: an exception in the program body is kept on
    the executor (text_iter re-raises it) instead of being lost."""
    exe = state.stream_executor
    try:
        state.ret_value = program.func(state, *func_args, **func_kwargs)
    except BaseException as e:  # noqa: BLE001 - handed to the reader
        exe._record_external_error(e)
    finally:
        exe.end()


def run_program(
    program,
    backend,
    func_args,
    func_kwargs,
    default_sampling_para,
    stream,
    sync=False,
    use_thread=True,
):
    backend = resolve_backend(backend)
    func_kwargs = dict(func_kwargs)
    func_kwargs.update(program.bind_arguments)
    stream_executor = StreamExecutor(
        backend,
        func_kwargs,
        default_sampling_para,
        chat_template=None,
        stream=stream,
        num_api_spec_tokens=program.num_api_spec_tokens,
        use_thread=use_thread,
    )
    state = ProgramState(stream_executor)

    if stream:
        stream_executor.program_job = shared_pool().submit(
            contextvars.copy_context().run, _run_streaming, state, program, func_args,
            func_kwargs,
        )
        return state
    run_internal(state, program, func_args, func_kwargs, sync)
    return state


class _Progress:
    """tqdm if installed (as SGLang), else rich."""

    def __init__(self, total: int):
        self._tqdm = None
        self._rich = None
        self._lock = threading.Lock()
        try:
            import tqdm

            self._tqdm = tqdm.tqdm(total=total)
        except ImportError:
            from rich.progress import Progress

            self._rich = Progress()
            self._rich.start()
            self._task = self._rich.add_task("programs", total=total)

    def update(self):
        with self._lock:
            if self._tqdm is not None:
                self._tqdm.update(1)
            else:
                self._rich.advance(self._task)

    def close(self):
        if self._tqdm is not None:
            self._tqdm.close()
        else:
            self._rich.stop()


class _BatchRun:
    """`one(arguments)` for each of a batch's arguments, run by `num_lanes` jobs of the
    shared pool that each take the next arguments no lane has taken: at most num_lanes
    programs in flight, started in order, as on a pool of num_lanes threads. Each program
    runs in a copy of the caller's context."""

    def __init__(self, one, batch_arguments, num_lanes, pbar):
        self._one = one
        self._arguments = batch_arguments
        self._pbar = pbar
        self._context = contextvars.copy_context()
        self._lock = threading.Lock()
        self._next = 0
        n = len(batch_arguments)
        self._states = [None] * n
        self._errors: list[BaseException | None] = [None] * n
        self._done = [threading.Event() for _ in range(n)]
        self._lanes = [shared_pool().submit(self._lane) for _ in range(min(num_lanes, n))]

    def _lane(self):
        while True:
            with self._lock:
                i = self._next
                self._next += 1
            if i >= len(self._arguments):
                return
            try:
                self._states[i] = self._context.copy().run(self._one, self._arguments[i])
            except BaseException as e:  # noqa: BLE001 - re-raised by result()
                self._errors[i] = e
            self._done[i].set()
            if self._pbar:
                self._pbar.update()

    def result(self, i: int):
        """Program i's state, once it has finished; re-raises what it raised."""
        if not self._done[i].is_set():
            for lane in self._lanes:
                lane.help()  # a pool worker must not wait for lanes still queued
            self._done[i].wait()
        if self._errors[i] is not None:
            raise self._errors[i]
        return self._states[i]

    def wait(self):
        """Returns once every program has finished."""
        for lane in self._lanes:
            lane.wait()


def run_program_batch(
    program,
    backend,
    batch_arguments,
    default_sampling_para,
    num_threads,
    progress_bar,
    generator_style=False,
):
    backend = resolve_backend(backend)

    if num_threads == "auto":
        # Every program of an ordinary batch in flight at once (the engine batches whatever
        # is in flight), as many as the pool runs at a time for very large batches.
        num_threads = MAX_WORKERS
    num_threads = max(1, min(int(num_threads), len(batch_arguments)))

    def one(arguments):
        return run_program(
            program, backend, (), arguments, default_sampling_para, False, True
        )

    if generator_style:
        return _run_program_batch_generator(one, batch_arguments, num_threads, progress_bar)

    pbar = _Progress(len(batch_arguments)) if progress_bar else None
    try:
        if num_threads == 1:
            rets = []
            for arguments in batch_arguments:
                rets.append(one(arguments))
                if pbar:
                    pbar.update()
            return rets
        batch = _BatchRun(one, batch_arguments, num_threads, pbar)
        batch.wait()
        return [batch.result(i) for i in range(len(batch_arguments))]
    finally:
        if pbar:
            pbar.close()


def _run_program_batch_generator(one, batch_arguments, num_threads, progress_bar):
    """Yields the states in order, running the batch in chunks so results flow while the
    rest runs."""
    pbar = _Progress(len(batch_arguments)) if progress_bar else None
    try:
        if num_threads == 1:
            for arguments in batch_arguments:
                yield one(arguments)
                if pbar:
                    pbar.update()
            return
        chunk_size = max(200, num_threads)
        for start in range(0, len(batch_arguments), chunk_size):
            chunk = batch_arguments[start : start + chunk_size]
            batch = _BatchRun(one, chunk, num_threads, pbar)
            try:
                for i in range(len(chunk)):
                    yield batch.result(i)
            finally:
                batch.wait()  # the chunk's other programs run to their end
    finally:
        if pbar:
            pbar.close()
