"""The radix cache in the engine: shared prefixes are reused, and tokens do not change."""

from __future__ import annotations

import pytest

from tests.engine.conftest import assert_pool_whole

GREEDY = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}


@pytest.fixture(scope="module")
def long_prefix(engine) -> str:
    text = ("The history of the printing press is a story of many inventors. " * 42)
    assert len(engine.tokenizer.encode(text)) > 500
    return text


def _run_pair(eng, prefix: str) -> list[dict]:
    first = eng.generate(prefix + "Question one: who was first?", GREEDY)
    second = eng.generate(prefix + "Question two: what changed?", GREEDY)
    return [first, second]


@pytest.fixture(scope="module")
def without_cache(smollm2_dir, long_prefix) -> list[list[int]]:
    from sglbatch.engine.engine import Engine

    with Engine(model_path=str(smollm2_dir), dtype="float32", disable_radix_cache=True) as eng:
        outs = _run_pair(eng, long_prefix)
        assert all(o["meta_info"]["cached_tokens"] == 0 for o in outs)
        assert eng.scheduler.cache is None
        assert_pool_whole(eng)
    return [o["output_ids"] for o in outs]


@pytest.mark.parametrize("engine_args", [
    pytest.param({}, id="default"),
    pytest.param({"chunked_prefill_size": 97}, id="chunked-prefill"),
    pytest.param({"max_total_tokens": 700, "chunked_prefill_size": 128}, id="small-pool"),
])
def test_shared_prefix_is_cached_and_tokens_unchanged(smollm2_dir, long_prefix, without_cache,
                                                      engine_args):
    from sglbatch.engine.engine import Engine

    with Engine(model_path=str(smollm2_dir), dtype="float32", **engine_args) as eng:
        first, second = _run_pair(eng, long_prefix)
        assert first["meta_info"]["cached_tokens"] == 0
        assert second["meta_info"]["cached_tokens"] >= 500
        assert [first["output_ids"], second["output_ids"]] == without_cache
        assert_pool_whole(eng)


def test_concurrent_requests_sharing_a_prefix_under_retraction(smollm2_dir, long_prefix,
                                                               without_cache):
    """Eight requests at once through a pool too small for all: retraction, eviction and
    cache hits mix, and each request still gets its cache-off tokens."""
    from sglbatch.engine.engine import Engine

    prompts = [long_prefix + q for q in ("Question one: who was first?",
                                         "Question two: what changed?")] * 4
    with Engine(model_path=str(smollm2_dir), dtype="float32", max_total_tokens=800,
                chunked_prefill_size=256) as eng:
        outs = eng.generate(prompts, {**GREEDY, "max_new_tokens": 40})
        assert [o["output_ids"][:16] for o in outs] == without_cache * 4
        assert sum(o["meta_info"]["cached_tokens"] for o in outs) >= 6 * 500
        assert eng.scheduler.num_retractions > 0, "the pool was meant to run dry"
        assert_pool_whole(eng)


def test_flush_cache_refused_while_running(engine):
    stream = engine.generate("Count slowly:", {"max_new_tokens": 200, "ignore_eos": True},
                             stream=True)
    next(stream)
    assert engine.flush_cache() is False
    stream.close()
    engine.generate("Hello", {"max_new_tokens": 1})
    assert engine.flush_cache() is True
