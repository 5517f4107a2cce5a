"""Every tensor a forward, sampler, penalty, grammar-mask, logprob or attention path creates
names its device (see tests/device_follow.py). Each test runs one path with the check on and
fails listing the creation sites that would land on the wrong device on a GPU."""

from __future__ import annotations

import asyncio
import json

import pytest

from sglbatch import CustomLogitProcessor
from tests.device_follow import DeviceCheck, assert_all_named, checked


class _Halve(CustomLogitProcessor):
    def __call__(self, logits, custom_param_list=None):
        return logits / 2


def _requests_touching_every_path(tokenizer) -> list[tuple[list[int], dict, dict]]:
    """(input ids, sampling params, extras) that together reach each sampling feature, a
    cached prefix shared by several decodes (cascade decode), prompts chunked over several
    prefill steps, and more decodes of uneven length than one bucket holds."""
    shared = tokenizer.encode("You are a helpful assistant. Answer briefly and precisely, "
                              "citing one fact per sentence, in plain English. " * 3)
    reqs = []
    for i in range(3):  # a shared prefix of > 32 tokens
        reqs.append((shared + tokenizer.encode(f" Question {i}: what is {i} + {i}?"),
                     {"temperature": 0, "max_new_tokens": 6}, {}))
    reqs.append((shared * 3, {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "min_p": 0.05,
                              "sampling_seed": 1, "max_new_tokens": 5}, {}))
    reqs.append((shared[:20], {"frequency_penalty": 0.5, "presence_penalty": 0.3,
                               "repetition_penalty": 1.2, "logit_bias": {"42": 2.0},
                               "min_new_tokens": 3, "max_new_tokens": 5, "n": 2}, {}))
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    reqs.append((shared[:10], {"json_schema": json.dumps(schema), "max_new_tokens": 8}, {}))
    reqs.append((shared[:30], {"temperature": 0.7, "max_new_tokens": 4},
                 {"return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 3,
                  "token_ids_logprob": [5, 6]}))
    reqs.append((shared[:12], {"max_new_tokens": 3, "custom_params": {}},
                 {"custom_logit_processor": _Halve.to_str()}))
    # Uneven lengths, more than torch_native.DECODE_BUCKET decodes: bucketed decode.
    reqs += [(shared[:1 + 3 * i], {"temperature": 0, "max_new_tokens": 3}, {})
             for i in range(40)]
    return reqs


def _backends() -> list[str]:
    from sglbatch.engine.attention import cpu_kernels

    return ["torch"] + (["cpu"] if cpu_kernels.load() is not None else [])


@pytest.mark.parametrize("backend", _backends())
def test_engine_step_creates_every_tensor_on_a_named_device(smollm2_dir, backend):
    from sglbatch.engine.engine import Engine

    check = DeviceCheck()
    with Engine(model_path=str(smollm2_dir), dtype="float32", kv_cache_gb=0.1,
                attention_backend=backend, chunked_prefill_size=64,
                enable_custom_logit_processor=True) as engine:
        runner = engine.model_runner
        runner.launch = checked(runner.launch, check)
        reqs = _requests_touching_every_path(engine.tokenizer)

        async def submit_together():  # extras differ per request: one call each, one batch
            return await asyncio.gather(*(
                engine.async_generate(input_ids=ids, sampling_params=params, **extras)
                for ids, params, extras in reqs))

        results = asyncio.run(submit_together())
    reasons = [out["meta_info"]["finish_reason"]["type"]
               for result in results for out in (result if isinstance(result, list) else [result])]
    assert "abort" not in reasons
    assert_all_named(check)
