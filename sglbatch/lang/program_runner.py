"""Running programs: `run_program` (one program: synchronously, or streaming on a thread of
its own) and `run_program_batch` (many at once on a thread pool, so the engine sees all their
requests together), each over a StreamExecutor and returning ProgramStates."""

from __future__ import annotations

import contextvars
import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor

from sglbatch.lang.global_config import global_config
from sglbatch.lang.interpreter import StreamExecutor, resolve_backend
from sglbatch.lang.program_state import ProgramState


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
    """The program's own thread in stream mode: an exception in the program body
    is kept on the executor (text_iter re-raises it) instead of being lost."""
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
        t = threading.Thread(
            target=contextvars.copy_context().run,
            args=(_run_streaming, state, program, func_args, func_kwargs),
            name="sgl-program",
            daemon=True,
        )
        t.start()
        return state
    run_internal(state, program, func_args, func_kwargs, sync)
    return state


def _auto_num_threads(num_programs: int) -> int:
    # Enough threads that every program of an ordinary batch is in flight at once
    # (the engine batches whatever is in flight); capped for very large batches.
    return min(num_programs, max(512, multiprocessing.cpu_count() * 16))


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

    def update(self, *_):
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
        num_threads = _auto_num_threads(len(batch_arguments))
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
        with ThreadPoolExecutor(num_threads, thread_name_prefix="sgl-batch") as executor:
            futures = []
            for arguments in batch_arguments:
                fut = executor.submit(contextvars.copy_context().run, one, arguments)
                if pbar:
                    fut.add_done_callback(pbar.update)
                futures.append(fut)
            return [f.result() for f in futures]
    finally:
        if pbar:
            pbar.close()


def _run_program_batch_generator(one, batch_arguments, num_threads, progress_bar):
    """Yields the states in order, submitting in chunks so results flow while the
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
        with ThreadPoolExecutor(num_threads, thread_name_prefix="sgl-batch") as executor:
            for start in range(0, len(batch_arguments), chunk_size):
                futures = []
                for arguments in batch_arguments[start : start + chunk_size]:
                    fut = executor.submit(contextvars.copy_context().run, one, arguments)
                    if pbar:
                        fut.add_done_callback(pbar.update)
                    futures.append(fut)
                for fut in futures:
                    yield fut.result()
    finally:
        if pbar:
            pbar.close()
