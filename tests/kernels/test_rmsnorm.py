"""RMSNorm (plain and fused with the residual add) against its torch reference, and the
reference against the engine's own RMSNorm."""

from __future__ import annotations

import pytest
import torch

from tests.device_follow import DeviceCheck, assert_all_named
from tests.kernels.ragged import DEVICE, HALF, tolerance


@pytest.mark.parametrize("tokens,hidden,dtype", [
    pytest.param(1, 64, torch.float32, id="1x64"),
    pytest.param(7, 576, torch.float32, id="7x576"),
    pytest.param(5, 576, HALF, id="5x576-16bit"),
    pytest.param(3, 1000, torch.float32, id="3x1000-not-pow2")])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm_matches_reference(tokens, hidden, dtype, with_residual):
    from sglbatch.kernels.rmsnorm import rmsnorm, rmsnorm_reference

    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(DEVICE)
    residual = torch.randn(tokens, hidden, generator=gen).to(dtype).to(DEVICE)
    res_kernel, res_ref = residual.clone(), residual.clone()
    with DeviceCheck() as check:
        out = rmsnorm(x, weight, 1e-5, res_kernel if with_residual else None)
        ref = rmsnorm_reference(x, weight, 1e-5, res_ref if with_residual else None)
    assert_all_named(check)
    torch.testing.assert_close(out, ref, **tolerance(dtype))
    torch.testing.assert_close(res_kernel, res_ref, atol=0, rtol=0)


def test_reference_is_the_engines_rmsnorm():
    from sglbatch.engine.layers.norm import rms_norm
    from sglbatch.kernels.rmsnorm import rmsnorm_reference

    x = torch.randn(4, 64, dtype=torch.bfloat16)
    weight = torch.rand(64, dtype=torch.bfloat16)
    assert torch.equal(rmsnorm_reference(x, weight, 1e-6), rms_norm(x, weight, 1e-6))
