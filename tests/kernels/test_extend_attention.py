"""Extend attention (cached prefix + causal new tokens, GQA) against its torch reference."""

from __future__ import annotations

import pytest
import torch

from tests.device_follow import DeviceCheck, assert_all_named
from tests.kernels.ragged import DEVICE, HALF, poison_before, ragged_batch, random_lens, tolerance

# (cached prefix lengths, new-token counts, kv_heads, GQA group, head_dim, dtype)
CASES = [
    pytest.param([0], [5], 1, 1, 64, torch.float32, id="1req-no-prefix"),
    pytest.param([300, 0, 33], [1, 70, 32], 1, 3, 128, torch.float32, id="3req-gqa3-d128"),
    pytest.param(random_lens(8, 0, 300, 4), random_lens(8, 1, 40, 5), 1, 3, 64,
                 torch.float32, id="8req-gqa3-d64"),
    pytest.param(random_lens(4, 0, 300, 6), random_lens(4, 1, 40, 7), 2, 1, 128,
                 torch.float32, id="4req-mha-d128"),
    pytest.param(random_lens(3, 0, 300, 8), random_lens(3, 1, 40, 9), 1, 3, 64,
                 HALF, id="3req-16bit"),
]


def _new_tokens(tokens, kv_heads, group, head_dim, dtype):
    """Random q, k, v of the new tokens (q with `group` heads per KV head)."""
    gen = torch.Generator().manual_seed(0)

    def rand(heads):
        return torch.randn(tokens, heads, head_dim, generator=gen).to(dtype).to(DEVICE)

    return rand(kv_heads * group), rand(kv_heads), rand(kv_heads)


@pytest.mark.parametrize("prefix_lens,extend_lens,kv_heads,group,head_dim,dtype", CASES)
def test_extend_attention_matches_reference(prefix_lens, extend_lens, kv_heads, group,
                                            head_dim, dtype):
    from sglbatch.kernels.extend_attention import extend_attention, extend_attention_reference

    r = ragged_batch(prefix_lens, extend_lens, kv_heads, head_dim, dtype, seed=len(prefix_lens))
    q, k, v = _new_tokens(sum(extend_lens), kv_heads, group, head_dim, dtype)
    args = (q, k, v, r.k_buf, r.v_buf, r.req_to_token, r.req_pool_indices, r.prefix_lens,
            r.extend_lens, r.extend_start, head_dim ** -0.5)
    with DeviceCheck() as check:  # both run on q's device, whatever it is
        out = extend_attention(*args, max_extend_len=max(extend_lens))
        ref = extend_attention_reference(*args)
    assert_all_named(check)
    torch.testing.assert_close(out, ref, **tolerance(dtype))


# (prefix lengths, new-token counts, kv_heads, GQA group, head_dim, dtype, window, soft-cap):
# 70 new tokens span three row blocks; windows shorter than a block, spanning blocks, of
# one key, and longer than every sequence.
LAYER_CASES = [
    pytest.param([0, 130, 7, 40], [12, 70, 1, 40], 2, 3, 64, torch.float32, 20, None,
                 id="w20-gqa3"),
    pytest.param([0, 130, 7, 40], [12, 70, 1, 40], 2, 3, 64, torch.float32, 45, 10.0,
                 id="w45-cap10"),
    pytest.param(random_lens(4, 0, 200, 13), random_lens(4, 1, 40, 14), 1, 4, 128,
                 torch.float32, 1, 5.0, id="w1-cap5-d128"),
    pytest.param([50, 0], [30, 33], 2, 1, 64, torch.float32, 500, None, id="w-longer-than-all"),
    pytest.param([50, 0], [30, 33], 2, 3, 64, torch.float32, None, 5.0, id="cap-only"),
    pytest.param(random_lens(3, 0, 200, 15), random_lens(3, 1, 40, 16), 1, 3, 64, HALF, 33,
                 20.0, id="w33-16bit"),
]


@pytest.mark.parametrize("prefix_lens,extend_lens,kv_heads,group,head_dim,dtype,window,cap",
                         LAYER_CASES)
def test_extend_attention_window_softcap_scale(prefix_lens, extend_lens, kv_heads, group,
                                               head_dim, dtype, window, cap):
    """A layer's own scale, sliding window and soft-cap; the prefix keys before the first
    new token's window are NaN, so a kernel that read them would fail."""
    from sglbatch.kernels.extend_attention import extend_attention, extend_attention_reference

    r = ragged_batch(prefix_lens, extend_lens, kv_heads, head_dim, dtype, seed=len(prefix_lens))
    q, k, v = _new_tokens(sum(extend_lens), kv_heads, group, head_dim, dtype)
    args = (q, k, v, r.k_buf, r.v_buf, r.req_to_token, r.req_pool_indices, r.prefix_lens,
            r.extend_lens, r.extend_start, 0.3)
    with DeviceCheck() as check:
        ref = extend_attention_reference(*args, window, cap)
        if window is not None:
            poison_before(r, r.req_pool_indices.tolist(),
                          [p - window + 1 for p in prefix_lens])
        out = extend_attention(*args, max(extend_lens), window, cap)
    assert_all_named(check)
    torch.testing.assert_close(out, ref, **tolerance(dtype))
