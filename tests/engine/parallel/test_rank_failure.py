"""A tensor-parallel rank that dies takes the engine down cleanly: every request in flight
fails with an EngineError naming the rank, new requests are refused, and nothing hangs or
outlives the engine, whether a worker dies or rank 0's own process does."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from sglbatch.engine.engine import Engine
from sglbatch.engine.errors import EngineError
from tests.engine.conftest import PROMPTS

GONE_WITHIN_S = 30.0
LONG = {"temperature": 0, "max_new_tokens": 400, "ignore_eos": True}


def _wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout_s:.0f}s")
        time.sleep(0.05)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead; only its parent's wait is missing.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_killing_a_worker_rank_fails_every_request_and_leaves_no_process(smollm2_dir):
    engine = Engine(model_path=str(smollm2_dir), dtype="float32", kv_cache_gb=0.1, tp_size=2)
    worker = engine.model_runner.peers.procs[0]
    errors: list[BaseException | None] = [None] * 4

    def generate(i: int) -> None:
        try:
            engine.generate(PROMPTS[i], LONG)
        except BaseException as e:
            errors[i] = e

    threads = [threading.Thread(target=generate, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    _wait_until(lambda: len(engine.scheduler.running) == 4, 60, "4 requests not decoding")
    os.kill(worker.pid, signal.SIGKILL)
    for t in threads:
        t.join(GONE_WITHIN_S)
    assert not any(t.is_alive() for t in threads), "a request hung"
    for error in errors:
        assert isinstance(error, EngineError), error
        assert "rank 1" in str(error) and "SIGKILL" in str(error)
    with pytest.raises(EngineError, match="engine stopped.*rank 1"):
        engine.generate("Hello", {"max_new_tokens": 2})
    shutdown = threading.Thread(target=engine.shutdown)
    shutdown.start()
    shutdown.join(GONE_WITHIN_S)
    assert not shutdown.is_alive(), "shutdown hung"
    assert not multiprocessing.active_children()


def test_workers_exit_when_rank_0_process_is_killed(smollm2_dir, tmp_path):
    # A real rank 0 process, killed with no chance to clean up: its workers see the pipe
    # close (or a collective fail) and exit on their own.
    script = tmp_path / "rank0.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from sglbatch.engine.engine import Engine
        if __name__ == "__main__":
            engine = Engine(model_path={str(smollm2_dir)!r}, dtype="float32",
                            kv_cache_gb=0.1, tp_size=2)
            print(engine.model_runner.peers.procs[0].pid, flush=True)
            stream = engine.generate("Count to a thousand:", {LONG!r}, stream=True)
            next(stream)
            print("decoding", flush=True)
            time.sleep(600)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            cwd=os.getcwd())
    try:
        worker_pid = int(proc.stdout.readline())
        assert proc.stdout.readline().strip() == "decoding"
        proc.kill()
        proc.wait()
        _wait_until(lambda: not _pid_alive(worker_pid), GONE_WITHIN_S,
                    f"worker {worker_pid} still running after rank 0 died")
    finally:
        proc.kill()
