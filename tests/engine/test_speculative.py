"""NGRAM speculative decoding: drafts from each request's own tokens, checked in one extend
pass. A request's outputs must be exactly those of plain greedy decoding (the fp32 model:
exact comparisons) whatever finishes it (length, EOS, stop tokens, stop strings), beside
requests that cannot speculate, across chunked prefill, the prefix cache and aborts; and
the rejected drafts' slots must go back to the pool."""

from __future__ import annotations

import pytest

from sglbatch.bench.step_sizes import step_rows
from sglbatch.engine.ngram import NgramIndex
from sglbatch.engine.stats import EngineStats
from tests.device_follow import DeviceCheck, assert_all_named, checked
from tests.engine.conftest import PROMPTS, assert_pool_whole, same_outputs

# Prompts whose greedy continuations repeat their context: drafts get accepted.
REPETITIVE = [
    "Count from 1 to 30, separated by commas: 1, 2, 3, 4,",
    "Repeat this line five times: the cat sat on the mat. the cat sat on the mat.",
    "A A B A A B A A B A A B",
]


def _index(max_window: int, tokens: list[int]) -> NgramIndex:
    index = NgramIndex(max_window)
    index.extend(tokens)
    return index


def test_ngram_index_drafts_what_followed_the_longest_recent_match():
    index = _index(3, [1, 2, 3, 4, 1, 2])
    # Suffix [1, 2] last occurred ending at 2: what followed it is drafted.
    assert index.propose(3) == [3, 4, 1]
    # The sequence grew (indexed incrementally): [2, 3] matches, then [9, 3] does not, and
    # the 1-token [3] last ended at 7.
    index.extend([3])
    assert index.propose(2) == [4, 1]
    index.extend([9, 3])
    assert index.propose(2) == [9, 3]
    # The longest window wins over a more recent shorter match.
    assert _index(3, [1, 2, 3, 4, 5, 3, 6, 1, 2, 3]).propose(2) == [4, 5]
    # The most recent occurrence wins.
    assert _index(1, [5, 6, 5, 7, 5]).propose(1) == [7]


def test_ngram_index_continues_a_loop_past_the_sequence_end():
    assert _index(2, [7, 7, 7, 7]).propose(4) == [7, 7, 7, 7]
    assert _index(3, [1, 2, 3, 1, 2, 3, 1]).propose(5) == [2, 3, 1, 2, 3]


def test_ngram_index_without_a_match_drafts_nothing():
    index = _index(4, [5, 6, 7])
    assert index.propose(4) == []
    index.extend([8])
    assert index.propose(0) == []


@pytest.fixture(scope="module")
def engines(smollm2_dir):
    from sglbatch.engine.engine import Engine

    args = {"model_path": str(smollm2_dir), "dtype": "float32", "kv_cache_gb": 0.2,
            "chunked_prefill_size": 32}
    with Engine(speculative_algorithm="ngram", **args) as spec, Engine(**args) as plain:
        yield spec, plain


def _same(engines, prompts, params, **kwargs) -> list[dict]:
    """Both engines' outputs for one call, checked equal; the speculative engine's returned,
    after checking that it ran verify steps that accepted drafts."""
    before = engines[0].stats.snapshot()
    ours = same_outputs(engines, prompts, params, **kwargs)
    verify = [row for row in step_rows(before, engines[0].stats.snapshot())
              if row["mode"] == "verify"]
    assert verify, "no verify step ran"
    assert sum(r["tokens"] for r in verify) > sum(r["steps"] for r in verify), \
        "verify steps gave no more tokens than plain decode steps would have"
    return ours


def test_greedy_outputs_are_plain_decodings_at_every_length(engines):
    prompts = REPETITIVE + PROMPTS
    params = [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True}
              for n in (1, 2, 3, 5, 8, 13, 40, 64, 17, 29, 50)]
    outs = _same(engines, prompts, params)
    assert [o["meta_info"]["completion_tokens"] for o in outs] == \
        [p["max_new_tokens"] for p in params]


def test_eos_stop_tokens_and_stop_strings_end_a_verify_step_where_plain_decoding_would(
        engines):
    prompts = REPETITIVE * 3
    params = [{"temperature": 0, "max_new_tokens": 60},
              {"temperature": 0, "max_new_tokens": 60, "stop": [" mat", ","]},
              {"temperature": 0, "max_new_tokens": 60, "stop": ["B A"], "no_stop_trim": True},
              {"temperature": 0, "max_new_tokens": 60, "stop_token_ids": [28, 30]},
              {"temperature": 0, "max_new_tokens": 60, "stop_token_ids": [338]},
              {"temperature": 0, "max_new_tokens": 60, "stop": ["5,"]},
              {"temperature": 0, "max_new_tokens": 60, "ignore_eos": True, "stop": ["14"]},
              {"temperature": 0, "max_new_tokens": 60, "stop_token_ids": [330]},
              {"temperature": 0, "max_new_tokens": 60, "stop": [" A A B A"]}]
    outs = _same(engines, prompts, params)
    reasons = {o["meta_info"]["finish_reason"]["type"] for o in outs}
    assert reasons == {"length", "stop"}, reasons


def test_requests_that_cannot_speculate_share_verify_steps(engines):
    """Seeded sampling, logprobs, penalties and min_new_tokens rows run as 1-token rows of
    the verify step, sampled as in a decode step."""
    prompts = REPETITIVE + REPETITIVE[:2]
    params = [{"temperature": 0, "max_new_tokens": 40, "ignore_eos": True},
              {"temperature": 0.8, "sampling_seed": 7, "max_new_tokens": 40, "ignore_eos": True},
              {"temperature": 0, "max_new_tokens": 40, "frequency_penalty": 0.5},
              {"temperature": 0, "max_new_tokens": 40, "min_new_tokens": 30},
              {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}]
    outs = _same(engines, prompts, params, return_logprob=[False] * 4 + [True],
                 top_logprobs_num=2)
    assert len(outs[4]["meta_info"]["output_token_logprobs"]) == 40


def test_cached_prefixes_and_chunked_prompts(engines):
    """A second call finds the first one's tokens (accepted drafts included) in the prefix
    cache; long prompts are prefilled in 32-token chunks."""
    spec, plain = engines
    prompts = [REPETITIVE[0] * 3, REPETITIVE[1] * 2, PROMPTS[7]]
    params = {"temperature": 0, "max_new_tokens": 48, "ignore_eos": True}
    ref = [o["output_ids"] for o in plain.generate(prompts, params)]
    first = spec.generate(prompts, params)
    again = spec.generate([p + "" for p in prompts], params)
    assert [o["output_ids"] for o in first] == ref
    assert [o["output_ids"] for o in again] == ref
    assert all(o["meta_info"]["cached_tokens"] > 0 for o in again)
    for engine in engines:
        assert_pool_whole(engine)


def test_a_verify_step_creates_every_tensor_on_a_named_device(engines):
    """Its logits split and its rows' index must follow the model's device (on a GPU a
    host tensor there fails or syncs)."""
    spec, _ = engines
    runner, check = spec.model_runner, DeviceCheck()
    runner.launch = checked(runner.launch, check)
    try:
        _same(engines, REPETITIVE, {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True})
    finally:
        del runner.launch  # the class's method again
    assert_all_named(check)


def test_speculation_stops_above_its_batch_size(smollm2_dir):
    from sglbatch.engine.engine import Engine

    with Engine(model_path=str(smollm2_dir), dtype="float32", kv_cache_gb=0.2,
                speculative_algorithm="NGRAM", speculative_max_batch_size=2) as engine:
        # Three requests decode together, then one alone once the shorter two are done.
        engine.generate(REPETITIVE, [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True}
                                     for n in (4, 6, 30)])
        counts = engine.stats.snapshot().step_counts
    assert any(mode == "decode" and size >= 3 for mode, size in counts)
    assert all(size <= 2 for mode, size in counts if mode == "verify")
    assert any(mode == "verify" for mode, _ in counts)


def test_an_abort_mid_verify_leaves_the_pool_whole(engines):
    spec, _ = engines
    stream = spec.generate(REPETITIVE[0], {"temperature": 0, "max_new_tokens": 200,
                                           "ignore_eos": True}, stream=True, rid="to-abort")
    for i, _ in enumerate(stream):
        if i == 3:
            spec.abort("to-abort")
    assert_pool_whole(spec)


def test_step_table_lists_verify_steps_with_the_tokens_they_gave():
    before, after = EngineStats(), EngineStats()
    after.on_step("decode", 4, 4, 0.1)
    after.on_step("verify", 4, 11, 0.2)
    after.on_step("verify", 1, 3, 0.05)
    rows = step_rows(before, after)
    assert [(r["mode"], r["batch_sizes"], r["tokens"]) for r in rows] == [
        ("decode", "3-4", 4), ("verify", "1", 3), ("verify", "3-4", 11)]


@pytest.mark.parametrize("kwargs, field", [
    ({"speculative_algorithm": "EAGLE"}, "speculative_algorithm"),
    ({"speculative_algorithm": "NGRAM", "speculative_num_draft_tokens": 1},
     "speculative_num_draft_tokens"),
    ({"speculative_algorithm": "NGRAM", "enable_deterministic_inference": True},
     "enable_deterministic_inference"),
    ({"speculative_algorithm": "NGRAM", "speculative_max_batch_size": 0},
     "speculative_max_batch_size"),
])
def test_bad_speculative_settings_name_the_field(kwargs, field):
    from sglbatch.engine.config import EngineConfig

    with pytest.raises(ValueError, match=field):
        EngineConfig(**kwargs)
