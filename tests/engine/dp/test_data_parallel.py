"""Two replicas behind one front, on the real model: same greedy outputs as one engine,
outputs in the caller's order, errors naming the caller's index, one replica's death
failing only its requests."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from sglbatch import Engine, GenerateRequest, SamplingParams
from sglbatch.engine.errors import EngineError
from tests.engine.conftest import PROMPTS

GREEDY = {"temperature": 0, "max_new_tokens": 16}


@pytest.fixture(scope="module")
def dp_engine(smollm2_dir):
    with Engine(model_path=str(smollm2_dir), dtype="float32", kv_cache_gb=0.25,
                dp_size=2) as engine:
        yield engine


def test_greedy_outputs_equal_one_engine_in_the_callers_order(dp_engine, engine):
    expected = [o["text"] for o in engine.generate(PROMPTS, GREEDY)]
    assert [o["text"] for o in dp_engine.generate(PROMPTS, GREEDY)] == expected
    n2 = dp_engine.generate(PROMPTS[:3], {**GREEDY, "n": 2})
    assert [o["text"] for o in n2] == [t for t in expected[:3] for _ in range(2)]


def test_a_call_spreads_over_the_replicas_which_report_their_own_load(dp_engine):
    assert dp_engine.flush_cache()
    dp_engine.run([GenerateRequest(prompt=p, sampling_params=SamplingParams(max_new_tokens=1))
                   for p in PROMPTS])
    loads = dp_engine.loads()
    assert [load["dp_rank"] for load in loads] == [0, 1]
    assert all(load["num_used_tokens"] > 0 for load in loads)  # both cached prompts
    assert dp_engine.load()["num_used_tokens"] == sum(l["num_used_tokens"] for l in loads)
    assert dp_engine.stats.requests >= len(PROMPTS)


def test_bad_input_names_the_callers_index_and_runs_nothing(dp_engine):
    with pytest.raises(ValueError, match=r"prompt\[5\]: the prompt is empty"):
        dp_engine.generate(["a", "b", "c", "d", "e", ""], GREEDY)
    with pytest.raises(ValueError, match="top_p"):
        list(dp_engine.generate("Hi", {"top_p": 7}, stream=True))
    assert dp_engine.load()["num_running_reqs"] == 0


def test_a_dead_replica_fails_its_requests_and_the_other_serves_on(smollm2_dir):
    engine = Engine(model_path=str(smollm2_dir), dtype="float32", kv_cache_gb=0.25,
                    dp_size=2)
    try:
        long = {"temperature": 0, "max_new_tokens": 200, "ignore_eos": True}
        results: list[str] = []
        started = threading.Barrier(9)

        def client(i: int) -> None:
            stream = engine.generate(PROMPTS[i], long, stream=True)  # distinct: spread
            try:
                next(stream)
                started.wait(60)
                for _ in stream:
                    pass
                results.append("done")
            except EngineError as e:
                results.append(f"error: {e}")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        started.wait(60)
        victim = engine.loads()[1]["pid"]
        os.kill(victim, signal.SIGKILL)
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a client hung"
        assert len(results) == 8
        errors = [r for r in results if r.startswith("error")]
        assert errors and all("replica 1 died" in r for r in errors)
        out = engine.generate("Hello", GREEDY)  # the survivor takes new work
        assert out["meta_info"]["completion_tokens"] == 16
        assert [load["dp_rank"] for load in engine.loads()] == [0]
    finally:
        engine.shutdown()
    assert all(not r.process.is_alive() for r in engine._replicas)
