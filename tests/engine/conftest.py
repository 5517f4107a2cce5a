"""Engine fixtures: real SmolLM2 engines (fp32 for exact comparisons) and its HF reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sglbatch.engine.config import ModelConfig

# Prompts of clearly different lengths (a few tokens to ~100), shared by the greedy tests.
PROMPTS = [
    "Hello",
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three prime numbers greater than ten and explain why each is prime:",
    "Once upon a time, in a small village at the edge of a great forest, there lived a young "
    "girl who loved to read. Every evening she would",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Translate to French: I would like a cup of coffee and a croissant, please.",
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many "
    "clips in May. How many clips did Natalia sell altogether in April and May? Think step by "
    "step and explain your reasoning carefully before giving the final answer. Answer:",
]


# A 2-layer Llama with GQA (6 query heads over 2 kv heads) for tests that need a model but
# not its weights: random ones, scaled so activations stay O(1).
TINY_LLAMA = ModelConfig(
    architecture="LlamaForCausalLM", vocab_size=100, hidden_size=64, intermediate_size=96,
    num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=32,
    rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=64,
    tie_word_embeddings=False, attention_bias=False, eos_token_ids=(0,))


def random_tiny_llama(seed: int = 0, config: ModelConfig = TINY_LLAMA) -> torch.nn.Module:
    from sglbatch.engine.models import create_model

    torch.manual_seed(seed)
    model = create_model(config).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    return model


@pytest.fixture(scope="session")
def hf_model(smollm2_dir: Path):
    """transformers' own model, loaded from the GGUF file itself (not from our conversion)."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    gguf = Path(json.loads((smollm2_dir / "sglbatch_source.json").read_text())["source"])
    return AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()


def assert_pool_whole(engine) -> None:
    """After all requests finish, every KV slot is free or cached (and unlocked), and
    flushing the cache makes the pool whole again."""
    runner = engine.model_runner
    cache = engine.scheduler.cache
    assert not engine.scheduler.has_work
    cached = cache.total_size if cache else 0
    assert cache is None or cache.protected_size == 0
    assert runner.kv_pool.num_free + cached == runner.kv_pool.num_slots
    assert engine.flush_cache()
    assert runner.kv_pool.num_free == runner.kv_pool.num_slots
    assert runner.req_to_token_pool.num_free == runner.req_to_token_pool.num_rows


def same_outputs(engines, prompts, params, **kwargs) -> list[dict]:
    """Two engines' outputs for one call, checked equal (tokens, text, finish reason, length)
    and each engine's pool whole afterwards; the first engine's outputs returned."""
    ours, ref = (engine.generate(prompts, params, **kwargs) for engine in engines)
    for a, b in zip(ours, ref, strict=True):
        assert a["output_ids"] == b["output_ids"]
        assert a["text"] == b["text"]
        assert a["meta_info"]["finish_reason"] == b["meta_info"]["finish_reason"]
        assert a["meta_info"]["completion_tokens"] == b["meta_info"]["completion_tokens"]
    for engine in engines:
        assert_pool_whole(engine)
    return ours
