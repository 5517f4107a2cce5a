"""The CPU's fused kernels (attention/csrc/fused_ops.cpp, layers.fused_cpu) against the torch
ops they replace: the residual add and rope bit for bit, the norm all but bit for bit; in a
model under each backend that reads K/V back from the pool; and in the engine,
whose bf16 greedy text does not change with them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sglbatch.engine.attention import cpu_kernels, create_attention_backend
from sglbatch.engine.batch import ForwardBatch, ForwardMode
from sglbatch.engine.kv_pool import KVPool, ReqToTokenPool
from sglbatch.engine.layers.fused_cpu import use_fused_cpu_ops
from sglbatch.engine.layers.norm import RMSNorm, rms_norm
from sglbatch.engine.layers.rotary import RotaryEmbedding
from tests.engine.conftest import PROMPTS, TINY_LLAMA, random_tiny_llama

kernels = cpu_kernels.load("fused_ops")
pytestmark = pytest.mark.skipif(kernels is None, reason="no C++ compiler for the CPU kernels")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between a and b in units in the last place (16-bit dtypes)."""
    return int((a.view(torch.int16).int() - b.view(torch.int16).int()).abs().max())


def _assert_norm_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32: the last bits of the sum of squares; 16-bit: the same rounding but where that
    flips one (a unit before the weight's multiply, up to two after it)."""
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    else:
        assert _ulps(out, ref) <= 2
        assert float((out != ref).float().mean()) < 0.01


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 576), (64, 576), (37, 100), (300, 2048)])
def test_fused_add_rms_norm_matches_torch(dtype, rows, hidden):
    g = torch.Generator().manual_seed(rows + hidden)
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    residual = torch.randn(rows, hidden, generator=g).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    summed = residual + x
    out = kernels.fused_add_rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(residual, summed)  # the add, in place, rounded as torch's
    _assert_norm_close(out, rms_norm(summed, weight, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_reads_strided_head_rows(dtype):
    """Qwen3's per-head q norm: a [tokens, heads, head_dim] view of the qkv projection."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(7, 5 * 128, generator=g).to(dtype)
    q = qkv[:, :3 * 128].unflatten(-1, (3, 128))
    weight = (1 + 0.1 * torch.randn(128, generator=g)).to(dtype)
    out = kernels.rms_norm(q, weight, 1e-6)
    assert out.shape == q.shape
    _assert_norm_close(out, rms_norm(q, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, None), (64, 32), (128, 96), (80, None)])
@pytest.mark.parametrize("tokens", [1, 50])
@pytest.mark.parametrize("cast_tables", [False, True], ids=["fp32-tables", "model-dtype-tables"])
def test_rope_store_kv_matches_torch(dtype, head_dim, rotary_dim, tokens, cast_tables):
    g = torch.Generator().manual_seed(tokens)
    rope = RotaryEmbedding(head_dim, 4096, 10000.0, None, rotary_dim=rotary_dim)
    if cast_tables:  # as the loader's `model.to(dtype)` leaves them
        rope.to(dtype)
    heads, kv_heads = 9, 3
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    # The views `split` makes: each row contiguous, rows a whole qkv row apart.
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    positions = torch.randint(0, 4096, (tokens,), generator=g)
    expected_q, expected_k = rope(positions, q, k)
    expected_v = v.clone()
    pool = KVPool(100, 1, kv_heads, head_dim, dtype)
    for buf in (pool.k_buffers[0], pool.v_buffers[0]):
        buf.fill_(7)
    slots = torch.randperm(100, generator=g)[:tokens] + 1
    rope.rope_store_kv = kernels.rope_store_kv
    rope.rotate_and_store(positions, q, k, v, pool.k_buffers[0], pool.v_buffers[0], slots)
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k)
    stored_k, stored_v = pool.get_kv(0, slots)
    assert torch.equal(stored_k.transpose(0, 1).flatten(1), expected_k)
    assert torch.equal(stored_v.transpose(0, 1).flatten(1), expected_v)
    untouched = torch.ones(101, dtype=torch.bool)
    untouched[slots] = False
    assert bool((pool.k_buffers[0][:, untouched] == 7).all())
    assert bool((pool.v_buffers[0][:, untouched] == 7).all())


def _prefill_and_decode(model, backend_name: str, dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states of a two-request prefill, then of one decode step after it."""
    c = TINY_LLAMA
    lens = [5, 9]
    pool = KVPool(64, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, dtype)
    table = ReqToTokenPool(len(lens), 32)
    backend = create_attention_backend(backend_name, "cpu", pool, c.num_attention_heads,
                                       c.num_key_value_heads, c.head_dim)
    slots = pool.alloc(sum(lens) + len(lens))
    prefill_slots, decode_slots = slots[:sum(lens)], slots[sum(lens):]
    for row, (start, n) in enumerate(zip([0, lens[0]], lens)):
        table.table[row, :n] = prefill_slots[start:start + n]
        table.table[row, n] = decode_slots[row]
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, c.vocab_size, (sum(lens) + len(lens),), generator=g)
    rows, t = torch.arange(len(lens)), torch.tensor
    extend = ForwardBatch(ForwardMode.EXTEND, ids[:sum(lens)],
                          t([p for n in lens for p in range(n)]), prefill_slots, rows, t(lens),
                          t([0, lens[0]]), table.table, list(lens), [0, 0], list(lens))
    decode = ForwardBatch(ForwardMode.DECODE, ids[sum(lens):], t(lens), decode_slots, rows,
                          t([1, 1]), t([0, 1]), table.table, [n + 1 for n in lens], list(lens),
                          [1, 1])
    out = []
    for fb in (extend, decode):
        backend.init_forward_metadata(fb)
        out.append(model(fb.input_ids, fb.positions, fb, backend))
    return out[0], out[1]


@pytest.mark.parametrize("backend", ["torch", "cpu", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
@torch.inference_mode()
def test_model_hidden_states_do_not_change(backend, dtype, architecture):
    """Rope with the K/V store (and, in bf16, the norms, Qwen3's per-head ones included)
    fused: prefill and decode give the torch ops' hidden states, under every backend that
    takes the stored K/V; bit for bit in fp32, where only rope is fused."""
    if backend == "cpu" and cpu_kernels.load() is None:
        pytest.skip("no CPU attention kernel")
    config = dataclasses.replace(TINY_LLAMA, architecture=architecture)
    model = random_tiny_llama(config=config).to(dtype)
    expected = _prefill_and_decode(model, backend, dtype)
    use_fused_cpu_ops(model, dtype)
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert all((m.fused_add_norm is not None) == (dtype != torch.float32) for m in norms)
    assert model.model.layers[0].self_attn.rotary.rope_store_kv is not None
    for got, want in zip(_prefill_and_decode(model, backend, dtype), expected):
        if dtype == torch.float32:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)


def test_bf16_engine_greedy_text_is_unchanged(smollm2_dir, monkeypatch):
    from sglbatch.engine.engine import Engine

    params = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    args = dict(model_path=str(smollm2_dir), dtype="bfloat16", kv_cache_gb=0.1)
    with Engine(**args) as engine:
        model = engine.model_runner.model
        assert model.model.layers[0].input_layernorm.fused_add_norm is not None
        fused = [o["text"] for o in engine.generate(PROMPTS[:4], params)]
    monkeypatch.setattr("sglbatch.engine.model_runner.use_fused_cpu_ops", lambda *_: None)
    with Engine(**args) as engine:
        assert engine.model_runner.model.model.layers[0].input_layernorm.fused_add_norm is None
        unfused = [o["text"] for o in engine.generate(PROMPTS[:4], params)]
    assert fused == unfused
