"""The shared worker pool programs run on (sglbatch/lang/worker_pool.py): bounded, and it
cannot deadlock when work on the pool waits for work queued on the same pool."""

from __future__ import annotations

import threading

import pytest

import sglbatch as sgl
from sglbatch.lang import worker_pool
from sglbatch.lang.backend.base_backend import BaseBackend
from sglbatch.lang.worker_pool import WorkerPool

TIMEOUT_S = 60.0


def _within(seconds: float, fn):
    """fn() on a thread of its own; fails (instead of hanging) if it has not returned in
    time."""
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"not done after {seconds}s: deadlocked"
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_a_worker_waiting_for_a_queued_job_runs_it_itself():
    pool = WorkerPool(max_workers=1)
    ran_in = {}

    def inner():
        ran_in["inner"] = threading.current_thread()

    def outer():
        ran_in["outer"] = threading.current_thread()
        pool.submit(inner).wait()  # queued behind this job, on the pool's only worker

    _within(TIMEOUT_S, pool.submit(outer).wait)
    assert ran_in["inner"] is ran_in["outer"] is not threading.current_thread()


def test_a_thread_outside_the_pool_waits_for_the_workers():
    pool = WorkerPool(max_workers=1)
    release = threading.Event()
    pool.submit(release.wait)  # keeps the only worker busy
    ran_in = []
    job = pool.submit(lambda: ran_in.append(threading.current_thread()))
    threading.Timer(0.2, release.set).start()
    job.wait()
    assert ran_in and ran_in[0] is not threading.current_thread()


class _EchoBackend(BaseBackend):
    """Answers each gen with the length of its prompt; records the threads gens ran on."""

    def __init__(self):
        super().__init__()
        self.threads = set()

    def get_model_name(self):
        return "echo"

    def generate(self, s, sampling_params):
        self.threads.add(threading.get_ident())
        return f"<{len(s.text_)}>", {}

    def generate_stream(self, s, sampling_params):
        text, meta = self.generate(s, sampling_params)
        yield text[:2], meta
        yield text[2:], meta


@sgl.function
def _inner(s, x):
    s += "inner " + x + ":" + sgl.gen("y", max_tokens=4)


@sgl.function
def _forking(s, i, echo):
    """Waits, from the pool, for work it put on the pool: forks, a program it calls, a
    nested run_batch, a streamed program it reads."""
    s += f"program {i}:"
    forks = s.fork(3)
    forks += lambda k: f" fork {k}" + sgl.gen("f", max_tokens=4)
    forks.join()
    s += " called " + _inner.run(x=str(i), backend=echo)["y"]
    nested = _inner.run_batch([{"x": f"{i}.{k}"} for k in range(3)], backend=echo,
                              num_threads=3)
    s += " batch " + ",".join(state["y"] for state in nested)
    streamed = _inner.run(x=f"{i}s", backend=echo, stream=True)
    s += " streamed " + "".join(streamed.text_iter("y"))
    s += " end" + sgl.gen("z", max_tokens=4)


@pytest.fixture
def two_workers(monkeypatch):
    """A shared pool of two workers: far fewer than the programs waiting on it."""
    monkeypatch.setattr(worker_pool, "_shared", WorkerPool(max_workers=2))


def test_run_batch_of_forking_programs_on_a_pool_smaller_than_the_batch(two_workers):
    backend = _EchoBackend()
    # One at a time from this thread (the programs' own nested work still on the pool).
    expected = _within(TIMEOUT_S, lambda: [
        _forking.run(i=i, echo=backend, backend=backend) for i in range(8)])
    assert all(len(state["f"]) == 3 for state in expected)
    assert " batch <" in expected[0].text() and " streamed <" in expected[0].text()

    backend.threads.clear()
    # Eight programs at once on two workers, each waiting for work queued behind the rest:
    # a pool whose workers just block on queued work hangs here.
    states = _within(TIMEOUT_S, lambda: _forking.run_batch(
        [{"i": i, "echo": backend} for i in range(8)], backend=backend, num_threads=8))
    assert [s.text() for s in states] == [s.text() for s in expected]
    assert [sorted(s["f"]) for s in states] == [sorted(s["f"]) for s in expected]
    assert len(backend.threads) <= 2  # every gen ran on one of the pool's two workers
