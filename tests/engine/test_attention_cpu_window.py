"""The CPU backend's C++ decode kernel with each layer's own scale, sliding window and logit
soft-cap, against the dense reference (gather, mask, softmax). The kernel skips the keys
before a window instead of masking them: those keys are NaN here, so reading one fails."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel modules are imported
pytest.importorskip("triton")  # the dense reference lives beside the Triton kernels

from sglbatch.engine.attention import cpu_kernels, create_attention_backend
from sglbatch.engine.attention.base import LayerAttention
from sglbatch.engine.batch import ForwardBatch, ForwardMode
from sglbatch.engine.kv_pool import KVPool
from sglbatch.kernels.extend_attention import attention_reference
from tests.kernels.ragged import (
    decode_out_tolerance,
    forward_reference,
    poison_before,
    ragged_batch,
)


@pytest.fixture(scope="module")
def kernels():
    module = cpu_kernels.load()
    if module is None:
        pytest.skip("the CPU attention kernel cannot be built here")
    return module


# (context lengths, first column attended (after a shared prefix), kv_heads, GQA group,
# head_dim, dtype, window, soft-cap). bf16 at head_dim 64 with a group of <= 8 takes the
# AVX-512 scores path where the CPU has one; head_dim 48 and a group of 10 the portable loop.
CASES = [
    pytest.param([300, 0, 17, 130, 63], [40, 0, 0, 100, 0], 2, 3, 64, torch.bfloat16, 50,
                 None, id="w50-bf16-d64"),
    pytest.param([300, 0, 17, 130, 63], [40, 0, 0, 100, 0], 2, 3, 64, torch.float32, 50, 5.0,
                 id="w50-cap5-fp32"),
    pytest.param([90, 31, 7], [0, 30, 3], 1, 4, 128, torch.float32, 1, 20.0, id="w1-d128"),
    pytest.param([90, 31, 7], [0, 30, 3], 2, 10, 48, torch.float32, 1000, None,
                 id="w-longer-than-all-d48-group10"),
    pytest.param([200, 64, 5], [33, 0, 0], 2, 3, 64, torch.bfloat16, None, 30.0,
                 id="cap-only-bf16"),
]


@pytest.mark.parametrize("prefix_lens,starts,kv_heads,group,head_dim,dtype,window,cap", CASES)
def test_decode_kernel_window_softcap_scale(kernels, prefix_lens, starts, kv_heads, group,
                                            head_dim, dtype, window, cap):
    batch = len(prefix_lens)
    r = ragged_batch(prefix_lens, [1] * batch, kv_heads, head_dim, dtype, seed=batch)
    q = torch.randn(batch, kv_heads * group, head_dim,
                    generator=torch.Generator().manual_seed(0)).to(dtype)
    rows = r.req_pool_indices.tolist()
    ends = [p + 1 for p in prefix_lens]
    scale = 0.3
    ref_out, ref_lse = [], []
    for b, (row, start, end) in enumerate(zip(rows, starts, ends)):
        # Columns start.. end - 1 as positions 0..: the window is relative, so unchanged.
        slots = r.req_to_token[row, start:end]
        out, lse = attention_reference(
            q[b:b + 1], r.k_buf[:, slots].transpose(0, 1), r.v_buf[:, slots].transpose(0, 1),
            torch.tensor([end - 1 - start]), scale, window, cap)
        ref_out.append(out)
        ref_lse.append(lse)
    poison_before(r, rows, [max(s, e - (window or e)) for s, e in zip(starts, ends)])

    def ints(values):
        return torch.tensor(values, dtype=torch.int64)

    out, lse = kernels.decode_attention(q, r.k_buf, r.v_buf, r.req_to_token,
                                        r.req_pool_indices, ints(starts), ints(ends), scale,
                                        window or 0, cap or 0.0)
    torch.testing.assert_close(out, torch.cat(ref_out), **decode_out_tolerance(dtype, head_dim,
                                                                             2e-5))
    torch.testing.assert_close(lse, torch.cat(ref_lse), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("shared", [False, True], ids=["own-slots", "shared-prefix"])
def test_cpu_backend_decodes_each_layer_with_its_attention(kernels, shared):
    """Decode through CpuBackend over layers that differ in scale, window and cap. With a
    shared prefix, the part the torch cascade attends is merged with the kernel's by their
    log-sum-exps: the window 150 keeps that prefix for two requests and not for the third."""
    heads, kv_heads, dim = 6, 2, 64
    layers = (LayerAttention(0.3, sliding_window=5, logit_softcap=10.0), LayerAttention(0.2),
              LayerAttention(0.25, sliding_window=150, logit_softcap=30.0))
    pool = KVPool(500, len(layers), kv_heads, dim, torch.float32)
    gen = torch.Generator().manual_seed(0)
    for buf in (*pool.k_buffers, *pool.v_buffers):
        buf[:, 1:] = torch.randn(buf[:, 1:].shape, generator=gen)
    seq_lens, rows = [60, 3, 100, 200], [2, 0, 3, 1]
    table = torch.zeros((4, 256), dtype=torch.int64)
    prefix = pool.alloc(48)
    for b, (row, n) in enumerate(zip(rows, seq_lens)):
        table[row, :n] = pool.alloc(n).flip(0)  # scattered slots
        if shared and b != 1:
            table[row, :48] = prefix
    out_loc = torch.stack([table[row, n - 1] for row, n in zip(rows, seq_lens)])

    def t(x):
        return torch.tensor(x, dtype=torch.int64)

    fb = ForwardBatch(ForwardMode.DECODE, t([0] * 4), t([n - 1 for n in seq_lens]), out_loc,
                      t(rows), t([1] * 4), t(list(range(4))), table, seq_lens,
                      [n - 1 for n in seq_lens], [1] * 4)
    backend = create_attention_backend("cpu", "cpu", pool, heads, kv_heads, dim, layers)
    backend.init_forward_metadata(fb)
    for layer_id, layer in enumerate(layers):
        q, k, v = (torch.randn(4, h * dim, generator=gen) for h in (heads, kv_heads, kv_heads))
        out = backend.forward(q, k, v, layer_id, fb)
        expected = forward_reference(q, pool, layer_id, fb, layer, heads)
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
