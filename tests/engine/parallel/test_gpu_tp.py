"""Tensor parallelism on CUDA (NCCL): tp 2 greedy tokens equal tp 1. Needs two GPUs; run by
benchmarks/gpu_check.py where there are, skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

from sglbatch.engine.engine import Engine
from tests.engine.conftest import PROMPTS

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="tp 2 needs two GPUs")]

GREEDY = {"temperature": 0, "max_new_tokens": 32}


def test_tp2_on_two_gpus_equals_tp1(smollm2_dir):
    kwargs = {"model_path": str(smollm2_dir), "dtype": "float32", "kv_cache_gb": 1.0,
              "device": "cuda"}
    with Engine(**kwargs) as one:
        expected = [o["output_ids"] for o in one.generate(PROMPTS, GREEDY)]
    with Engine(**kwargs, tp_size=2) as two:
        assert [o["output_ids"] for o in two.generate(PROMPTS, GREEDY)] == expected
