"""The Triton backend against the torch backend on the same pool and batches: extend on a
cached prefix, then decode, under Triton's CPU interpreter (or on a GPU when there is one).
Both backends write the new K/V themselves, so the two pools must end up equal too."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
pytest.importorskip("triton")

from sglbatch.engine.attention import create_attention_backend
from sglbatch.engine.attention.base import LayerAttention
from sglbatch.engine.batch import ForwardBatch, ForwardMode
from sglbatch.engine.kv_pool import KVPool
from tests.device_follow import DeviceCheck, assert_all_named
from tests.kernels.ragged import forward_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEADS, KV_HEADS, DIM = 6, 2, 64


def _forward_batch(mode, table, rows, prefix_lens, extend_lens, out_loc) -> ForwardBatch:
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    starts = [sum(extend_lens[:i]) for i in range(len(extend_lens))]

    def t(x):
        return torch.tensor(x, dtype=torch.int64, device=DEVICE)

    return ForwardBatch(mode, t([0] * sum(extend_lens)), t([0] * sum(extend_lens)),
                        out_loc.to(DEVICE), t(rows), t(extend_lens), t(starts), table,
                        seq_lens, prefix_lens, list(extend_lens))


def _pools(num_slots: int, dtype: torch.dtype) -> tuple[KVPool, KVPool]:
    pools = [KVPool(num_slots, 1, KV_HEADS, DIM, dtype, DEVICE) for _ in range(2)]
    gen = torch.Generator().manual_seed(0)
    for buf in (pools[0].k_buffers[0], pools[0].v_buffers[0]):
        buf[:, 1:] = torch.randn(buf[:, 1:].shape, generator=gen).to(dtype).to(DEVICE)
    pools[1].k_buffers[0].copy_(pools[0].k_buffers[0])
    pools[1].v_buffers[0].copy_(pools[0].v_buffers[0])
    return pools


def _run_both(names, pools, fb, n_tokens, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n_tokens, h * DIM, generator=gen).to(dtype).to(DEVICE)
               for h in (HEADS, KV_HEADS, KV_HEADS))
    outs = []
    for pool, name in zip(pools, names):
        backend = create_attention_backend(name, DEVICE, pool, HEADS, KV_HEADS, DIM)
        with DeviceCheck() as check:
            backend.init_forward_metadata(fb)
            outs.append(backend.forward(q, k, v, 0, fb))
        assert_all_named(check)
    return outs


def assert_backends_agree(names: tuple[str, str], dtype: torch.dtype, tol: float) -> None:
    """Extend on cached prefixes (scattered slots, shuffled table rows), then one decode
    step per request, through two backends on twin pools."""
    pools = _pools(1200, dtype)
    table = torch.zeros((5, 512), dtype=torch.int64, device=DEVICE)
    prefix_lens, extend_lens = [0, 130, 7, 300], [12, 9, 1, 40]
    rows = [3, 0, 4, 1]
    new_slots = []
    for row, p, e in zip(rows, prefix_lens, extend_lens):
        slots = pools[0].alloc(p + e)
        pools[1].alloc(p + e)
        table[row, :p + e] = slots.flip(0).to(DEVICE)  # scattered, not one span
        new_slots.append(table[row, p:p + e])
    fb = _forward_batch(ForwardMode.EXTEND, table, rows, prefix_lens, extend_lens,
                        torch.cat(new_slots))
    ref, got = _run_both(names, pools, fb, sum(extend_lens), 1, dtype)
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)

    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    out_loc = []
    for row, s in zip(rows, seq_lens):
        slot = pools[0].alloc(1)
        pools[1].alloc(1)
        table[row, s] = slot[0]
        out_loc.append(slot)
    fb = _forward_batch(ForwardMode.DECODE, table, rows, seq_lens, [1] * len(rows),
                        torch.cat(out_loc))
    ref, got = _run_both(names, pools, fb, len(rows), 2, dtype)
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
    # Both wrote the step's K/V into the same slots.
    assert torch.equal(pools[0].k_buffers[0], pools[1].k_buffers[0])
    assert torch.equal(pools[0].v_buffers[0], pools[1].v_buffers[0])


def test_triton_backend_matches_torch_backend():
    assert_backends_agree(("torch", "triton"), torch.float32, 1e-5)


def test_triton_backend_applies_each_layers_attention():
    """Layers differing in scale, sliding window and soft-cap, against the dense reference:
    extend on cached prefixes, then decode with eager and with CUDA-graph metadata (which
    fixes MAX_NUM_SPLITS, so a window's splits there start past many empty ones)."""
    layers = (LayerAttention(0.3, sliding_window=20, logit_softcap=10.0), LayerAttention(0.2),
              LayerAttention(0.25, sliding_window=150))
    pool = KVPool(1200, len(layers), KV_HEADS, DIM, torch.float32, DEVICE)
    gen = torch.Generator().manual_seed(0)
    for buf in (*pool.k_buffers, *pool.v_buffers):
        buf[:, 1:] = torch.randn(buf[:, 1:].shape, generator=gen).to(DEVICE)
    backend = create_attention_backend("triton", DEVICE, pool, HEADS, KV_HEADS, DIM, layers)
    table = torch.zeros((5, 512), dtype=torch.int64, device=DEVICE)
    prefix_lens, extend_lens, rows = [0, 130, 7, 300], [12, 40, 1, 33], [3, 0, 4, 1]
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    for row, n in zip(rows, seq_lens):
        table[row, :n + 1] = pool.alloc(n + 1).flip(0).to(DEVICE)  # + the decoded token's
    extend = _forward_batch(ForwardMode.EXTEND, table, rows, prefix_lens, extend_lens,
                            torch.cat([table[r, p:s] for r, p, s in
                                       zip(rows, prefix_lens, seq_lens)]))
    decode = _forward_batch(ForwardMode.DECODE, table, rows, seq_lens, [1] * len(rows),
                            torch.stack([table[r, s] for r, s in zip(rows, seq_lens)]))
    graph_seq_lens = torch.tensor([s + 1 for s in seq_lens], dtype=torch.int32, device=DEVICE)
    steps = [(extend, backend.init_forward_metadata), (decode, backend.init_forward_metadata),
             (decode, lambda fb: backend.init_forward_metadata_graph(fb, graph_seq_lens))]
    for fb, init in steps:
        init(fb)
        tokens = len(fb.out_cache_loc)
        for layer_id, layer in enumerate(layers):
            q, k, v = (torch.randn(tokens, h * DIM, generator=gen).to(DEVICE)
                       for h in (HEADS, KV_HEADS, KV_HEADS))
            out = backend.forward(q, k, v, layer_id, fb)
            expected = forward_reference(q, pool, layer_id, fb, layer, HEADS)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_triton_on_the_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    pool = KVPool(4, 1, KV_HEADS, DIM, torch.float32)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        create_attention_backend("triton", "cpu", pool, HEADS, KV_HEADS, DIM)


@pytest.mark.slow
def test_engine_greedy_tokens_match_with_triton_backend(engine, smollm2_dir):
    """The default model end to end (30 layers) on the Triton backend. Under the interpreter
    every kernel launch copies its tensors, so the pool and table are kept tiny."""
    from sglbatch.engine.engine import Engine

    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = {"temperature": 0, "max_new_tokens": 3}
    expected = [o["output_ids"] for o in engine.generate(prompts, params)]
    with Engine(model_path=str(smollm2_dir), dtype="float32", device=DEVICE,
                attention_backend="triton", max_total_tokens=256, context_length=128,
                max_running_requests=2) as triton_engine:
        got = [o["output_ids"] for o in triton_engine.generate(prompts, params)]
    assert got == expected
