"""The CUDA-graph runner's bookkeeping on the CPU: static buffers, padding to a captured
size, and the padding rows' writes landing in scratch slot 0. Only the capture itself needs
a GPU, so here a "graph" replays its step eagerly on the same static buffers; a tiny random
Llama runs on the Triton backend under the interpreter. The real capture is tested in
test_gpu.py."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
pytest.importorskip("triton")

from sglbatch.engine.attention import create_attention_backend
from sglbatch.engine.batch import ForwardBatch, ForwardMode
from sglbatch.engine.cuda_graph import CudaGraphRunner, capture_sizes
from sglbatch.engine.kv_pool import KVPool, ReqToTokenPool
from tests.device_follow import DeviceCheck, assert_all_named
from tests.engine.conftest import TINY_LLAMA, random_tiny_llama


class _EagerGraph:
    """Stands in for torch.cuda.CUDAGraph: replays the step on the same static buffers."""

    def __init__(self, step, out):
        self.step, self.out = step, out

    def replay(self):
        self.out.copy_(self.step())


class _EagerRunner(CudaGraphRunner):
    @staticmethod
    def _capture(step, pool):
        out = step()
        return _EagerGraph(step, out), out, None


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(12) == [1, 2, 4, 8, 12]
    assert capture_sizes(24) == [1, 2, 4, 8, 16, 24]


@torch.inference_mode()
def test_padded_replay_equals_eager_decode():
    model = random_tiny_llama()
    c = TINY_LLAMA

    def make():
        pool = KVPool(64, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, torch.float32)
        for buf in (*pool.k_buffers, *pool.v_buffers):
            buf[:, 1:] = torch.randn(buf[:, 1:].shape, generator=torch.Generator().manual_seed(1))
        table = ReqToTokenPool(6, 32)
        backend = create_attention_backend("triton", "cpu", pool, c.num_attention_heads,
                                           c.num_key_value_heads, c.head_dim)
        return pool, table, backend

    # Three requests already holding 5, 11 and 20 tokens decode one more each.
    seq_lens = [6, 12, 21]
    rows = [4, 1, 2]
    pools = [make(), make()]
    out_loc = []
    for (pool, table, _) in pools:
        slots = pool.alloc(sum(seq_lens))
        start = 0
        for row, n in zip(rows, seq_lens):
            table.table[row, :n] = slots[start:start + n]
            start += n
    for row, n in zip(rows, seq_lens):
        out_loc.append(pools[0][1].table[row, n - 1])

    def t(x):
        return torch.tensor(x, dtype=torch.int64)

    def batch(table):
        return ForwardBatch(ForwardMode.DECODE, t([5, 17, 42]), t([s - 1 for s in seq_lens]),
                            torch.stack(out_loc), t(rows), t([1, 1, 1]), t([0, 1, 2]),
                            table.table, seq_lens, [s - 1 for s in seq_lens], [1, 1, 1])

    eager_fb, fb = batch(pools[0][1]), batch(pools[1][1])
    with DeviceCheck() as check:  # the model's forward and the runner's replay
        backend = pools[0][2]
        backend.init_forward_metadata(eager_fb)
        expected = model(eager_fb.input_ids, eager_fb.positions, eager_fb, backend)

        pool, table, backend = pools[1]
        runner = _EagerRunner(model, backend, table.table, max_bs=4)
        assert runner.sizes == [1, 2, 4]
        assert runner.can_run(fb)
        got = runner.replay(fb)  # padded to 4
    assert_all_named(check)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Every real slot holds the same K/V as after the eager step; the padding row wrote
    # only to the scratch slot 0.
    for a, b in zip(pools[0][0].k_buffers + pools[0][0].v_buffers,
                    pools[1][0].k_buffers + pools[1][0].v_buffers):
        torch.testing.assert_close(a[:, 1:], b[:, 1:], atol=1e-6, rtol=1e-6)
    assert not runner.can_run(dataclasses.replace(fb, mode=ForwardMode.EXTEND))
