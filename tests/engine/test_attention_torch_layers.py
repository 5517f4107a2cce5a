"""The torch backend honours each layer's LayerAttention (scale, sliding window, logit
soft-cap) against a naive per-request reference: decode with shared prefixes (cascade) and
in length buckets, and extend on a cached prefix across query chunks. Layers of one pool
differ, so the backend must switch its per-window metadata layer by layer."""

from __future__ import annotations

import pytest
import torch

from sglbatch.engine.attention.base import LayerAttention
from sglbatch.engine.attention.torch_native import DECODE_BUCKET, EXTEND_CHUNK, TorchNativeBackend
from sglbatch.engine.batch import ForwardBatch, ForwardMode
from sglbatch.engine.kv_pool import KVPool
from tests.device_follow import DeviceCheck, assert_all_named

HEADS, KV_HEADS, DIM = 6, 2, 16
# Layer 0 plain (the fast paths), the others windowed and/or soft-capped.
LAYERS = [LayerAttention(DIM ** -0.5), LayerAttention(0.37, sliding_window=8),
          LayerAttention(0.21, sliding_window=50, logit_softcap=2.0),
          LayerAttention(0.5, logit_softcap=1.5), LayerAttention(0.3, sliding_window=1)]


def _naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: LayerAttention
           ) -> torch.Tensor:
    """q: [n, heads, dim] at the last n positions of k/v: [len, kv_heads, dim]."""
    k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
    v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * layer.scale
    if layer.logit_softcap is not None:
        scores = layer.logit_softcap * torch.tanh(scores / layer.logit_softcap)
    n, total = q.shape[0], k.shape[0]
    keys, queries = torch.arange(total)[None, :], torch.arange(total - n, total)[:, None]
    seen = keys <= queries
    if layer.sliding_window is not None:
        seen &= keys > queries - layer.sliding_window
    probs = torch.softmax(scores.masked_fill(~seen, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def _forward_batch(mode, table, prefix_lens, extend_lens, out_loc) -> ForwardBatch:
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    starts = [sum(extend_lens[:i]) for i in range(len(extend_lens))]
    t = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    return ForwardBatch(mode, t([0] * sum(extend_lens)), t([0] * sum(extend_lens)), out_loc,
                        t(list(range(len(seq_lens)))), t(extend_lens), t(starts), table,
                        seq_lens, prefix_lens, list(extend_lens))


def _check_every_layer(pool, table, fb, gen) -> None:
    backend = TorchNativeBackend(pool, HEADS, KV_HEADS, DIM, LAYERS)
    n = sum(fb.extend_lens_cpu)
    check = DeviceCheck()
    with check:
        backend.init_forward_metadata(fb)
    assert_all_named(check)
    for layer_id, layer in enumerate(LAYERS):
        q, k, v = (torch.randn(n, h * DIM, generator=gen) for h in (HEADS, KV_HEADS, KV_HEADS))
        with check:
            out = backend.forward(q, k, v, layer_id, fb).view(n, HEADS, DIM)
        assert_all_named(check)
        start = 0
        for b, (e, s) in enumerate(zip(fb.extend_lens_cpu, fb.seq_lens_cpu)):
            k_all, v_all = pool.get_kv(layer_id, table[b, :s])
            ref = _naive(q[start:start + e].view(e, HEADS, DIM), k_all.transpose(0, 1),
                         v_all.transpose(0, 1), layer)
            torch.testing.assert_close(out[start:start + e], ref, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"layer {layer}, request {b}: {m}")
            start += e


def _pool(gen, slots: int) -> KVPool:
    pool = KVPool(slots, len(LAYERS), KV_HEADS, DIM, torch.float32)
    for buf in (*pool.k_buffers, *pool.v_buffers):
        buf[:, 1:].normal_(generator=gen)
    return pool


@pytest.mark.parametrize("shared_len", [0, 40, 100])
def test_decode_with_shared_prefixes(shared_len):
    gen = torch.Generator().manual_seed(shared_len)
    pool = _pool(gen, 2000)
    table = torch.zeros((8, 512), dtype=torch.int64)
    # Own tokens after the prefix: some windows end inside the prefix, some past it.
    own_lens = [5, 60, 1, 33, 17, 80, 7]
    group_of = [0, 0, 0, 1, 1, None, 1]
    prefixes = [pool.alloc(shared_len) for _ in range(2)]
    seq_lens = []
    for b, (own, g) in enumerate(zip(own_lens, group_of)):
        prefix = prefixes[g] if g is not None else pool.alloc(shared_len)
        row = torch.cat([prefix, pool.alloc(own)])
        table[b, :len(row)] = row
        seq_lens.append(len(row))
    out_loc = table[torch.arange(len(seq_lens)), torch.tensor(seq_lens) - 1]
    fb = _forward_batch(ForwardMode.DECODE, table, [s - 1 for s in seq_lens],
                        [1] * len(seq_lens), out_loc)
    _check_every_layer(pool, table, fb, gen)


def test_decode_in_length_buckets():
    gen = torch.Generator().manual_seed(7)
    n = DECODE_BUCKET * 2 + 5
    pool = _pool(gen, 20000)
    table = torch.zeros((n, 400), dtype=torch.int64)
    seq_lens = torch.randint(1, 400, (n,), generator=gen).tolist()
    for b, length in enumerate(seq_lens):
        table[b, :length] = pool.alloc(length)
    out_loc = table[torch.arange(n), torch.tensor(seq_lens) - 1]
    fb = _forward_batch(ForwardMode.DECODE, table, [s - 1 for s in seq_lens], [1] * n, out_loc)
    _check_every_layer(pool, table, fb, gen)


def test_extend_on_cached_prefixes_across_chunks():
    gen = torch.Generator().manual_seed(0)
    pool = _pool(gen, 2000)
    table = torch.zeros((4, 512), dtype=torch.int64)
    prefix_lens, extend_lens = [0, 30, 7, 100], [12, 9, 1, EXTEND_CHUNK + 40]
    new_slots = []
    for b, (p, e) in enumerate(zip(prefix_lens, extend_lens)):
        row = pool.alloc(p + e)
        table[b, :p + e] = row
        new_slots.append(row[p:])
    fb = _forward_batch(ForwardMode.EXTEND, table, prefix_lens, extend_lens,
                        torch.cat(new_slots))
    _check_every_layer(pool, table, fb, gen)
