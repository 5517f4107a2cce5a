"""The CPU backend's decode over shared prefixes (cascade): each prefix is read once for all
the requests sharing it by the extend kernel's tiles and merged into each request's own
part (the decode kernel's) through their log-sum-exps. Against the dense reference over
each request's whole row: groups larger than one task's member block (32 at group 3),
prefixes that are no multiple of the kernel's 128-key blocks, loners beside groups,
scattered slots, soft-caps, and head sizes with and without the bf16 fast path."""

from __future__ import annotations

import pytest
import torch

from sglbatch.engine.attention import cpu_kernels
from sglbatch.engine.attention.base import LayerAttention
from sglbatch.engine.attention.cpu import CpuBackend
from sglbatch.engine.batch import ForwardBatch, ForwardMode
from sglbatch.engine.kv_pool import KVPool
from tests.kernels.ragged import forward_reference, tolerance

pytestmark = pytest.mark.skipif(
    cpu_kernels.load() is None or cpu_kernels.load("extend_attention") is None,
    reason="the CPU backend's C++ kernels do not build here")


def _decode_batch(groups: list[tuple[int, int]], loners: int, kv_heads: int, dim: int,
                  dtype: torch.dtype, seed: int) -> tuple[KVPool, ForwardBatch]:
    """One decode token per request: `groups` lists (members, prefix length) of requests
    whose rows start with the same slots; each request then has 1..40 slots of its own
    (the last its current token), allocated in reverse so rows are scattered."""
    gen = torch.Generator().manual_seed(seed)
    pool = KVPool(6000, 1, kv_heads, dim, dtype)
    for buf in (pool.k_buffers[0], pool.v_buffers[0]):
        buf[:, 1:] = torch.randn(buf[:, 1:].shape, generator=gen).to(dtype)
    prefixes = [(pool.alloc(length), members) for members, length in groups]
    rows = [prefix for prefix, members in prefixes for _ in range(members)]
    rows += [pool.alloc(int(torch.randint(1, 60, (1,), generator=gen))) for _ in range(loners)]
    batch = len(rows)
    table = torch.zeros((batch + 3, max(length for _, length in groups) + 100),
                        dtype=torch.int64)
    pool_rows = torch.randperm(batch + 3, generator=gen)[:batch]
    seq_lens = []
    for b, prefix in enumerate(rows):
        own = pool.alloc(int(torch.randint(1, 41, (1,), generator=gen))).flip(0)
        row = torch.cat([prefix, own])
        table[pool_rows[b], :len(row)] = row
        seq_lens.append(len(row))
    out_loc = torch.stack([table[r, n - 1] for r, n in zip(pool_rows.tolist(), seq_lens)])

    def t(x):
        return torch.tensor(x, dtype=torch.int64)

    fb = ForwardBatch(ForwardMode.DECODE, t([0] * batch), t([n - 1 for n in seq_lens]), out_loc,
                      pool_rows, t([1] * batch), t(list(range(batch))), table, seq_lens,
                      [n - 1 for n in seq_lens], [1] * batch)
    return pool, fb


@pytest.mark.parametrize("groups,loners,kv_heads,group,dim,dtype,cap", [
    pytest.param([(40, 300), (5, 129)], 3, 3, 3, 64, torch.bfloat16, None, id="bf16-d64"),
    pytest.param([(70, 33), (2, 256)], 0, 2, 4, 128, torch.bfloat16, 20.0,
                 id="bf16-d128-cap"),
    pytest.param([(33, 200)], 2, 1, 3, 96, torch.bfloat16, None, id="bf16-d96-portable"),
    pytest.param([(35, 150), (3, 40)], 1, 3, 3, 64, torch.float32, 30.0, id="fp32-cap"),
    pytest.param([(4, 64)], 1, 2, 1, 64, torch.float16, None, id="fp16-g1"),
])
def test_shared_prefix_decode_matches_reference(groups, loners, kv_heads, group, dim, dtype,
                                                cap):
    pool, fb = _decode_batch(groups, loners, kv_heads, dim, dtype, seed=len(groups) + dim)
    heads = kv_heads * group
    layer = LayerAttention(0.8 * dim ** -0.5, logit_softcap=cap)
    backend = CpuBackend(pool, heads, kv_heads, dim, (layer,))
    backend.init_forward_metadata(fb)
    prefixes = backend._decode_meta.shared
    assert prefixes.lens.tolist() == [length for _, length in groups]
    assert prefixes.offsets.tolist()[-1] == sum(members for members, _ in groups)

    batch = len(fb.seq_lens_cpu)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(batch, h * dim, generator=gen).to(dtype)
               for h in (heads, kv_heads, kv_heads))
    out = backend.forward(q, k, v, 0, fb)
    expected = forward_reference(q, pool, 0, fb, layer, heads)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected.float(), **tolerance(dtype))
