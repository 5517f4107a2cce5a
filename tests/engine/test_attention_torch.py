"""The torch and CPU-kernel backends against naive per-request attention, including
shared-prefix (cascade) decode and extend on top of a cached prefix."""

from __future__ import annotations

import pytest
import torch

from sglbatch.engine.attention import cpu_kernels
from sglbatch.engine.attention.cpu import CpuBackend
from sglbatch.engine.attention.torch_native import TorchNativeBackend
from sglbatch.engine.batch import ForwardBatch, ForwardMode
from sglbatch.engine.kv_pool import KVPool

HEADS, KV_HEADS, DIM = 6, 2, 16

needs_kernel = pytest.mark.skipif(cpu_kernels.load() is None,
                                  reason="the C++ attention kernel does not build here")
BACKENDS = [pytest.param(TorchNativeBackend, id="torch"),
            pytest.param(CpuBackend, id="cpu", marks=needs_kernel)]


def _naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: [n, heads, dim] at the last n positions of k/v: [len, kv_heads, dim]; causal."""
    k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
    v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * DIM ** -0.5
    n, total = q.shape[0], k.shape[0]
    causal = torch.arange(total)[None, :] <= torch.arange(total - n, total)[:, None]
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def _forward_batch(mode, table, rows, prefix_lens, extend_lens, out_loc) -> ForwardBatch:
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    starts = [sum(extend_lens[:i]) for i in range(len(extend_lens))]
    t = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    return ForwardBatch(mode, t([0] * sum(extend_lens)), t([0] * sum(extend_lens)), out_loc,
                        t(rows), t(extend_lens), t(starts), table,
                        seq_lens, prefix_lens, list(extend_lens))


@pytest.mark.parametrize("backend_cls", BACKENDS)
@pytest.mark.parametrize("shared_len", [0, 40, 100])
def test_decode_with_shared_prefixes_matches_naive(shared_len, backend_cls):
    gen = torch.Generator().manual_seed(shared_len)
    pool = KVPool(2000, 1, KV_HEADS, DIM, torch.float32)
    backend = backend_cls(pool, HEADS, KV_HEADS, DIM)
    table = torch.zeros((8, 512), dtype=torch.int64)
    own_lens = [5, 60, 1, 33, 17, 80]  # tokens after the prefix, the decoded one included
    group_of = [0, 0, 0, 1, 1, None]  # two groups sharing prefixes, one loner
    prefixes = [pool.alloc(shared_len) for _ in range(2)]
    seq_lens = []
    for b, (own, g) in enumerate(zip(own_lens, group_of)):
        prefix = prefixes[g] if g is not None else pool.alloc(shared_len)
        row = torch.cat([prefix, pool.alloc(own)])
        table[b, :len(row)] = row
        seq_lens.append(len(row))
    for layer_k in (pool.k_buffers[0], pool.v_buffers[0]):
        layer_k.normal_(generator=gen)
    out_loc = table[torch.arange(6), torch.tensor(seq_lens) - 1]
    fb = _forward_batch(ForwardMode.DECODE, table, list(range(6)), [s - 1 for s in seq_lens],
                        [1] * 6, out_loc)
    q = torch.randn(6, HEADS * DIM, generator=gen)
    k_new = torch.randn(6, KV_HEADS * DIM, generator=gen)
    v_new = torch.randn(6, KV_HEADS * DIM, generator=gen)
    backend.init_forward_metadata(fb)
    shared = backend._decode_meta.shared
    # The torch backend lists the prefixes; the CPU one packs them for its kernel (or None).
    found = len(shared) if backend_cls is TorchNativeBackend else \
        0 if shared is None else len(shared.rows)
    assert found == (2 if shared_len >= 32 else 0)
    if backend_cls is TorchNativeBackend:
        assert len(backend._decode_meta.suffix) == 1
    out = backend.forward(q, k_new, v_new, 0, fb).view(6, HEADS, DIM)
    for b in range(6):
        k_all, v_all = pool.get_kv(0, table[b, :seq_lens[b]])
        ref = _naive(q[b].view(1, HEADS, DIM), k_all.transpose(0, 1), v_all.transpose(0, 1))
        torch.testing.assert_close(out[b], ref[0], atol=1e-5, rtol=1e-5)


def test_extend_on_a_cached_prefix_matches_naive():
    gen = torch.Generator().manual_seed(0)
    pool = KVPool(500, 1, KV_HEADS, DIM, torch.float32)
    backend = TorchNativeBackend(pool, HEADS, KV_HEADS, DIM)
    table = torch.zeros((4, 256), dtype=torch.int64)
    prefix_lens, extend_lens = [0, 30, 7], [12, 9, 1]
    new_slots = []
    for b, (p, e) in enumerate(zip(prefix_lens, extend_lens)):
        row = pool.alloc(p + e)
        table[b, :p + e] = row
        new_slots.append(row[p:])
    pool.k_buffers[0].normal_(generator=gen)
    pool.v_buffers[0].normal_(generator=gen)
    n = sum(extend_lens)
    q, k, v = (torch.randn(n, h * DIM, generator=gen) for h in (HEADS, KV_HEADS, KV_HEADS))
    fb = _forward_batch(ForwardMode.EXTEND, table, [0, 1, 2], prefix_lens, extend_lens,
                        torch.cat(new_slots))
    backend.init_forward_metadata(fb)
    out = backend.forward(q, k, v, 0, fb).view(n, HEADS, DIM)
    start = 0
    for b, (p, e) in enumerate(zip(prefix_lens, extend_lens)):
        k_all, v_all = pool.get_kv(0, table[b, :p + e])
        ref = _naive(q[start:start + e].view(e, HEADS, DIM), k_all.transpose(0, 1),
                     v_all.transpose(0, 1))
        torch.testing.assert_close(out[start:start + e], ref, atol=1e-5, rtol=1e-5)
        start += e


@pytest.mark.parametrize("backend_cls", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_buckets_by_length_match_naive(backend_cls, dtype):
    """More requests than one bucket holds, with very different lengths."""
    from sglbatch.engine.attention.torch_native import DECODE_BUCKET

    gen = torch.Generator().manual_seed(7)
    n = DECODE_BUCKET * 2 + 5
    pool = KVPool(20000, 1, KV_HEADS, DIM, dtype)
    backend = backend_cls(pool, HEADS, KV_HEADS, DIM)
    table = torch.zeros((n, 400), dtype=torch.int64)
    seq_lens = torch.randint(1, 400, (n,), generator=gen).tolist()
    for b, length in enumerate(seq_lens):
        table[b, :length] = pool.alloc(length)
    pool.k_buffers[0].normal_(generator=gen)
    pool.v_buffers[0].normal_(generator=gen)
    out_loc = table[torch.arange(n), torch.tensor(seq_lens) - 1]
    fb = _forward_batch(ForwardMode.DECODE, table, list(range(n)), [s - 1 for s in seq_lens],
                        [1] * n, out_loc)
    q = torch.randn(n, HEADS * DIM, generator=gen)
    k_new, v_new = (torch.randn(n, KV_HEADS * DIM, generator=gen) for _ in range(2))
    backend.init_forward_metadata(fb)
    if backend_cls is TorchNativeBackend:
        assert len(backend._decode_meta.suffix) == 3
    q, k_new, v_new = q.to(dtype), k_new.to(dtype), v_new.to(dtype)
    out = backend.forward(q, k_new, v_new, 0, fb).view(n, HEADS, DIM)
    # bf16 inputs, fp32 reference: the output's own bf16 rounding bounds the difference.
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for b in range(n):
        k_all, v_all = pool.get_kv(0, table[b, :seq_lens[b]])
        ref = _naive(q[b].view(1, HEADS, DIM).float(), k_all.transpose(0, 1).float(),
                     v_all.transpose(0, 1).float())
        torch.testing.assert_close(out[b].float(), ref[0], atol=tol, rtol=tol)
