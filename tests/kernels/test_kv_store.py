"""KV store: new K/V rows land in their slots, and nothing else in the pool changes."""

from __future__ import annotations

import pytest
import torch

from tests.device_follow import DeviceCheck, assert_all_named
from tests.kernels.ragged import DEVICE, HALF, ragged_batch, random_lens


@pytest.mark.parametrize("extend_lens,kv_heads,head_dim,dtype", [
    pytest.param([1], 1, 64, torch.float32, id="1token"),
    pytest.param(random_lens(8, 1, 40, 10), 3, 64, HALF, id="8req-16bit"),
    pytest.param(random_lens(3, 1, 300, 11), 2, 128, torch.float32, id="3req-d128"),
])
def test_store_kv_matches_reference(extend_lens, kv_heads, head_dim, dtype):
    from sglbatch.kernels.kv_store import store_kv, store_kv_reference

    r = ragged_batch([3] * len(extend_lens), extend_lens, kv_heads, head_dim, dtype, seed=0)
    gen = torch.Generator().manual_seed(1)
    tokens = sum(extend_lens)
    # A strided view, as the model's fused qkv projection yields.
    kv = torch.randn(tokens, 2, kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    k, v = kv[:, 0], kv[:, 1]
    expected_k, expected_v = r.k_buf.clone(), r.v_buf.clone()
    with DeviceCheck() as check:
        store_kv_reference(k, v, r.new_loc, expected_k, expected_v)
        store_kv(k, v, r.new_loc, r.k_buf, r.v_buf)
    assert_all_named(check)
    assert torch.equal(r.k_buf, expected_k) and torch.equal(r.v_buf, expected_v)
