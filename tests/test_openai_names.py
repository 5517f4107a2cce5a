"""The one OpenAI <-> SGLang sampling-name mapping."""

from __future__ import annotations

from sglbatch.engine.sampling_params import SamplingParams
from sglbatch.openai_names import FROM_OPENAI, SAME_NAME, TO_OPENAI, from_openai, to_openai


def test_every_mapped_name_is_a_sampling_parameter():
    fields = set(SamplingParams.__dataclass_fields__)
    assert set(TO_OPENAI) <= fields and set(SAME_NAME) <= fields


def test_round_trip_and_what_is_dropped():
    sglang = {"max_new_tokens": 8, "min_new_tokens": 2, "sampling_seed": 3, "top_k": 5,
              "temperature": 0.5, "stop": ["\n"]}
    openai = to_openai(sglang)
    assert openai == {"max_tokens": 8, "min_tokens": 2, "seed": 3, "top_k": 5,
                      "temperature": 0.5, "stop": ["\n"]}
    assert from_openai({**openai, "model": "m", "stream": True, "top_p": None}) == sglang
    assert FROM_OPENAI["max_tokens"] == "max_new_tokens"
