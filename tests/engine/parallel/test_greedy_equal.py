"""Tensor parallelism on the CPU (gloo, fp32): greedy tokens at tp 2 equal tp 1 on the default
model (its 9 query / 3 KV heads split unevenly, 2 groups and 1), also with the prefix cache
on GSM8K few-shot prompts. Rank 0's forward creates every tensor on a named device.
(One tensor-parallel engine per process: tiny models are in test_tp_tiny_llama.py.)"""

from __future__ import annotations

import pytest

from sglbatch.bench.gsm8k import few_shot_prefix, load_gsm8k, question_prompt
from sglbatch.engine.engine import Engine
from tests.conftest import SHARED_GSM8K
from tests.device_follow import DeviceCheck, assert_all_named, checked
from tests.engine.conftest import PROMPTS, assert_pool_whole

GREEDY = {"temperature": 0, "max_new_tokens": 32}


@pytest.fixture(scope="module")
def tp2(smollm2_dir):
    with Engine(model_path=str(smollm2_dir), dtype="float32", kv_cache_gb=0.2,
                tp_size=2) as eng:
        yield eng


def _ids(outputs):
    return [o["output_ids"] for o in outputs]


def test_tp2_greedy_equals_tp1(engine, tp2):
    assert tp2.model_runner.shard.num_q_heads == 6  # rank 0: two of the three groups
    assert _ids(tp2.generate(PROMPTS, GREEDY)) == _ids(engine.generate(PROMPTS, GREEDY))
    assert_pool_whole(tp2)


def test_tp2_gsm8k_few_shot_with_prefix_cache_equals_tp1(engine, tp2):
    prefix = few_shot_prefix(load_gsm8k("train", SHARED_GSM8K), 5)
    prompts = [prefix + question_prompt(row["question"])
               for row in load_gsm8k("test", SHARED_GSM8K)[:24]]
    params = {"temperature": 0, "max_new_tokens": 12}
    ours = tp2.generate(prompts, params)
    assert sum(o["meta_info"]["cached_tokens"] for o in ours) > 20 * len(prefix) // 8
    assert _ids(ours) == _ids(engine.generate(prompts, params))
    assert_pool_whole(tp2)


def test_tp2_rank0_names_devices_and_input_logprobs_match(engine, tp2):
    runner, check = tp2.model_runner, DeviceCheck()
    runner.launch = checked(runner.launch, check)
    params = {"temperature": 0, "max_new_tokens": 4}
    extras = {"return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2}
    try:
        ours = tp2.generate(PROMPTS[:3], params, **extras)
    finally:
        del runner.launch  # the class's method again
    assert_all_named(check)
    ref = engine.generate(PROMPTS[:3], params, **extras)
    assert _ids(ours) == _ids(ref)
    for a, b in zip(ours, ref):
        lp_a = [lp for lp, *_ in a["meta_info"]["input_token_logprobs"] if lp is not None]
        lp_b = [lp for lp, *_ in b["meta_info"]["input_token_logprobs"] if lp is not None]
        assert lp_a == pytest.approx(lp_b, abs=1e-4)
