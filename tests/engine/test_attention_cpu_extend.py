"""The CPU backend's C++ extend kernel (the whole ragged batch in one call) against the torch
backend's per-request loop: cached prefixes of lengths that are no multiple of the kernel's
blocks, empty extends, GQA groups, head sizes with and without a compiled fast path,
windows (keys before every query's window are NaN, so reading one fails), soft-caps, and
chunked prefill."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sglbatch.engine.attention import cpu_kernels
from sglbatch.engine.attention.base import LayerAttention
from sglbatch.engine.attention.cpu import CpuBackend
from sglbatch.engine.attention.torch_native import TorchNativeBackend
from sglbatch.engine.batch import ForwardMode
from sglbatch.engine.kv_pool import KVPool
from tests.engine.test_attention_torch import _forward_batch
from tests.kernels.ragged import Ragged, poison_before, ragged_batch, tolerance

pytestmark = pytest.mark.skipif(
    cpu_kernels.load() is None or cpu_kernels.load("extend_attention") is None,
    reason="the CPU backend's C++ kernels do not build here")


def _pool(r: Ragged) -> KVPool:
    """A one-layer pool over the batch's own buffers, so poisoning them reaches the pool (the
    batch moves to the CPU first: ragged_batch builds it on the GPU where there is one)."""
    for field in dataclasses.fields(r):
        setattr(r, field.name, getattr(r, field.name).cpu())
    kv_heads, slots, dim = r.k_buf.shape
    pool = KVPool(slots - 1, 1, kv_heads, dim, r.k_buf.dtype)
    pool.k_buffers[0], pool.v_buffers[0] = r.k_buf, r.v_buf
    return pool


def _inputs(tokens: int, kv_heads: int, group: int, dim: int, dtype: torch.dtype, seed: int):
    """q, k, v split off one projection, as the models do: q's rows are strided."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (group + 2) * kv_heads * dim, generator=gen).to(dtype)
    return qkv.split([group * kv_heads * dim, kv_heads * dim, kv_heads * dim], dim=1)


# (prefix lens, extend lens, kv heads, GQA group, head_dim, dtype, window, soft-cap). The
# kernel takes 128 keys and 96 query lanes (rows x group) at a time. bf16 at head_dim 64 or
# 128 takes the AVX512-BF16 path where the CPU has one; everything else the portable tiles.
CASES = [
    pytest.param([0, 0, 0], [1, 63, 200], 2, 1, 64, torch.float32, None, None,
                 id="no-prefix-g1-fp32"),
    pytest.param([1, 63, 65, 130], [97, 5, 64, 33], 3, 3, 64, torch.float32, None, None,
                 id="prefix-g3-fp32"),
    pytest.param([300, 0, 17], [100, 40, 1], 2, 4, 128, torch.float32, 50, 30.0,
                 id="w50-cap30-g4-d128-fp32"),
    pytest.param([20, 0, 100], [30, 9, 2], 1, 3, 96, torch.float32, 7, None,
                 id="w7-g3-d96-fp32"),
    pytest.param([0, 50, 10, 0], [5, 0, 3, 0], 2, 3, 64, torch.float32, None, None,
                 id="empty-extends-fp32"),
    pytest.param([0, 129, 1000], [150, 31, 77], 3, 3, 64, torch.bfloat16, None, None,
                 id="prefix-g3-bf16"),
    pytest.param([0, 0, 64], [1, 63, 200], 2, 1, 64, torch.bfloat16, None, None,
                 id="g1-bf16"),
    pytest.param([200, 3, 0], [60, 90, 7], 2, 4, 128, torch.bfloat16, 64, 20.0,
                 id="w64-cap20-g4-d128-bf16"),
    pytest.param([37, 0, 0], [45, 0, 130], 3, 3, 64, torch.bfloat16, 100, None,
                 id="w100-empty-bf16"),
    pytest.param([33, 0], [70, 19], 2, 1, 96, torch.bfloat16, None, 10.0,
                 id="cap10-g1-d96-bf16"),
    pytest.param([40, 5], [50, 100], 3, 3, 64, torch.float16, 33, None, id="w33-g3-fp16"),
    pytest.param([5, 90], [40, 3], 1, 4, 64, torch.bfloat16, 4096, None,
                 id="w-longer-than-all-bf16"),
]


@pytest.mark.parametrize("prefix_lens,extend_lens,kv_heads,group,dim,dtype,window,cap", CASES)
def test_extend_kernel_matches_torch(prefix_lens, extend_lens, kv_heads, group, dim, dtype,
                                     window, cap):
    r = ragged_batch(prefix_lens, extend_lens, kv_heads, dim, dtype, seed=len(prefix_lens))
    pool = _pool(r)
    layers = (LayerAttention(0.7 * dim ** -0.5, window, cap),)
    rows = r.req_pool_indices.tolist()
    fb = _forward_batch(ForwardMode.EXTEND, r.req_to_token, rows, prefix_lens, extend_lens,
                        r.new_loc)
    q, k, v = _inputs(sum(extend_lens), kv_heads, group, dim, dtype, seed=1)
    heads = kv_heads * group
    torch_backend = TorchNativeBackend(pool, heads, kv_heads, dim, layers)
    torch_backend.init_forward_metadata(fb)
    expected = torch_backend.forward(q, k, v, 0, fb)

    if window is not None:
        # The first new token's window starts at prefix - window + 1: no query sees before.
        poison_before(r, rows, [p - window + 1 for p in prefix_lens])
    backend = CpuBackend(pool, heads, kv_heads, dim, layers)
    backend.init_forward_metadata(fb)
    out = backend.forward(q, k, v, 0, fb)
    assert out.dtype == dtype and out.shape == expected.shape
    torch.testing.assert_close(out.float(), expected.float(), **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_prefill_matches_one_pass(dtype):
    """A 300-token prompt prefilled in chunks of 128, 100 and 72 beside other requests,
    against the torch backend over the whole prompt at once, on two layers that differ in
    window and cap."""
    kv_heads, group, dim = 3, 3, 64
    heads = kv_heads * group
    layers = (LayerAttention(dim ** -0.5, sliding_window=90, logit_softcap=30.0),
              LayerAttention(dim ** -0.5))
    r = ragged_batch([0], [300], kv_heads, dim, dtype, seed=3)
    pool = _pool(r)
    row, slots, table = int(r.req_pool_indices[0]), r.new_loc, r.req_to_token
    pool.k_buffers.append(pool.k_buffers[0].clone())
    pool.v_buffers.append(pool.v_buffers[0].clone())
    # A one-token request beside the prompt, in a row and slot of its own.
    other_row = next(i for i in range(len(table)) if i != row)
    taken = set(slots.tolist())
    spare = next(s for s in range(1, pool.num_slots + 1) if s not in taken)
    table[other_row, 0] = spare
    q, k, v = _inputs(300, kv_heads, group, dim, dtype, seed=4)
    whole = _forward_batch(ForwardMode.EXTEND, table, [row], [0], [300], slots)
    torch_backend = TorchNativeBackend(pool, heads, kv_heads, dim, layers)
    torch_backend.init_forward_metadata(whole)
    expected = [torch_backend.forward(q, k, v, layer_id, whole) for layer_id in range(2)]

    backend = CpuBackend(pool, heads, kv_heads, dim, layers)
    q_o, k_o, v_o = _inputs(1, kv_heads, group, dim, dtype, seed=5)
    done = 0
    for chunk in (128, 100, 72):
        new = slice(done, done + chunk)
        fb = _forward_batch(ForwardMode.EXTEND, table, [other_row, row], [0, done], [1, chunk],
                            torch.cat([torch.tensor([spare]), slots[new]]))
        backend.init_forward_metadata(fb)
        for layer_id in range(2):
            out = backend.forward(torch.cat([q_o, q[new]]), torch.cat([k_o, k[new]]),
                                  torch.cat([v_o, v[new]]), layer_id, fb)
            torch.testing.assert_close(out[1:].float(), expected[layer_id][new].float(),
                                       **tolerance(dtype))
        done += chunk

