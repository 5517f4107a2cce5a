"""The bounded pool of threads that programs run on, and why it cannot deadlock.

Streamed programs, the programs of a ``run_batch``, and every StreamExecutor's queue of
expressions run as jobs of one shared pool instead of a thread each, so however many
programs, forks and nested batches are in flight, at most ``MAX_WORKERS`` threads run them.

Work on the pool waits for other work on the pool: a program for its own expressions, a
fork's join for the forks, a program for a program it calls, a nested ``run_batch`` for its
programs. A bounded pool hangs once every worker waits for jobs queued behind them, so a
worker never waits for a job that no thread has started: it runs that job itself
(``Job.help``; every wait of the interpreter helps first). A worker thus only ever waits for
work that some thread is running, and the pool always makes progress. Threads outside the
pool (the caller's) just block: they hold up no queued job, and a stream reader there keeps
getting text as it comes.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import threading
from collections.abc import Callable
from typing import Any

# As SGLang sizes run_batch's pool: enough that every program of an ordinary batch is in
# flight at once (the engine batches whatever is in flight). Threads start on demand.
MAX_WORKERS = max(512, multiprocessing.cpu_count() * 16)
# A worker that finds nothing to do for this long exits (another starts when needed).
IDLE_TIMEOUT_S = 30.0

_local = threading.local()


def in_worker() -> bool:
    """Whether this thread is a worker of a pool."""
    return getattr(_local, "is_worker", False)


class Job:
    """A call queued on a pool, run once: by a worker, or by a worker that waits for it
    before any thread has taken it."""

    def __init__(self, fn: Callable[..., Any], args: tuple):
        self._fn = fn
        self._args = args
        self._taken = threading.Lock()
        self._done = threading.Event()
        self._error: BaseException | None = None

    def run(self) -> None:
        """Runs the job in this thread, unless a thread has taken it already."""
        if not self._taken.acquire(blocking=False):
            return
        try:
            self._fn(*self._args)
        except BaseException as e:  # noqa: BLE001 - re-raised by wait()
            self._error = e
        finally:
            self._fn = self._args = None  # what it refers to (states, executors) may go
            self._done.set()

    def help(self) -> None:
        """On a worker: runs the job here if no thread has taken it (a worker must not wait
        for queued work). Elsewhere: nothing."""
        if in_worker():
            self.run()

    def wait(self) -> None:
        """Returns once the job has run (helping first); re-raises what it raised."""
        self.help()
        self._done.wait()
        if self._error is not None:
            raise self._error


class WorkerPool:
    """At most ``max_workers`` daemon threads taking the submitted jobs in order."""

    def __init__(self, max_workers: int = MAX_WORKERS):
        self.max_workers = max_workers
        self._cond = threading.Condition()
        self._jobs: collections.deque[Job] = collections.deque()
        self._num_workers = 0
        self._num_idle = 0

    def submit(self, fn: Callable[..., Any], *args: Any) -> Job:
        job = Job(fn, args)
        with self._cond:
            self._jobs.append(job)
            start = self._num_idle < len(self._jobs) and self._num_workers < self.max_workers
            if start:
                self._num_workers += 1
            else:
                self._cond.notify()
        if start:
            threading.Thread(target=self._work, name="sgl-worker", daemon=True).start()
        return job

    def _work(self) -> None:
        _local.is_worker = True
        while True:
            with self._cond:
                self._num_idle += 1
                while not self._jobs:
                    if not self._cond.wait(IDLE_TIMEOUT_S) and not self._jobs:
                        self._num_idle -= 1
                        self._num_workers -= 1
                        return
                self._num_idle -= 1
                job = self._jobs.popleft()
            job.run()  # nothing, if a waiting worker ran it already


_shared = WorkerPool()


def shared_pool() -> WorkerPool:
    """The pool every program and executor of this process runs on."""
    return _shared


def _new_pool_after_fork() -> None:
    # A forked child has none of the parent's threads: start from an empty pool.
    global _shared
    _shared = WorkerPool()


os.register_at_fork(after_in_child=_new_pool_after_fork)
