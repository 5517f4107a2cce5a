"""Rank 0's handles on the other tensor-parallel ranks: worker processes (spawned; daemonic,
so they go when rank 0's process exits) each with a pipe.

The pipe carries each step's inputs (pickled once, sent to every worker) and tells each side
when the other is gone: a worker reads EOF when rank 0's process dies; rank 0's send fails
when a worker has died. A dead worker's sockets also fail every collective its peers are in.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from sglbatch.engine.batch import StepInputs

logger = logging.getLogger(__name__)

# How long a worker may take to exit once told to, before it is killed.
EXIT_GRACE_S = 5.0
# How long a collective's failure waits for the worker that caused it to be seen dead.
DEATH_NOTICE_S = 2.0


class Peers:
    def __init__(self, target: Callable[..., None], size: int, args: tuple[Any, ...]):
        """Start ranks 1..size-1 as `target(conn, rank, *args)`."""
        ctx = multiprocessing.get_context("spawn")  # fork would copy rank 0's threads
        self.conns: list[Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.lost: str | None = None  # why the group can run no more steps
        for rank in range(1, size):
            conn, child = ctx.Pipe()
            proc = ctx.Process(target=target, args=(child, rank, *args), daemon=True,
                               name=f"sglbatch-tp{rank}")
            proc.start()
            child.close()
            self.conns.append(conn)
            self.procs.append(proc)

    def expect(self, what: str, timeout_s: float) -> None:
        """Wait until every worker reports `what`; RuntimeError with the worker's own error
        if one failed, died or took longer than `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        for rank, (conn, proc) in enumerate(zip(self.conns, self.procs), start=1):
            while not conn.poll(0.1):
                if not proc.is_alive():
                    raise RuntimeError(f"tensor-parallel {_exit_text(rank, proc)} before "
                                       f"reporting {what!r}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"tensor-parallel rank {rank} did not report {what!r} "
                                       f"within {timeout_s:.0f}s")
            try:
                message = conn.recv()
            except EOFError:  # it exited (a script without the `if __name__ == "__main__":`
                proc.join(EXIT_GRACE_S)  # guard that spawn needs exits this way)
                raise RuntimeError(f"tensor-parallel {_exit_text(rank, proc)} before "
                                   f"reporting {what!r}") from None
            if message != what:
                raise RuntimeError(f"tensor-parallel rank {rank} failed: {message}")

    def send(self, inputs: StepInputs) -> None:
        data = pickle.dumps(inputs, protocol=pickle.HIGHEST_PROTOCOL)
        for conn in self.conns:
            conn.send_bytes(data)

    def fail(self, error: BaseException) -> str:
        """After a step failed on rank 0: say why (a dead worker, else the error itself) and
        close every worker: the ranks are out of step."""
        deadline = time.monotonic() + DEATH_NOTICE_S
        dead = None
        while dead is None and time.monotonic() < deadline:
            dead = next((_exit_text(rank, proc) for rank, proc in
                         enumerate(self.procs, start=1) if not proc.is_alive()), None)
            if dead is None:
                time.sleep(0.05)
        self.lost = (f"tensor-parallel {dead}" if dead else
                     f"tensor-parallel rank 0 failed mid-step ({type(error).__name__}: {error})")
        self.lost += "; the engine cannot run without all its ranks"
        logger.error("%s", self.lost)
        self.close()
        return self.lost

    def close(self) -> None:
        """Tell every worker to exit; kill the ones that do not within EXIT_GRACE_S."""
        for conn in self.conns:
            try:
                conn.send_bytes(pickle.dumps(None))
            except OSError:  # already gone
                pass
        deadline = time.monotonic() + EXIT_GRACE_S
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                logger.warning("tensor-parallel worker %s did not exit: killing it", proc.name)
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        self.conns = []
        self.lost = self.lost or "the engine was shut down"


def _exit_text(rank: int, proc: multiprocessing.process.BaseProcess) -> str:
    code = proc.exitcode
    how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else \
        f"exit code {code}"
    return f"rank {rank} (pid {proc.pid}) died ({how})"
