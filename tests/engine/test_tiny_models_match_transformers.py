"""Random-initialised tiny models: the engine's layers give transformers' logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sglbatch.engine.batch import Batch, ForwardMode
from sglbatch.engine.config import EngineConfig
from sglbatch.engine.model_runner import ModelRunner
from sglbatch.engine.request import Req
from sglbatch.engine.sampling_params import SamplingParams

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def _tiny(kind: str):
    import transformers as tf

    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**TINY, tie_word_embeddings=False))
    if kind == "llama3-rope-scaling":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
                "rope_theta": 500000.0}
        return tf.LlamaForCausalLM(tf.LlamaConfig(**TINY, rope_parameters=rope,
                                                  tie_word_embeddings=True))
    if kind == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**TINY, head_dim=24, sliding_window=None))
    raise AssertionError(kind)


@pytest.fixture(params=["qwen2", "llama3-rope-scaling", "mistral"])
def tiny_model(request, tmp_path: Path):
    torch.manual_seed(0)
    model = _tiny(request.param).eval()
    # transformers zero-initialises biases and norms start at 1; randomise everything so a
    # dropped bias or a skipped norm weight cannot pass unnoticed.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(tmp_path)
    return model, tmp_path


def _prefill_batch(runner: ModelRunner, prompts: list[list[int]]) -> Batch:
    reqs = []
    for i, ids in enumerate(prompts):
        req = Req(f"r{i}", ids, SamplingParams(temperature=0))
        req.req_pool_idx = runner.req_to_token_pool.alloc()
        reqs.append(req)
    slots = runner.kv_pool.alloc(sum(len(p) for p in prompts))
    start = 0
    for req in reqs:
        runner.req_to_token_pool.table[req.req_pool_idx, :len(req.input_ids)] = \
            slots[start:start + len(req.input_ids)]
        start += len(req.input_ids)
    return Batch(ForwardMode.EXTEND, reqs, [len(p) for p in prompts], slots)


def test_prefill_logits_match_transformers(tiny_model):
    hf, model_dir = tiny_model
    runner = ModelRunner(EngineConfig(model_path=str(model_dir), dtype="float32",
                                      max_total_tokens=512, max_running_requests=4), model_dir)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (5, 200, 37)]
    ours = runner.forward(_prefill_batch(runner, prompts), all_logits=True)
    start = 0
    for ids in prompts:
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        diff = (ours[start:start + len(ids)] - ref).abs().max().item()
        assert diff < 1e-4, f"prompt of {len(ids)} tokens: max abs diff {diff}"
        start += len(ids)
