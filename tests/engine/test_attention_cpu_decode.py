"""The CPU decode kernel against plain torch (gathered slots, softmax in fp64) over the cases
its code paths split on: dtype (bf16 at head_dim 64 and 128 takes the AVX512-BF16 path where
the CPU has one), head_dim, GQA group (tiles of up to 4 heads), lengths that are empty, 1, or
not a multiple of 16 or of a chunk, windows, soft-caps, and a long sequence split over
threads. Slots are laid out as the engine hands them out: each request's prompt in a run,
then decode slots round-robin. Slots outside what a request attends hold NaN, so reading
one fails."""

from __future__ import annotations

import math

import pytest
import torch

from sglbatch.engine.attention import cpu_kernels
from tests.kernels.ragged import decode_out_tolerance


@pytest.fixture(scope="module")
def kernel():
    module = cpu_kernels.load("decode_attention")
    if module is None:
        pytest.skip("the CPU decode kernel cannot be built here")
    return module.decode_attention


def engine_pool(lens: list[int], kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int):
    """A pool and table like the engine's: request b's first ~60% slots consecutive, the
    rest round-robin across the requests still growing; table rows shuffled, unused columns
    and slot 0 pointing at NaN rows."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(lens)
    table = torch.zeros((batch + 2, max(lens, default=0) + 40), dtype=torch.int64)
    rows = torch.randperm(batch + 2, generator=gen)[:batch]
    filled = [max(1, int(0.6 * n)) if n else 0 for n in lens]
    slot = 1
    for b, n in enumerate(filled):
        table[rows[b], :n] = torch.arange(slot, slot + n)
        slot += n
    while any(f < n for f, n in zip(filled, lens)):
        for b, n in enumerate(lens):
            if filled[b] < n:
                table[rows[b], filled[b]] = slot
                filled[b] += 1
                slot += 1
    shape = (kv_heads, slot, head_dim)
    k_buf = torch.randn(shape, generator=gen).to(dtype)
    v_buf = torch.randn(shape, generator=gen).to(dtype)
    k_buf[:, 0] = float("nan")
    v_buf[:, 0] = float("nan")
    return k_buf, v_buf, table, rows, gen


def reference(q, k_buf, v_buf, table, rows, firsts, ends, scale, softcap):
    """fp64 attention of each request over its slots table[row, first:end]."""
    batch, heads, dim = q.shape
    group = heads // k_buf.shape[0]
    out = torch.zeros(batch, heads, dim, dtype=torch.float64)
    lse = torch.full((batch, heads), -math.inf, dtype=torch.float64)
    for b, (row, first, end) in enumerate(zip(rows.tolist(), firsts, ends)):
        if end <= first:
            continue
        slots = table[row, first:end]
        k = k_buf[:, slots].double().repeat_interleave(group, dim=0)  # [heads, len, dim]
        v = v_buf[:, slots].double().repeat_interleave(group, dim=0)
        s = torch.einsum("hd,hnd->hn", q[b].double(), k) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        out[b] = torch.einsum("hn,hnd->hd", torch.softmax(s, dim=-1), v)
        lse[b] = torch.logsumexp(s, dim=-1)
    return out, lse


def check(kernel, lens, starts, kv_heads, group, head_dim, dtype, window=0, softcap=0.0,
          seed=0):
    k_buf, v_buf, table, rows, gen = engine_pool(lens, kv_heads, head_dim, dtype, seed)
    q = torch.randn(len(lens), kv_heads * group, head_dim, generator=gen).to(dtype)
    firsts = [max(s, e - window) if window > 0 else s for s, e in zip(starts, lens)]
    # NaN into every slot a request owns but does not attend (before its first key).
    for row, first in zip(rows.tolist(), firsts):
        k_buf[:, table[row, :max(first, 0)]] = float("nan")
        v_buf[:, table[row, :max(first, 0)]] = float("nan")
    scale = head_dim ** -0.5
    ref_out, ref_lse = reference(q, k_buf, v_buf, table, rows, firsts, lens, scale, softcap)

    def ints(values):
        return torch.tensor(values, dtype=torch.int64)

    out, lse = kernel(q, k_buf, v_buf, table, rows, ints(starts), ints(lens), scale, window,
                      softcap)
    assert out.dtype == lse.dtype == torch.float32
    # Inputs are exact in fp32 and the kernel sums in fp32: fp32 rounding whatever the dtype
    # (but see decode_out_tolerance).
    tol = 1e-6 if dtype == torch.float32 else 1e-5
    torch.testing.assert_close(out, ref_out.float(), **decode_out_tolerance(dtype, head_dim, tol))
    torch.testing.assert_close(lse, ref_lse.float(), atol=tol, rtol=tol)


# Ragged: empty, 1 key, under / over 16, over a 64-key chunk, and a few hundred.
LENS = [0, 1, 15, 17, 64, 65, 130, 333, 5, 257]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [64, 96, 128])
@pytest.mark.parametrize("kv_heads,group", [(2, 1), (3, 3), (1, 4), (2, 6)],
                         ids=["g1", "g3", "g4", "g6"])
def test_ragged(kernel, dtype, head_dim, kv_heads, group):
    check(kernel, LENS, [0] * len(LENS), kv_heads, group, head_dim, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("window,softcap", [(0, 30.0), (1, 0.0), (50, 0.0), (100, 20.0)],
                         ids=["cap", "w1", "w50", "w100-cap"])
def test_window_softcap_starts(kernel, dtype, head_dim, window, softcap):
    """A window or a shared prefix (starts > 0) moves the first key; the keys before it are
    NaN. Request 3 starts at its end: nothing to attend."""
    lens = [300, 1, 40, 90, 130, 77]
    starts = [40, 0, 0, 90, 100, 10]
    check(kernel, lens, starts, 3, 3, head_dim, dtype, window, softcap, seed=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch,kv_heads,length", [(1, 3, 2000), (1, 1, 333), (2, 1, 1500)])
def test_few_requests_split_over_threads(kernel, dtype, batch, kv_heads, length):
    """Few (request, kv head) pairs: each one's keys go to several tasks, merged after."""
    check(kernel, [length - 7 * b for b in range(batch)], [0] * batch, kv_heads, 3, 64, dtype,
          seed=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_large_scores(kernel, dtype):
    """Scores in the hundreds: exp runs against the running max, not overflowing, also
    when a later chunk raises the max."""
    k_buf, v_buf, table, rows, gen = engine_pool([200], 1, 64, dtype, 3)
    k_buf[:, 1:] *= 30
    k_buf[:, table[rows[0], 150]] *= 3  # the largest score comes in a later chunk
    q = torch.randn(1, 3, 64, generator=gen).to(dtype)
    ints = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    out, lse = kernel(q, k_buf, v_buf, table, rows, ints([0]), ints([200]), 1.0, 0, 0.0)
    ref_out, ref_lse = reference(q, k_buf, v_buf, table, rows, [0], [200], 1.0, 0.0)
    torch.testing.assert_close(out, ref_out.float(), **decode_out_tolerance(dtype, 64, 1e-5))
    torch.testing.assert_close(lse, ref_lse.float(), atol=1e-5, rtol=1e-6)
