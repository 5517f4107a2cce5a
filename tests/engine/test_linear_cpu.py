"""The CPU's packed linear layers (engine/layers/linear.py): the bf16 kernel against an fp32
reference on ragged shapes, SwiGLU fused into the gate/up product, a row's bits in any batch,
and `pack_linears` on a model (the kernel where it builds, oneDNN elsewhere)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sglbatch.engine.layers import linear as L
from sglbatch.engine.layers.activation import applied_by_gate_up, silu_and_mul
from sglbatch.engine.layers.moe import GatedMLP

KERNELS = L.bf16_kernels(torch.bfloat16)
needs_kernel = pytest.mark.skipif(KERNELS is None, reason="no AVX512-BF16 build on this CPU")


def _close_to_bf16(got: torch.Tensor, want: torch.Tensor) -> None:
    """Within bf16's rounding of the fp32 result (2^-8 relative), plus the sum's own error."""
    scale = want.abs().max().item() or 1.0
    torch.testing.assert_close(got.float(), want, rtol=2 ** -7, atol=2e-3 * scale)


SHAPES = [  # (rows, in, out): tails of the 6-row tile and the 64-column block, odd K
    (1, 576, 960), (5, 64, 64), (6, 577, 100), (7, 1536, 576), (13, 96, 49),
    (64, 576, 3072), (130, 128, 200),
]


@needs_kernel
@pytest.mark.parametrize("rows,in_features,out_features", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_fp32(rows, in_features, out_features, bias):
    torch.manual_seed(rows * 7 + in_features)
    x = torch.randn(rows, in_features, dtype=torch.bfloat16)
    weight = (torch.randn(out_features, in_features) / in_features ** 0.5).bfloat16()
    b = torch.randn(out_features) if bias else None
    got = KERNELS.linear(x, L.pack_bf16_weight(weight), b, out_features)
    want = x.float() @ weight.float().T + (b if bias else 0)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    _close_to_bf16(got, want)


@needs_kernel
@pytest.mark.parametrize("rows,in_features,out_features", SHAPES)
def test_silu_mul_matches_fp32(rows, in_features, out_features):
    torch.manual_seed(rows + out_features)
    x = torch.randn(rows, in_features, dtype=torch.bfloat16)
    gate_up = (torch.randn(2 * out_features, in_features) / in_features ** 0.5).bfloat16()
    got = KERNELS.silu_mul_linear(x, L.pack_bf16_gate_up(gate_up), out_features)
    product = x.float() @ gate_up.float().T
    _close_to_bf16(got, F.silu(product[:, :out_features]) * product[:, out_features:])


@needs_kernel
def test_silu_of_large_and_negative_gates_stays_finite():
    x = torch.tensor([[1.0, 1.0]], dtype=torch.bfloat16)
    gates = torch.tensor([200.0, -200.0, 30.0, -30.0, 0.0, 1e-3])
    gate_up = torch.zeros(12, 2)
    gate_up[:6, 0] = gates
    gate_up[6:, 1] = 1.0  # up = 1
    got = KERNELS.silu_mul_linear(x, L.pack_bf16_gate_up(gate_up.bfloat16()), 6)
    _close_to_bf16(got, F.silu(gates.bfloat16().float())[None])


@needs_kernel
def test_a_row_gets_the_same_bits_in_any_batch_and_from_a_strided_view():
    torch.manual_seed(0)
    weight = L.pack_bf16_weight((torch.randn(200, 576) / 24).bfloat16())
    wide = torch.randn(70, 700, dtype=torch.bfloat16)
    x = wide[:, :576]  # rows 700 apart: the kernel reads them in place
    together = KERNELS.linear(x, weight, None, 200)
    assert torch.equal(together, KERNELS.linear(x.contiguous(), weight, None, 200))
    for row in (0, 5, 6, 69):
        assert torch.equal(KERNELS.linear(x[row:row + 1], weight, None, 200), together[row:row + 1])
    assert torch.equal(KERNELS.linear(x[3:40], weight, None, 200), together[3:40])


@needs_kernel
def test_bad_input_names_what_is_wrong():
    weight = L.pack_bf16_weight(torch.randn(64, 32).bfloat16())
    with pytest.raises(RuntimeError, match="bf16"):
        KERNELS.linear(torch.randn(2, 32), weight, None, 64)
    with pytest.raises(RuntimeError, match="33 columns; the packed weight takes 32"):
        KERNELS.linear(torch.randn(2, 33).bfloat16(), weight, None, 64)
    with pytest.raises(RuntimeError, match="from pack_bf16_weight"):
        KERNELS.linear(torch.randn(2, 32).bfloat16(), torch.randn(64, 32).bfloat16(), None, 64)
    with pytest.raises(RuntimeError, match="out_features"):
        KERNELS.linear(torch.randn(2, 32).bfloat16(), weight, None, 65)


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(GatedMLP(96, 160), nn.Linear(96, 80))  # the last with a bias
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    return model.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pack_linears_keeps_the_model_s_outputs_and_flops(dtype):
    model = _model(dtype)
    x = torch.randn(3, 5, 96, dtype=dtype)  # leading dims are kept
    with torch.no_grad():
        want = model(x)
    flops = L.model_flops_per_token(model)
    assert L.pack_linears(model) == 3
    assert L.model_flops_per_token(model) == flops
    fused = dtype == torch.bfloat16 and KERNELS is not None
    assert isinstance(model[0].gate_up_proj,
                      L.PackedSiluMulLinear if fused else L.PackedLinear)
    assert model[0].act is (applied_by_gate_up if fused else silu_and_mul)
    with torch.no_grad():
        got = model(x)
    assert got.shape == want.shape and got.dtype == dtype
    if dtype == torch.float32:
        assert torch.equal(got, want)  # oneDNN gives torch's bits in fp32
    else:
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.02)


def test_without_the_kernel_bf16_stays_on_onednn(monkeypatch):
    monkeypatch.setattr(L.cpu_kernels, "load", lambda name: None)
    model = _model(torch.bfloat16)
    L.pack_linears(model)
    assert isinstance(model[0].gate_up_proj, L.PackedLinear)
    assert model[0].gate_up_proj.kernels is None and model[0].act is silu_and_mul
    with torch.no_grad():
        assert model(torch.randn(2, 96, dtype=torch.bfloat16)).shape == (2, 80)
