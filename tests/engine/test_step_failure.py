"""A failed step never hangs anyone: the requests of a batch whose forward pass raised get
an EngineError, everything else runs on, and the KV pool stays whole. A failure elsewhere in
the step fails every request in flight and resets the bookkeeping; repeated failures stop
the engine, which then refuses work with a clear error and still shuts down."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from sglbatch.engine.errors import EngineError
from tests.engine.conftest import assert_pool_whole
from tests.fault_injection import MESSAGE, POISON, FirstCalls, fail_forward, has_poisoned_request

GREEDY = {"temperature": 0, "max_new_tokens": 8}
HANG = 120  # seconds: far more than any of these requests takes


@pytest.fixture
def engine(smollm2_dir):
    from sglbatch.engine.engine import Engine

    with Engine(model_path=str(smollm2_dir), dtype="float32", kv_cache_gb=0.1) as eng:
        yield eng


def _within(fn, *args, **kwargs):
    """fn's result, or pytest.fail if it does not return in time (a hang)."""
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(fn, *args, **kwargs)
        try:
            return future.result(timeout=HANG)
        except TimeoutError:
            pytest.fail(f"{fn.__name__} hung for {HANG}s")


def test_a_failed_forward_fails_its_requests_and_nothing_else(engine, monkeypatch):
    # Four poisoned steps here may come back to back (whether a decode step falls between
    # them is timing): this test is about isolation, not about stopping a failing engine.
    monkeypatch.setattr("sglbatch.engine.engine.MAX_CONSECUTIVE_STEP_FAILURES", 100)
    before = engine.generate("The capital of France is", GREEDY)
    fail_forward(engine, has_poisoned_request)
    # A long request decodes while the poisoned one's prefill fails.
    stream = engine.generate("Count to fifty:", {"temperature": 0, "max_new_tokens": 40,
                                                 "ignore_eos": True}, stream=True)
    first = next(stream)
    with pytest.raises(EngineError, match=MESSAGE):
        _within(engine.generate, "Hello", GREEDY, rid=f"{POISON}-1")
    with pytest.raises(EngineError, match=MESSAGE):  # n > 1: the held samples fail too
        _within(engine.generate, "Hi there", {**GREEDY, "n": 3}, rid=f"{POISON}-2")
    with pytest.raises(EngineError, match="of 3 requests failed"):  # one batch, one fate
        _within(engine.generate, ["a", "b", "c"], GREEDY,
                rid=[f"{POISON}-3", "fine-3", f"{POISON}-4"])
    rest = _within(list, stream)
    assert len(first["output_ids"]) + sum(len(d["output_ids"]) for d in rest) == 40
    assert rest[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert _within(engine.generate, "The capital of France is", GREEDY)["text"] == \
        before["text"]
    assert_pool_whole(engine)


def test_a_failed_streaming_request_raises_from_its_iterator(engine):
    fail_forward(engine, has_poisoned_request)
    stream = engine.generate("Hello", GREEDY, rid=f"{POISON}-s", stream=True)
    with pytest.raises(EngineError, match=MESSAGE):
        _within(list, stream)
    assert _within(engine.generate, "Hello", GREEDY)["meta_info"]["completion_tokens"] == 8
    assert_pool_whole(engine)


def test_a_failure_outside_the_forward_fails_what_is_in_flight_and_the_engine_recovers(
        engine):
    scheduler = engine.scheduler
    process_output = scheduler.process_output

    def broken_once(*args):
        scheduler.process_output = process_output  # only this scheduler, only once
        raise RuntimeError("bookkeeping failed")

    scheduler.process_output = broken_once
    with pytest.raises(EngineError, match="bookkeeping failed"):
        _within(engine.generate, ["one", "two"], GREEDY)
    assert engine.scheduler is not scheduler  # fresh bookkeeping over emptied pools
    assert _within(engine.generate, "Hello", GREEDY)["meta_info"]["completion_tokens"] == 8
    assert_pool_whole(engine)


def test_repeated_failures_stop_the_engine_which_refuses_work_and_shuts_down(engine):
    fail_forward(engine, FirstCalls(10**6))
    for _ in range(3):
        with pytest.raises(EngineError, match=MESSAGE):
            _within(engine.generate, "Hello", GREEDY)
    with pytest.raises(EngineError, match="stopped after 3 failed steps in a row.*restart"):
        engine.generate("Hello", GREEDY)
    shutdown = threading.Thread(target=engine.shutdown)
    shutdown.start()
    shutdown.join(HANG)
    assert not shutdown.is_alive(), "shutdown hung"
