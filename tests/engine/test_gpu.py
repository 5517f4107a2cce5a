"""The engine on device="cuda": greedy tokens equal transformers' on the same GPU, and do not
change with the attention backend (triton, flashinfer), CUDA graphs or torch.compile.
All skipped without a CUDA GPU (see the root conftest.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.engine.conftest import PROMPTS

pytestmark = pytest.mark.gpu

NEW_TOKENS = 16
# EOS is masked on both sides (min_new_tokens here, as in transformers below): ignore_eos
# would keep emitting EOS wherever it is the argmax, which transformers never does.
GREEDY = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
# fp32 end to end, so any difference is a bug rather than rounding.
CUDA_ARGS = {"device": "cuda", "dtype": "float32", "kv_cache_gb": 0.5}


def _greedy(smollm2_dir, **engine_args) -> list[list[int]]:
    from sglbatch.engine.engine import Engine

    with Engine(model_path=str(smollm2_dir), **{**CUDA_ARGS, **engine_args}) as eng:
        return [o["output_ids"] for o in eng.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def triton_graph_ids(smollm2_dir) -> list[list[int]]:
    return _greedy(smollm2_dir, attention_backend="triton")


def test_greedy_on_cuda_equals_transformers(triton_graph_ids, hf_model, engine):
    model = hf_model.to("cuda")
    try:
        for prompt, got in zip(PROMPTS, triton_graph_ids):
            ids = torch.tensor([engine.tokenizer.encode(prompt)], device="cuda")
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
            assert got == out[0, ids.shape[1]:].tolist(), prompt
    finally:
        hf_model.to("cpu")


def test_cuda_graphs_do_not_change_greedy_tokens(smollm2_dir, triton_graph_ids):
    assert _greedy(smollm2_dir, attention_backend="triton",
                   disable_cuda_graph=True) == triton_graph_ids
    # A graph bucket smaller than the batch: the rest of the steps run eagerly.
    assert _greedy(smollm2_dir, attention_backend="triton",
                   cuda_graph_max_bs=3) == triton_graph_ids


def test_cuda_graphs_pad_batches_to_captured_sizes(smollm2_dir):
    from sglbatch.engine.engine import Engine

    with Engine(model_path=str(smollm2_dir), attention_backend="triton",
                cuda_graph_max_bs=16, **CUDA_ARGS) as eng:
        assert eng.model_runner.cuda_graph.sizes == [1, 2, 4, 8, 16]
        together = [o["output_ids"] for o in eng.generate(PROMPTS[:5], GREEDY)]  # pads to 8
        alone = [eng.generate(p, GREEDY)["output_ids"] for p in PROMPTS[:5]]
    assert together == alone


def test_torch_compile_with_cuda_graphs_keeps_greedy_tokens(smollm2_dir, triton_graph_ids):
    assert _greedy(smollm2_dir, attention_backend="triton",
                   enable_torch_compile=True) == triton_graph_ids


def test_torch_backend_on_cuda_keeps_greedy_tokens(smollm2_dir, triton_graph_ids):
    assert _greedy(smollm2_dir, attention_backend="torch") == triton_graph_ids


@pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None,
                    reason="flashinfer-python is not installed")
def test_flashinfer_equals_triton(smollm2_dir):
    """FlashInfer runs 16-bit only, so the backends are compared on the same bf16 batches
    (outputs within bf16 rounding), and the engine's greedy tokens on a short horizon."""
    from sglbatch.engine.engine import Engine
    from tests.engine.test_attention_triton import assert_backends_agree

    assert_backends_agree(("triton", "flashinfer"), torch.bfloat16, 2e-2)
    params = {**GREEDY, "max_new_tokens": 4, "min_new_tokens": 4}
    got = {}
    for backend in ("triton", "flashinfer"):
        with Engine(model_path=str(smollm2_dir), **{**CUDA_ARGS, "dtype": "bfloat16"},
                    attention_backend=backend) as eng:
            got[backend] = [o["output_ids"] for o in eng.generate(PROMPTS[:4], params)]
    assert got["flashinfer"] == got["triton"]


def test_sampling_and_grammar_on_cuda(smollm2_dir):
    """Seeded sampling, penalties and a JSON-schema mask, all on the GPU."""
    import json

    from sglbatch.engine.engine import Engine

    schema = {"type": "object", "properties": {"city": {"type": "string"}},
              "required": ["city"]}
    params = {"temperature": 0.8, "top_p": 0.9, "top_k": 50, "sampling_seed": 3,
              "frequency_penalty": 0.5, "max_new_tokens": 48, "json_schema": json.dumps(schema)}
    with Engine(model_path=str(smollm2_dir), **CUDA_ARGS) as eng:
        first = eng.generate("Name a city as JSON:", params)
        again = eng.generate("Name a city as JSON:", params)
    assert first["output_ids"] == again["output_ids"]
    assert "city" in json.loads(first["text"])
