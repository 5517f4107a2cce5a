"""Decode attention (split-KV, GQA) against its torch reference over ragged batches."""

from __future__ import annotations

import pytest
import torch

from tests.device_follow import DeviceCheck, assert_all_named
from tests.kernels.ragged import DEVICE, HALF, poison_before, ragged_batch, random_lens, tolerance

# (context lengths before the decoded token, kv_heads, GQA group, head_dim, dtype, splits):
# 8 splits over sequences of 1..301 tokens leaves some splits empty, which must be skipped.
CASES = [
    pytest.param([0], 1, 1, 64, torch.float32, 8, id="1req-empty-prefix"),
    pytest.param([300, 0, 17], 2, 3, 128, torch.float32, 8, id="3req-gqa3-d128"),
    pytest.param(random_lens(8, 0, 300, 1), 2, 3, 64, torch.float32, 4, id="8req-gqa3-d64"),
    pytest.param(random_lens(5, 0, 300, 2), 2, 1, 128, torch.float32, 8, id="5req-mha-d128"),
    pytest.param([299, 63, 64, 65], 1, 3, 64, torch.float32, 1, id="block-edges-1split"),
    pytest.param(random_lens(4, 0, 300, 3), 2, 3, 64, HALF, 8, id="4req-16bit"),
]


@pytest.mark.parametrize("prefix_lens,kv_heads,group,head_dim,dtype,num_splits", CASES)
def test_decode_attention_matches_reference(prefix_lens, kv_heads, group, head_dim, dtype,
                                            num_splits):
    from sglbatch.kernels.decode_attention import decode_attention, decode_attention_reference

    batch = len(prefix_lens)
    r = ragged_batch(prefix_lens, [1] * batch, kv_heads, head_dim, dtype, seed=batch)
    q = torch.randn(batch, kv_heads * group, head_dim,
                    generator=torch.Generator().manual_seed(0)).to(dtype).to(DEVICE)
    seq_lens = r.prefix_lens + 1
    args = (q, r.k_buf, r.v_buf, r.req_to_token, r.req_pool_indices, seq_lens, head_dim ** -0.5)
    with DeviceCheck() as check:
        out = decode_attention(*args, num_splits)
        ref = decode_attention_reference(*args)
    assert_all_named(check)
    torch.testing.assert_close(out, ref, **tolerance(dtype))


# (context lengths, kv_heads, GQA group, head_dim, dtype, splits, sliding window, soft-cap):
# windows shorter than some sequences and longer than others, at block edges, of one key.
LAYER_CASES = [
    pytest.param([300, 0, 17, 130, 63], 2, 3, 64, torch.float32, 8, 50, None, id="w50-gqa3"),
    pytest.param([300, 0, 17, 130, 63], 2, 3, 64, torch.float32, 4, 64, 20.0,
                 id="w64-cap20"),
    pytest.param(random_lens(6, 0, 300, 11), 1, 4, 128, torch.float32, 2, 1, 5.0,
                 id="w1-cap5-d128"),
    pytest.param([200, 5], 2, 1, 64, torch.float32, 8, 1000, None, id="w-longer-than-all"),
    pytest.param([100, 3], 2, 3, 64, torch.float32, 8, None, 5.0, id="cap-only"),
    pytest.param(random_lens(4, 0, 300, 12), 2, 3, 64, HALF, 8, 70, 30.0, id="w70-16bit"),
]


@pytest.mark.parametrize("prefix_lens,kv_heads,group,head_dim,dtype,num_splits,window,cap",
                         LAYER_CASES)
def test_decode_attention_window_softcap_scale(prefix_lens, kv_heads, group, head_dim, dtype,
                                               num_splits, window, cap):
    """A layer's own scale, sliding window and soft-cap; the keys before a window are NaN,
    so a kernel that read them (rather than starting at the window) would fail."""
    from sglbatch.kernels.decode_attention import decode_attention, decode_attention_reference

    batch = len(prefix_lens)
    r = ragged_batch(prefix_lens, [1] * batch, kv_heads, head_dim, dtype, seed=batch)
    q = torch.randn(batch, kv_heads * group, head_dim,
                    generator=torch.Generator().manual_seed(0)).to(dtype).to(DEVICE)
    seq_lens = r.prefix_lens + 1
    args = (q, r.k_buf, r.v_buf, r.req_to_token, r.req_pool_indices, seq_lens, 0.3)
    with DeviceCheck() as check:
        ref = decode_attention_reference(*args, window, cap)
        if window is not None:
            poison_before(r, r.req_pool_indices.tolist(), (seq_lens - window).tolist())
        out = decode_attention(*args, num_splits, window, cap)
    assert_all_named(check)
    torch.testing.assert_close(out, ref, **tolerance(dtype))


def test_num_splits_grow_with_context():
    from sglbatch.kernels.decode_attention import MAX_NUM_SPLITS, num_splits_for

    assert num_splits_for(1) == 1 and num_splits_for(300) == 2
    assert num_splits_for(100_000) == MAX_NUM_SPLITS
    # A window bounds the keys to split.
    assert num_splits_for(100_000, 300) == 2 and num_splits_for(100, 4096) == 1
