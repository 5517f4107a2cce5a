"""The overlap schedule: step N+1 is launched before step N's tokens are read, and nothing a
caller sees changes. Every test runs the same requests with it on and off (the fp32 model:
exact comparisons) and compares whole outputs, over the paths where the one-step lag could
show: EOS and stop strings (a token launched after the finishing one is dropped), seeded
sampling (a request's step index counts tokens not read yet), chunked prefill, parallel
samples, requests that must be read first (grammars, penalties, logprobs), retraction when
the pool runs dry, and aborts."""

from __future__ import annotations

import pytest
import torch

from sglbatch.engine.overlap import FutureTokenMap
from tests.engine.conftest import PROMPTS, assert_pool_whole, same_outputs


@pytest.fixture(scope="module")
def engines(smollm2_dir):
    from sglbatch.engine.engine import Engine

    args = {"model_path": str(smollm2_dir), "dtype": "float32", "kv_cache_gb": 0.2,
            "chunked_prefill_size": 32}
    with Engine(**args) as overlap, Engine(disable_overlap_schedule=True, **args) as plain:
        yield overlap, plain


def test_steps_are_launched_before_the_previous_one_is_read(engines):
    """The order of launches and reads: with overlap every launch but the first comes
    before the previous step is read; without it, each step is read before the next."""
    orders = []
    for engine in engines:
        events: list[str] = []
        runner, scheduler = engine.model_runner, engine.scheduler
        launch, read = runner.launch, scheduler.process_output
        runner.launch = lambda batch: (events.append("launch"), launch(batch))[1]
        scheduler.process_output = lambda *a: (events.append("read"), read(*a))[1]
        try:
            engine.generate(PROMPTS[:2], {"temperature": 0, "max_new_tokens": 6,
                                          "ignore_eos": True})
        finally:
            del runner.launch, scheduler.process_output
        orders.append(events)
    overlapped, plain = orders
    assert plain == ["launch", "read"] * (len(plain) // 2)
    assert overlapped[:3] == ["launch", "launch", "read"]
    assert overlapped.count("launch") == overlapped.count("read") == len(plain) // 2


def test_greedy_with_eos_stop_strings_and_lengths(engines):
    params = [{"temperature": 0, "max_new_tokens": n} for n in (1, 3, 17, 40)]
    params += [{"temperature": 0, "max_new_tokens": 40, "stop": [" the", "."]},
               {"temperature": 0, "max_new_tokens": 40, "stop_token_ids": [13, 28]},
               {"temperature": 0, "max_new_tokens": 0},
               {"temperature": 0, "max_new_tokens": 64}]
    outputs = same_outputs(engines, PROMPTS, params)
    reasons = {o["meta_info"]["finish_reason"]["type"] for o in outputs}
    assert reasons == {"length", "stop"}, reasons  # both kinds of finish were exercised


def test_seeded_sampling_and_parallel_samples(engines):
    params = {"temperature": 0.9, "top_p": 0.9, "max_new_tokens": 24, "sampling_seed": 7,
              "n": 3}
    outputs = same_outputs(engines, PROMPTS[:4], params)
    assert len({tuple(o["output_ids"]) for o in outputs}) > 4  # samples differ


def test_requests_read_before_the_next_step_share_a_batch_with_others(engines):
    """A grammar, penalties and logprobs make a step's results be read at once; the plain
    requests beside them must not notice."""
    params = [{"temperature": 0, "max_new_tokens": 24},
              {"temperature": 0, "max_new_tokens": 24, "frequency_penalty": 0.5},
              {"temperature": 0, "max_new_tokens": 24, "regex": "(yes|no), [a-z ]+"},
              {"temperature": 0, "max_new_tokens": 24}]
    outputs = same_outputs(engines, PROMPTS[:4], params, return_logprob=[False, False, False, True])
    assert outputs[3]["meta_info"]["output_token_logprobs"]


def test_a_dry_pool_retracts_and_recomputes_the_same_tokens(smollm2_dir):
    from sglbatch.engine.engine import Engine

    args = {"model_path": str(smollm2_dir), "dtype": "float32", "max_total_tokens": 300,
            "chunked_prefill_size": 64}
    params = {"temperature": 0, "max_new_tokens": 48, "ignore_eos": True}
    with Engine(**args) as overlap, Engine(disable_overlap_schedule=True, **args) as plain:
        ours = same_outputs((overlap, plain), PROMPTS, params)
        assert overlap.scheduler.num_retractions > 0
    assert all(o["meta_info"]["completion_tokens"] == 48 for o in ours)


def test_an_abort_mid_decode_leaves_the_pool_whole(engines):
    overlap, _ = engines
    stream = overlap.generate(PROMPTS[4], {"temperature": 0, "max_new_tokens": 200,
                                           "ignore_eos": True}, stream=True, rid="to-abort")
    others = overlap.generate(PROMPTS[:3], {"temperature": 0, "max_new_tokens": 8})
    for n, _chunk in enumerate(stream):
        if n == 3:
            overlap.abort("to-abort")
    assert all(o["meta_info"]["completion_tokens"] > 0 for o in others)
    assert_pool_whole(overlap)


def test_future_token_map_resolves_placeholders_and_wraps():
    future = FutureTokenMap(max_rows=3, device=torch.device("cpu"))
    first = future.store(torch.tensor([10, 11, 12]))
    second = future.store(torch.tensor([20, 21]))
    assert first == [-1, -2, -3] and second == [-4, -5]
    ids = torch.tensor([5, first[2], second[0], 7])
    assert future.resolve(ids).tolist() == [5, 12, 20, 7]
    third = future.store(torch.tensor([30, 31]))  # no room after the second: wraps
    assert third == [-1, -2]
    assert future.resolve(torch.tensor(third + second)).tolist() == [30, 31, 20, 21]
    with pytest.raises(ValueError, match="4 rows sampled in one step; the map holds 3"):
        future.store(torch.tensor([1, 2, 3, 4]))
